"""How images become the FID Inception's 299x299 input: the conventions behind published FIDs.

The same images give FIDs several points apart depending on how they are resized to 299x299 (Parmar, Zhang & Zhu
2022, "On Aliased Resizing and Surprising Subtleties in GAN Evaluation"), so the convention is a named choice and
every report states it. Images are first quantised to 8 bits (round(255·x)), as saving to PNG does, so that scoring a
batch in memory and scoring the same batch written to a folder give the same number.

    clean           clean-fid's default ("clean" mode): PIL bicubic resize of each channel as 32-bit float (PIL's
                    filters widen with the scale factor, so downsampling is antialiased), clip to [0, 255], then
                    (x - 128) / 128. Recommended for new numbers.
    pytorch-fid     pytorch-fid (and clean-fid "legacy_pytorch"): x / 255, torch bilinear interpolation without
                    antialiasing (align_corners=False), then 2x - 1.
    torch-fidelity  the original TensorFlow graph, as torch-fidelity and torchmetrics reproduce it (clean-fid
                    "legacy_tensorflow"): TensorFlow 1.x bilinear resize (source pixel = output index x in/out, no
                    half-pixel offset, no antialiasing), then (x - 128) / 128.

All three are identical for images that are already 299x299, up to the 2x - 1 versus (x - 128) / 128 scaling.
"""
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .inception import INPUT_SIZE

CONVENTIONS = ("clean", "pytorch-fid", "torch-fidelity")


def quantize(image: torch.Tensor) -> torch.Tensor:
    """[..., H, W] floats in [0, 1] -> uint8 0..255 by rounding, as an 8-bit PNG stores them."""
    return (image.float() * 255).round().clamp(0, 255).to(torch.uint8)


def pil_bicubic(image: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [C, H, W] -> float32 [C, size, size] in [0, 255], each channel resized by PIL in mode "F" (clean-fid)."""
    channels = []
    for channel in image.cpu().float().numpy():
        resized = Image.fromarray(channel).resize((size, size), resample=Image.Resampling.BICUBIC)
        channels.append(np.asarray(resized).clip(0, 255))
    return torch.from_numpy(np.stack(channels))


def _tf1_axis(in_size: int, out_size: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each output index along one axis: (lower source index, upper source index, weight of the upper one).

    In float32 like TensorFlow's kernel (`in = (float) i * scale`): the source coordinates' rounding is part of the
    convention's numbers.
    """
    source = torch.arange(out_size, dtype=torch.float32, device=device) * torch.tensor(in_size / out_size,
                                                                                       dtype=torch.float32)
    lower = source.floor().long()
    return lower, (lower + 1).clamp(max=in_size - 1), source - lower.float()


def tf1_bilinear(x: torch.Tensor, size: int) -> torch.Tensor:
    """TensorFlow 1.x `resize_bilinear(align_corners=False)`; x: [N, C, H, W] float -> [N, C, size, size].

    Interpolates along rows first, then between rows, in TensorFlow's order.
    """
    top, bottom, row_weight = _tf1_axis(x.shape[-2], size, x.device)
    left, right, col_weight = _tf1_axis(x.shape[-1], size, x.device)
    x = x[..., left] + (x[..., right] - x[..., left]) * col_weight  # [N, C, H, size]
    return x[..., top, :] + (x[..., bottom, :] - x[..., top, :]) * row_weight[:, None]


def _resize(pixels: torch.Tensor, convention: str) -> torch.Tensor:
    """uint8 [N, 3, H, W] -> float32 [N, 3, 299, 299] in [-1, 1] under one convention."""
    if convention == "clean":
        return (torch.stack([pil_bicubic(image, INPUT_SIZE) for image in pixels]).to(pixels.device) - 128) / 128
    if convention == "pytorch-fid":
        resized = F.interpolate(pixels.float() / 255, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear",
                                align_corners=False)
        return 2 * resized - 1
    return (tf1_bilinear(pixels.float(), INPUT_SIZE) - 128) / 128


def inception_input(images: torch.Tensor | list[torch.Tensor], convention: str = "clean",
                    device: str | torch.device | None = None) -> torch.Tensor:
    """Images in [0, 1] ([N, 3, H, W], or a list of [3, H, W] of any sizes) -> [N, 3, 299, 299] float32 in [-1, 1].

    `convention` is one of CONVENTIONS (module docstring). The result is on `device` (default: the images' device);
    the "clean" resize runs through PIL on the CPU.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown resize convention {convention!r}; choose one of {', '.join(CONVENTIONS)}")
    shapes = {tuple(image.shape) for image in images}
    if any(len(shape) != 3 or shape[0] != 3 for shape in shapes):
        raise ValueError(f"expected RGB images [3, H, W]; got shapes {sorted(shapes)}")
    device = device if device is not None else images[0].device
    if len(shapes) == 1:  # one size: resize the whole batch at once
        return _resize(quantize(torch.stack(list(images)).to(device)), convention)
    return torch.cat([_resize(quantize(image.to(device))[None], convention) for image in images])
