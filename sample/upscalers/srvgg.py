"""SRVGGNetCompact (Real-ESRGAN's compact "realesr-general" / "realesr-animevideo" models).

One Sequential `body`: conv in -> nf (body.0), PReLU (body.1), then `num_conv` pairs of conv nf -> nf and PReLU, and a
last conv nf -> out·scale² (body.{2·num_conv+2}); a pixel shuffle turns it into the residual that is added to the
nearest-neighbour upsampled input.
"""
import math
import re

import torch
from torch import nn
import torch.nn.functional as F


class SRVGGNetCompact(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, features: int, num_conv: int, scale: int):
        super().__init__()
        self.scale = scale
        layers: list[nn.Module] = [nn.Conv2d(in_channels, features, 3, padding=1), nn.PReLU(features)]
        for _ in range(num_conv):
            layers += [nn.Conv2d(features, features, 3, padding=1), nn.PReLU(features)]
        layers.append(nn.Conv2d(features, out_channels * scale ** 2, 3, padding=1))
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, in, H, W] -> [B, out, H*scale, W*scale]
        residual = F.pixel_shuffle(self.body(x), self.scale)
        return residual + F.interpolate(x, scale_factor=self.scale, mode="nearest")


def build_srvgg(state_dict: dict[str, torch.Tensor]) -> SRVGGNetCompact:
    """Widths from body.0, depth from the last body index, scale from the last conv's channels (out·scale²)."""
    indices = [int(match.group(1)) for key in state_dict if (match := re.fullmatch(r"body\.(\d+)\.weight", key))]
    last_index = max(indices)
    first, last = state_dict["body.0.weight"], state_dict[f"body.{last_index}.weight"]
    if any(f"body.{index}.weight" not in state_dict for index in range(1, last_index, 2)):
        raise ValueError("an SRVGGNetCompact file without a PReLU weight after every conv (body.1, body.3, ...); only "
                         "the PReLU variant that Real-ESRGAN ships is supported")
    in_channels = first.shape[1]
    scale = math.isqrt(last.shape[0] // in_channels)
    if scale * scale * in_channels != last.shape[0]:
        raise ValueError(f"SRVGGNetCompact: the last conv gives {last.shape[0]} channels, not {in_channels}·scale²")
    return SRVGGNetCompact(in_channels=in_channels, out_channels=in_channels, features=first.shape[0],
                           num_conv=(last_index - 2) // 2, scale=scale)
