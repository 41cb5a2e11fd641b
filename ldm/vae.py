"""AutoencoderKL, the first stage of latent diffusion (Rombach et al. 2022, §3.1), in CompVis's module layout.

Attribute paths are the checkpoint keys under `first_stage_model.`: `encoder.down[i].block[j]`, `encoder.mid.attn_1`,
`quant_conv`, `post_quant_conv`, `decoder.up[i].upsample`, … Images are in [-1, 1]; latents are *unscaled* (the
container multiplies by `scale_factor`, 0.18215 for SD1/SD2 and 0.13025 for SDXL).
"""
import functools

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from .layers import GroupNorm, Upsample

NORM_GROUPS = 32


def normalize(channels: int) -> GroupNorm:
    return GroupNorm(NORM_GROUPS, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """Norm-SiLU-conv twice with a residual; a 1×1 `nin_shortcut` when the width changes."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, C_in, H, W] -> [B, C_out, H, W]
        h = self.conv1(self.norm1(x, silu=True))
        h = self.conv2(self.dropout(self.norm2(h, silu=True)))
        shortcut = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return shortcut + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, with 1×1-conv projections (`q`, `k`, `v`, `proj_out`)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = normalize(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, C, H, W]; attention runs as one head of width C over N = H·W tokens: [B, 1, N, C].
        b, c, height, width = x.shape
        h = self.norm(x)
        q, k, v = (proj(h).reshape(b, 1, c, height * width).transpose(-1, -2) for proj in (self.q, self.k, self.v))
        out = kernels.attention(q, k, v).transpose(-1, -2).reshape(b, c, height, width)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Stride-2 3×3 convolution; CompVis pads only right and bottom (0, 1, 0, 1), so `conv` has padding 0."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class MidBlock(nn.Module):
    def __init__(self, channels: int, dropout: float):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution of the encoder (`block` + `downsample`) or decoder (`block` + `upsample`)."""

    def __init__(self, blocks: list[ResnetBlock], resample: nn.Module | None, resample_name: str):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        if resample is not None:
            setattr(self, resample_name, resample)
        self.resample_name = resample_name

    @property
    def resample(self) -> nn.Module | None:
        """The level's `downsample` / `upsample` layer under its checkpoint name; None at the last level."""
        return getattr(self, self.resample_name, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, C, H, W] -> [B, C', H/2, W/2] (encoder), [B, C', 2H, 2W] (decoder), same size at the last level
        for block in self.block:
            x = block(x)
        return x if self.resample is None else self.resample(x)


class Encoder(nn.Module):
    def __init__(self, *, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, in_channels: int, z_channels: int,
                 dropout: float = 0.0):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        widths = [ch] + [ch * m for m in ch_mult]
        self.down = nn.ModuleList(
            Level([ResnetBlock(widths[i] if j == 0 else widths[i + 1], widths[i + 1], dropout)
                   for j in range(num_res_blocks)],
                  Downsample(widths[i + 1]) if i != len(ch_mult) - 1 else None, "downsample")
            for i in range(len(ch_mult)))
        self.mid = MidBlock(widths[-1], dropout)
        self.norm_out = normalize(widths[-1])
        # Mean and log-variance of the posterior, hence 2·z_channels ("double_z").
        self.conv_out = nn.Conv2d(widths[-1], 2 * z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, 3, H, W] -> [B, 2·z, H/f, W/f] with f = 2^(levels-1)
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return self.conv_out(self.norm_out(self.mid(h), silu=True))


class Decoder(nn.Module):
    def __init__(self, *, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, out_ch: int, z_channels: int,
                 dropout: float = 0.0):
        super().__init__()
        widths = [ch * m for m in ch_mult]
        self.conv_in = nn.Conv2d(z_channels, widths[-1], 3, padding=1)
        self.mid = MidBlock(widths[-1], dropout)
        # up[i] is resolution level i (as in the checkpoint), but runs from the deepest level to the shallowest.
        self.up = nn.ModuleList(
            Level([ResnetBlock(widths[min(i + 1, len(widths) - 1)] if j == 0 else widths[i], widths[i], dropout)
                   for j in range(num_res_blocks + 1)],
                  Upsample(widths[i]) if i != 0 else None, "upsample")
            for i in range(len(ch_mult)))
        self.norm_out = normalize(widths[0])
        self.conv_out = nn.Conv2d(widths[0], out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        # z: [B, z, h, w] -> [B, 3, h·f, w·f]
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(self.norm_out(h, silu=True))


class DiagonalGaussian:
    """The encoder's posterior q(z|x) = N(mean, diag(std²)) from moments [B, 2·C, h, w]."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        # Clamped as in CompVis: exp() of a wild log-variance would overflow in fp16.
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean


def _blend_ramp(length: int, overlap: int, start_open: bool, end_open: bool, device) -> torch.Tensor:
    """Weights along one tile axis: 1 inside, linear ramps over `overlap` cells on edges shared with a neighbour."""
    w = torch.ones(length, device=device)
    ramp = (torch.arange(overlap, device=device) + 1) / (overlap + 1)
    if start_open and overlap:
        w[:overlap] = ramp
    if end_open and overlap:
        w[-overlap:] = ramp.flip(0)
    return w


def _tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    if size <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile, stride))
    return starts + [size - tile]


def tiled_apply(fn, x: torch.Tensor, tile: int, overlap: int, scale: float) -> torch.Tensor:
    """Run fn on overlapping tiles of x: [B, C, H, W] and blend the outputs with linear ramps (no visible seams).

    fn maps a [B, C, h, w] tile to [B, C', h·scale, w·scale]; every output pixel is the weighted mean of the tiles
    covering it, weights ramping from ~0 at a shared tile edge to 1 over the overlap.
    """
    _, _, height, width = x.shape
    out = weight_sum = None
    rows, cols = _tile_starts(height, tile, overlap), _tile_starts(width, tile, overlap)
    for top in rows:
        for left in cols:
            th, tw = min(tile, height), min(tile, width)
            y = fn(x[:, :, top:top + th, left:left + tw])
            if out is None:
                out = torch.zeros(y.shape[:2] + (int(height * scale), int(width * scale)), device=y.device,
                                  dtype=torch.float32)
                weight_sum = torch.zeros_like(out[:1, :1])
            o_top, o_left, o_overlap = int(top * scale), int(left * scale), int(overlap * scale)
            w = (_blend_ramp(y.shape[2], o_overlap, top > 0, top + th < height, y.device)[:, None]
                 * _blend_ramp(y.shape[3], o_overlap, left > 0, left + tw < width, y.device)[None, :])
            out[:, :, o_top:o_top + y.shape[2], o_left:o_left + y.shape[3]] += y.float() * w
            weight_sum[:, :, o_top:o_top + y.shape[2], o_left:o_left + y.shape[3]] += w
    return (out / weight_sum).to(x.dtype)


class AutoencoderKL(nn.Module):
    """KL-regularised autoencoder: images [B, 3, H, W] in [-1, 1] <-> latents [B, embed_dim, H/f, W/f].

    `encode`/`decode` switch to tiled processing when the input is larger than `tile_latent` latent pixels
    (tile_latent × f image pixels), and redo an fp16 pass in fp32 when it produced NaN/inf (the SD VAE's activations
    overflow fp16 on some images); after that the VAE stays in fp32, as A1111's "revert VAE to 32-bit floats" does.
    """

    def __init__(self, *, ch: int = 128, ch_mult: tuple[int, ...] = (1, 2, 4, 4), num_res_blocks: int = 2,
                 in_channels: int = 3, out_ch: int = 3, z_channels: int = 4, embed_dim: int = 4,
                 dropout: float = 0.0):
        super().__init__()
        self.encoder = Encoder(ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks, in_channels=in_channels,
                               z_channels=z_channels, dropout=dropout)
        self.decoder = Decoder(ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks, out_ch=out_ch,
                               z_channels=z_channels, dropout=dropout)
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)
        self.downscale = 2 ** (len(ch_mult) - 1)
        self.tile_latent = 64
        self.tile_overlap_latent = 16

    def _encode_moments(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(x))

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))

    def _with_fp32_retry(self, fn, x: torch.Tensor) -> torch.Tensor:
        out = fn(x.to(self.dtype))
        if self.dtype == torch.float16 and not torch.isfinite(out).all():
            self.float()
            out = fn(x.float()).to(torch.float16)
        return out

    @property
    def dtype(self) -> torch.dtype:
        return self.post_quant_conv.weight.dtype

    def encode(self, x: torch.Tensor, tiled: bool | None = None) -> DiagonalGaussian:
        # x: [B, 3, H, W] in [-1, 1]; H and W multiples of the downscale factor f.
        tile = self.tile_latent * self.downscale
        if tiled is None:
            tiled = max(x.shape[-2:]) > tile
        fn = self._encode_moments
        if tiled:
            fn = functools.partial(tiled_apply, self._encode_moments, tile=tile,
                                   overlap=self.tile_overlap_latent * self.downscale, scale=1 / self.downscale)
        return DiagonalGaussian(self._with_fp32_retry(fn, x))

    def decode(self, z: torch.Tensor, tiled: bool | None = None) -> torch.Tensor:
        # z: [B, embed_dim, h, w] (unscaled) -> [B, 3, h·f, w·f], roughly in [-1, 1]
        if tiled is None:
            tiled = max(z.shape[-2:]) > self.tile_latent
        fn = self._decode
        if tiled:
            fn = functools.partial(tiled_apply, self._decode, tile=self.tile_latent, overlap=self.tile_overlap_latent,
                                   scale=self.downscale)
        return self._with_fp32_retry(fn, z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x).mode())
