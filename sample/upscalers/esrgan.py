"""RRDBNet (Wang et al. 2018, "ESRGAN", and 2021, "Real-ESRGAN") in the two key layouts its files ship with.

ESRGAN's original code builds the network as one `nn.Sequential` called `model`:
    model.0                     conv in_nc -> nf
    model.1.sub.{0..nb-1}.RDB{1,2,3}.conv{1..5}.0
                                residual-in-residual dense blocks (each conv wrapped in a Sequential)
    model.1.sub.{nb}            trunk conv; model.1 adds its input back (a "ShortcutBlock")
    model.{3k}                  one [nearest x2, conv, LeakyReLU] triple per factor 2 of the scale (2-4, 5-7, ...)
    model.{n-3}, model.{n-1}    HR conv, LeakyReLU, last conv
Real-ESRGAN (BasicSR) names the same network `conv_first`, `body.N.rdb{1,2,3}.conv{1..5}`, `conv_body`, `conv_up1`,
`conv_up2`, `conv_hr`, `conv_last`; its x2 and x1 models pixel-unshuffle the input by 2 or 4 first (conv_first then
takes 12 or 48 channels) and always upsample x4.
Both classes here keep those names, so each file loads with a strict load_state_dict.
"""
import re

import torch
from torch import nn
import torch.nn.functional as F

# ESRGAN, eq. in Sec. 3.1: residual scaling β = 0.2 in both the dense block and the RRDB; LeakyReLU slope 0.2.
RESIDUAL_SCALE = 0.2
NEGATIVE_SLOPE = 0.2


def _conv3x3(channels_in: int, channels_out: int) -> nn.Conv2d:
    return nn.Conv2d(channels_in, channels_out, 3, padding=1)


class ResidualDenseBlock(nn.Module):
    """Five densely connected 3x3 convs: conv k sees the block input and the outputs of convs 1..k-1.

    `wrapped`: ESRGAN's files name each conv `convK.0` (a Sequential holding the conv); Real-ESRGAN's name it `convK`.
    """

    def __init__(self, features: int, growth: int, wrapped: bool):
        super().__init__()
        for k in range(1, 6):
            conv = _conv3x3(features + (k - 1) * growth, growth if k < 5 else features)
            setattr(self, f"conv{k}", nn.Sequential(conv) if wrapped else conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, nf, H, W]
        features = [x]
        for k in range(1, 5):
            conv = getattr(self, f"conv{k}")
            features.append(F.leaky_relu(conv(torch.cat(features, 1)), NEGATIVE_SLOPE))
        return self.conv5(torch.cat(features, 1)) * RESIDUAL_SCALE + x


class RRDB(nn.Module):
    """Residual-in-residual dense block: three dense blocks, scaled residual around them.
    ESRGAN names them RDB1..3, Real-ESRGAN rdb1..3."""

    def __init__(self, features: int, growth: int, old_layout: bool):
        super().__init__()
        self.names = tuple(f"{'RDB' if old_layout else 'rdb'}{k}" for k in (1, 2, 3))
        for name in self.names:
            self.add_module(name, ResidualDenseBlock(features, growth, wrapped=old_layout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for name in self.names:
            out = getattr(self, name)(out)
        return out * RESIDUAL_SCALE + x


class _Shortcut(nn.Module):
    """ESRGAN's ShortcutBlock: `sub(x) + x`, its Sequential under the key `sub`."""

    def __init__(self, sub: nn.Sequential):
        super().__init__()
        self.sub = sub

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sub(x) + x


class OldESRGAN(nn.Module):
    """ESRGAN as its original files lay it out; scale = 2 ** upsample_count."""

    def __init__(self, in_channels: int, out_channels: int, features: int, growth: int, blocks: int,
                 upsample_count: int):
        super().__init__()
        trunk = [RRDB(features, growth, old_layout=True) for _ in range(blocks)] + [_conv3x3(features, features)]
        layers: list[nn.Module] = [_conv3x3(in_channels, features), _Shortcut(nn.Sequential(*trunk))]
        for _ in range(upsample_count):
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), _conv3x3(features, features),
                       nn.LeakyReLU(NEGATIVE_SLOPE)]
        layers += [_conv3x3(features, features), nn.LeakyReLU(NEGATIVE_SLOPE), _conv3x3(features, out_channels)]
        self.model = nn.Sequential(*layers)
        self.scale = 2 ** upsample_count

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, in, H, W] in [0, 1] -> [B, out, H*scale, W*scale]
        return self.model(x)


class RRDBNet(nn.Module):
    """Real-ESRGAN's RRDBNet (BasicSR key names). unshuffle 1, 2 or 4 gives the x4, x2 and x1 models."""

    def __init__(self, in_channels: int, out_channels: int, features: int, growth: int, blocks: int, unshuffle: int):
        super().__init__()
        self.unshuffle = unshuffle
        self.scale = 4 // unshuffle
        self.conv_first = _conv3x3(in_channels * unshuffle ** 2, features)
        self.body = nn.Sequential(*[RRDB(features, growth, old_layout=False) for _ in range(blocks)])
        self.conv_body = _conv3x3(features, features)
        self.conv_up1 = _conv3x3(features, features)
        self.conv_up2 = _conv3x3(features, features)
        self.conv_hr = _conv3x3(features, features)
        self.conv_last = _conv3x3(features, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, in, H, W] in [0, 1] -> [B, out, H*scale, W*scale]
        height, width = x.shape[-2:]
        if self.unshuffle > 1:
            # Real-ESRGAN pads by reflection to a multiple of the unshuffle factor and crops the result.
            pad_h, pad_w = -height % self.unshuffle, -width % self.unshuffle
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="reflect")
            x = F.pixel_unshuffle(x, self.unshuffle)  # [B, in*u², H/u, W/u]
        features = self.conv_first(x)
        features = features + self.conv_body(self.body(features))
        for conv in (self.conv_up1, self.conv_up2):
            features = F.leaky_relu(conv(F.interpolate(features, scale_factor=2, mode="nearest")), NEGATIVE_SLOPE)
        out = self.conv_last(F.leaky_relu(self.conv_hr(features), NEGATIVE_SLOPE))
        return out[..., : height * self.scale, : width * self.scale]


def _count(state_dict: dict, pattern: str) -> int:
    """1 + the largest N of the keys matching `pattern` (one group, the index)."""
    indices = [int(match.group(1)) for key in state_dict if (match := re.fullmatch(pattern, key))]
    return max(indices) + 1 if indices else 0


def build_old_esrgan(state_dict: dict[str, torch.Tensor]) -> OldESRGAN:
    """ESRGAN's original layout: widths from model.0, block count from model.1.sub.N, scale from the number of
    Sequential entries (conv, shortcut, 3 per x2 upsample, HR conv, LeakyReLU, last conv)."""
    first, dense = state_dict["model.0.weight"], state_dict["model.1.sub.0.RDB1.conv1.0.weight"]
    length = _count(state_dict, r"model\.(\d+)\.weight")
    upsample_count, remainder = divmod(length - 5, 3)
    last = state_dict[f"model.{length - 1}.weight"]
    if remainder or upsample_count < 0:
        raise ValueError(f"an ESRGAN file whose last layer is model.{length - 1} fits no x2^k layout")
    return OldESRGAN(in_channels=first.shape[1], out_channels=last.shape[0], features=first.shape[0],
                     growth=dense.shape[0], blocks=_count(state_dict, r"model\.1\.sub\.(\d+)\.RDB1\.conv1\.0\.weight"),
                     upsample_count=upsample_count)


def build_rrdbnet(state_dict: dict[str, torch.Tensor]) -> RRDBNet:
    """Real-ESRGAN's layout: the input channels of conv_first over the output channels of conv_last give the
    pixel-unshuffle factor (3 -> x4, 12 -> x2, 48 -> x1)."""
    first, last = state_dict["conv_first.weight"], state_dict["conv_last.weight"]
    out_channels = last.shape[0]
    ratio = first.shape[1] // out_channels
    unshuffle = {1: 1, 4: 2, 16: 4}.get(ratio) if first.shape[1] % out_channels == 0 else None
    if unshuffle is None:
        raise ValueError(f"a Real-ESRGAN file with conv_first taking {first.shape[1]} channels and conv_last giving "
                         f"{out_channels}: no pixel-unshuffle factor (1, 2, 4) explains the ratio")
    return RRDBNet(in_channels=first.shape[1] // unshuffle ** 2, out_channels=out_channels, features=first.shape[0],
                   growth=state_dict["body.0.rdb1.conv1.weight"].shape[0],
                   blocks=_count(state_dict, r"body\.(\d+)\.rdb1\.conv1\.weight"), unshuffle=unshuffle)
