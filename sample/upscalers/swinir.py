"""SwinIR (Liang et al. 2021, "SwinIR: Image Restoration Using Swin Transformer") for super-resolution, key names as in
the released files:

    conv_first                                      3x3 conv, image -> embed_dim features
    patch_embed.norm                                LayerNorm over the flattened tokens
    layers.i.residual_group.blocks.j.{norm1, attn.{qkv, proj, relative_position_bias_table, relative_position_index},
                                      norm2, mlp.{fc1, fc2}} (+ attn_mask in the shifted blocks, odd j)
    layers.i.conv                                   the RSTB's conv: one 3x3 ("1conv") or .0/.2/.4 ("3conv")
    norm, conv_after_body                           final LayerNorm, conv (same two variants)
    classical SR ("pixelshuffle"):  conv_before_upsample.0, upsample.{0, 2, ...}, conv_last
    real-world SR ("nearest+conv"): conv_before_upsample.0, conv_up1, conv_up2 (x4), conv_hr, conv_last

Swin blocks attend within window_size² windows (Sec. 3.2); every second block shifts the windows by half a window
(cyclic roll), masking token pairs that the roll brought together from opposite image borders.
"""
import math
import re

import torch
from torch import nn
import torch.nn.functional as F

# SwinIR normalises RGB input by the DIV2K mean before the network and adds it back afterwards.
DIV2K_RGB_MEAN = (0.4488, 0.4371, 0.4040)
# The masked logit for window token pairs that are not neighbours in the image (Swin's value; exp(-100) ≈ 0).
MASKED_LOGIT = -100.0
RSTB_NEGATIVE_SLOPE = 0.2


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    # x: [B, H, W, C] -> [B·(H/w)·(W/w), w·w, C]
    batch, height, width, channels = x.shape
    x = x.view(batch, height // window, window, width // window, window, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, channels)


def window_merge(windows: torch.Tensor, window: int, height: int, width: int) -> torch.Tensor:
    # windows: [B·(H/w)·(W/w), w·w, C] -> [B, H, W, C]
    channels = windows.shape[-1]
    x = windows.view(-1, height // window, width // window, window, window, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, height, width, channels)


def relative_position_index(window: int) -> torch.Tensor:
    """[w², w²]: for each token pair of a window, the row of the bias table for their (dy, dx) offset."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    offsets = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)  # [w², w², 2] in [0, 2w-2]
    return offsets[..., 0] * (2 * window - 1) + offsets[..., 1]


def shifted_window_mask(height: int, width: int, window: int, shift: int) -> torch.Tensor:
    """[nW, w², w²]: 0 for token pairs from the same image region after the cyclic shift, MASKED_LOGIT otherwise."""
    regions = torch.zeros(1, height, width, 1)
    bands = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    for index, (rows, cols) in enumerate((r, c) for r in bands for c in bands):
        regions[:, rows, cols, :] = index
    labels = window_partition(regions, window).squeeze(-1)  # [nW, w²]
    differs = labels[:, None, :] != labels[:, :, None]
    return torch.zeros(differs.shape).masked_fill(differs, MASKED_LOGIT)


class WindowAttention(nn.Module):
    def __init__(self, dim: int, window: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        self.register_buffer("relative_position_index", relative_position_index(window))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        # x: [B·nW, N=w², C]; mask: [nW, N, N] or None
        windows, tokens, channels = x.shape
        q, k, v = self.qkv(x).view(windows, tokens, 3, self.heads, -1).permute(2, 0, 3, 1, 4)  # each [B·nW, h, N, d]
        logits = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # [B·nW, h, N, N]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(tokens, tokens, -1)
        logits = logits + bias.permute(2, 0, 1)
        if mask is not None:
            per_image = mask.shape[0]
            logits = (logits.view(-1, per_image, self.heads, tokens, tokens) + mask[None, :, None]).flatten(0, 1)
        out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(windows, tokens, channels)
        return self.proj(out)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SwinTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, window: int, shift: int, mlp_hidden: int, trained_size: int):
        super().__init__()
        self.window, self.shift, self.trained_size = window, shift, trained_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_hidden)
        if shift:
            # The files store the mask for the training patch size; other sizes compute theirs in forward.
            self.register_buffer("attn_mask", shifted_window_mask(trained_size, trained_size, window, shift))

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        # x: [B, H·W, C]
        height, width = size
        image = self.norm1(x).view(x.shape[0], height, width, -1)
        mask = None
        if self.shift:
            image = torch.roll(image, (-self.shift, -self.shift), dims=(1, 2))
            mask = (self.attn_mask if (height, width) == (self.trained_size,) * 2
                    else shifted_window_mask(height, width, self.window, self.shift).to(x))
        attended = window_merge(self.attn(window_partition(image, self.window), mask), self.window, height, width)
        if self.shift:
            attended = torch.roll(attended, (self.shift, self.shift), dims=(1, 2))
        x = x + attended.reshape(x.shape)
        return x + self.mlp(self.norm2(x))


def _residual_conv(dim: int, three_conv: bool) -> nn.Module:
    """"1conv": one 3x3 conv; "3conv" (the large real-world model): 3x3 to dim/4, 1x1, 3x3 back, LeakyReLU between."""
    if not three_conv:
        return nn.Conv2d(dim, dim, 3, padding=1)
    quarter = dim // 4
    return nn.Sequential(nn.Conv2d(dim, quarter, 3, padding=1), nn.LeakyReLU(RSTB_NEGATIVE_SLOPE),
                         nn.Conv2d(quarter, quarter, 1), nn.LeakyReLU(RSTB_NEGATIVE_SLOPE),
                         nn.Conv2d(quarter, dim, 3, padding=1))


def _tokens_to_image(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    # [B, H·W, C] -> [B, C, H, W]
    return x.transpose(1, 2).reshape(x.shape[0], -1, *size)


class ResidualGroup(nn.Module):
    def __init__(self, blocks: list[SwinTransformerBlock]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, size)
        return x


class RSTB(nn.Module):
    """Residual Swin Transformer block (Sec. 3.1): Swin layers, a conv, and the skip around them."""

    def __init__(self, blocks: list[SwinTransformerBlock], dim: int, three_conv: bool):
        super().__init__()
        self.residual_group = ResidualGroup(blocks)
        self.conv = _residual_conv(dim, three_conv)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        # x: [B, H·W, C]
        image = self.conv(_tokens_to_image(self.residual_group(x, size), size))
        return image.flatten(2).transpose(1, 2) + x


class PatchEmbed(nn.Module):
    """Patch size 1: the feature map as tokens, layer-normalised."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.flatten(2).transpose(1, 2))  # [B, C, H, W] -> [B, H·W, C]


class SwinIR(nn.Module):
    def __init__(self, in_channels: int, dim: int, depths: list[int], heads: list[int], window: int, mlp_ratio: float,
                 trained_size: int, three_conv: bool, upsampler: str, scale: int, features: int, out_channels: int):
        super().__init__()
        self.window, self.scale, self.upsampler = window, scale, upsampler
        mean = DIV2K_RGB_MEAN if in_channels == 3 else (0.0,) * in_channels
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.conv_first = nn.Conv2d(in_channels, dim, 3, padding=1)
        self.patch_embed = PatchEmbed(dim)
        self.layers = nn.ModuleList(
            RSTB([SwinTransformerBlock(dim, layer_heads, window, shift=window // 2 if j % 2 else 0,
                                       mlp_hidden=int(dim * mlp_ratio), trained_size=trained_size)
                  for j in range(depth)], dim, three_conv)
            for depth, layer_heads in zip(depths, heads))
        self.norm = nn.LayerNorm(dim)
        self.conv_after_body = _residual_conv(dim, three_conv)
        # SwinIR's own nn.LeakyReLU() here keeps PyTorch's default slope 0.01.
        self.conv_before_upsample = nn.Sequential(nn.Conv2d(dim, features, 3, padding=1), nn.LeakyReLU())
        if upsampler == "pixelshuffle":
            steps = [(2, 4)] * int(math.log2(scale)) if scale & (scale - 1) == 0 else [(3, 9)]
            layers: list[nn.Module] = []
            for factor, multiplier in steps:
                layers += [nn.Conv2d(features, multiplier * features, 3, padding=1), nn.PixelShuffle(factor)]
            self.upsample = nn.Sequential(*layers)
        else:  # "nearest+conv": x2 per conv_upK
            for k in range(1, int(math.log2(scale)) + 1):
                setattr(self, f"conv_up{k}", nn.Conv2d(features, features, 3, padding=1))
            self.conv_hr = nn.Conv2d(features, features, 3, padding=1)
        self.conv_last = nn.Conv2d(features, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, in, H, W] in [0, 1] -> [B, out, H*scale, W*scale]
        height, width = x.shape[-2:]
        # Windows tile the image: reflect-pad to a multiple of the window, crop the output back.
        x = F.pad(x, (0, -width % self.window, 0, -height % self.window), mode="reflect")
        size = tuple(x.shape[-2:])
        features = self.conv_first(x - self.mean)
        tokens = self.patch_embed(features)
        for layer in self.layers:
            tokens = layer(tokens, size)
        features = self.conv_after_body(_tokens_to_image(self.norm(tokens), size)) + features
        features = self.conv_before_upsample(features)
        if self.upsampler == "pixelshuffle":
            out = self.conv_last(self.upsample(features))
        else:
            k = 1
            while hasattr(self, f"conv_up{k}"):
                upsampled = F.interpolate(features, scale_factor=2, mode="nearest")
                features = F.leaky_relu(getattr(self, f"conv_up{k}")(upsampled), RSTB_NEGATIVE_SLOPE)
                k += 1
            out = self.conv_last(F.leaky_relu(self.conv_hr(features), RSTB_NEGATIVE_SLOPE))
        return (out + self.mean)[..., : height * self.scale, : width * self.scale]


def _sequence_length(state_dict: dict, prefix: str) -> int:
    pattern = re.escape(prefix) + r"\.(\d+)\."
    return 1 + max((int(m.group(1)) for key in state_dict if (m := re.match(pattern, key))), default=-1)


def build_swinir(state_dict: dict[str, torch.Tensor]) -> SwinIR:
    """Everything from the tensors: dim (conv_first), window (relative_position_index is [w², w²]), training size
    (attn_mask is [(size/w)², w², w²]), depths and heads per layer (bias table [(2w-1)², heads]), MLP ratio (fc1),
    the residual conv variant, the upsampler and the scale (conv_up count, or the pixel-shuffle convs' channels)."""
    first = state_dict["conv_first.weight"]
    dim = first.shape[0]
    block0 = "layers.0.residual_group.blocks.0."
    window = math.isqrt(state_dict[block0 + "attn.relative_position_index"].shape[0])
    mask = state_dict.get("layers.0.residual_group.blocks.1.attn_mask")
    trained_size = math.isqrt(mask.shape[0]) * window if mask is not None else 64
    layer_count = _sequence_length(state_dict, "layers")
    depths = [_sequence_length(state_dict, f"layers.{i}.residual_group.blocks") for i in range(layer_count)]
    heads = [state_dict[f"layers.{i}.residual_group.blocks.0.attn.relative_position_bias_table"].shape[1]
             for i in range(layer_count)]
    features = state_dict["conv_before_upsample.0.weight"].shape[0] if "conv_before_upsample.0.weight" in state_dict \
        else None
    if features is None:
        raise ValueError("a SwinIR file without conv_before_upsample: only the super-resolution models (classical "
                         "'pixelshuffle' and real-world 'nearest+conv') are supported, not lightweight/denoising ones")
    if "conv_up1.weight" in state_dict:
        upsampler, scale = "nearest+conv", 2 ** sum(f"conv_up{k}.weight" in state_dict for k in (1, 2, 3))
    else:
        upsampler = "pixelshuffle"
        convs = [state_dict[f"upsample.{i}.weight"] for i in range(0, 2 * _sequence_length(state_dict, "upsample"), 2)
                 if f"upsample.{i}.weight" in state_dict]
        scale = 3 if convs[0].shape[0] == 9 * features else 2 ** len(convs)
    return SwinIR(in_channels=first.shape[1], dim=dim, depths=depths, heads=heads, window=window,
                  mlp_ratio=state_dict[block0 + "mlp.fc1.weight"].shape[0] / dim, trained_size=trained_size,
                  three_conv="conv_after_body.0.weight" in state_dict, upsampler=upsampler, scale=scale,
                  features=features, out_channels=state_dict["conv_last.weight"].shape[0])
