"""Images in and out: PIL <-> tensors, resizing, masks, A1111 file names, grids and atomic PNG writing."""
import math
import os
import re
import warnings

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps, PngImagePlugin, UnidentifiedImageError

from ldm.files import atomic_write
from .infotext import clean_text

# A1111's limit on the prompt part of a file name, and the characters it replaces.
MAX_FILENAME_PART = 128
_INVALID_FILENAME_CHARS = re.compile(r'[<>:"/\\|?*\n\r\t]')


class ImageError(ValueError):
    """An image file that is missing or cannot be decoded."""


def open_image(image: Image.Image | str | os.PathLike, mode: str = "RGB") -> Image.Image:
    """A PIL image in `mode`, from an image or a path; EXIF orientation applied; ImageError naming the file."""
    if isinstance(image, Image.Image):
        return image.convert(mode)
    path = os.fspath(image)
    if not os.path.isfile(path):
        raise ImageError(f"image not found: {path}")
    try:
        with Image.open(path) as opened:
            return ImageOps.exif_transpose(opened).convert(mode)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as error:
        raise ImageError(f"cannot read image {path}: {error}") from None


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB image -> [1, 3, H, W] float32 in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)[None] * 2 - 1


def mask_to_tensor(mask: Image.Image) -> torch.Tensor:
    """L image -> [1, 1, H, W] float32 in [0, 1]."""
    return torch.from_numpy(np.asarray(mask.convert("L"), dtype=np.float32) / 255.0)[None, None]


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in [-1, 1] -> RGB images; 8-bit values are truncated (A1111's `astype(np.uint8)`)."""
    array = ((images.float().cpu() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray((255.0 * a).astype(np.uint8)) for a in array]


def resize_image(image: Image.Image, width: int, height: int, mode: int = 0,
                 resample: int = Image.LANCZOS) -> Image.Image:
    """A1111's img2img resize modes, with Lanczos unless `resample` says otherwise: 0 just resize (stretch), 1 crop
    and resize (cover, centre crop), 2 resize and fill (fit, and extend the edge pixels into the empty bands)."""
    if mode == 0 or image.size == (width, height):
        return image.resize((width, height), resample)
    ratio, source_ratio = width / height, image.width / image.height
    cover = (ratio > source_ratio) == (mode == 1)
    if cover:
        scaled = (width, max(1, round(width / source_ratio)))
    else:
        scaled = (max(1, round(height * source_ratio)), height)
    resized = image.resize(scaled, resample)
    if mode == 1:
        left, top = (scaled[0] - width) // 2, (scaled[1] - height) // 2
        return resized.crop((left, top, left + width, top + height))
    canvas = Image.new(image.mode, (width, height))
    left, top = (width - scaled[0]) // 2, (height - scaled[1]) // 2
    canvas.paste(resized, (left, top))
    # Fill the bands by stretching the outermost row / column of the resized image.
    if top > 0:
        canvas.paste(resized.crop((0, 0, scaled[0], 1)).resize((scaled[0], top)), (left, 0))
        bottom = top + scaled[1]
        canvas.paste(resized.crop((0, scaled[1] - 1, scaled[0], scaled[1])).resize((scaled[0], height - bottom)),
                     (left, bottom))
    if left > 0:
        canvas.paste(resized.crop((0, 0, 1, scaled[1])).resize((left, scaled[1])), (0, top))
        right = left + scaled[0]
        canvas.paste(resized.crop((scaled[0] - 1, 0, scaled[0], scaled[1])).resize((width - right, scaled[1])),
                     (right, top))
    return canvas


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111's "fill" masked content: the masked area painted with blurs of the colours around it, from very wide
    (radius 256) to sharp, each composited over the previous, so the hole starts as a smooth guess of its
    surroundings. mask: L, 255 = masked."""
    keep = ImageOps.invert(mask.convert("L"))
    # Premultiplied alpha ("RGBa") so that blurring averages only the kept pixels' colours.
    kept = Image.new("RGBa", image.size)
    kept.paste(image.convert("RGBA").convert("RGBa"), mask=keep)
    filled = Image.new("RGBA", image.size)
    for radius, repeats in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        blurred = kept.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            filled.alpha_composite(blurred)
    return filled.convert("RGB")


def mask_crop_region(mask: Image.Image, padding: int, width: int, height: int) -> tuple[int, int, int, int] | None:
    """"Only masked" inpainting: the box (x1, y1, x2, y2) around the mask's nonzero pixels grown by `padding`, then
    widened along one axis to the aspect ratio width:height (staying inside the image where possible). None when the
    mask is empty."""
    box = mask.convert("L").point(lambda v: 255 if v > 0 else 0).getbbox()
    if box is None:
        return None
    x1, y1, x2, y2 = box
    x1, y1 = max(x1 - padding, 0), max(y1 - padding, 0)
    x2, y2 = min(x2 + padding, mask.width), min(y2 + padding, mask.height)
    target = width / height
    if (x2 - x1) / (y2 - y1) > target:
        y1, y2 = _grow(y1, y2, (x2 - x1) / target, mask.height)
    else:
        x1, x2 = _grow(x1, x2, (y2 - y1) * target, mask.width)
    return x1, y1, x2, y2


def _grow(start: int, end: int, length: float, limit: int) -> tuple[int, int]:
    """Widen [start, end) symmetrically to `length` (the extra pixels rounded down, as A1111), shifted back inside
    [0, limit) when it overflows."""
    extra = int(length - (end - start))
    start, end = start - extra // 2, end + extra - extra // 2
    if start < 0:
        start, end = 0, end - start
    if end > limit:
        start, end = max(start - (end - limit), 0), limit
    return start, end


def image_grid(images: list[Image.Image], rows: int | None = None) -> Image.Image:
    """All images on one sheet, round(sqrt(n)) rows by default (A1111's grid)."""
    rows = min(rows or max(1, round(math.sqrt(len(images)))), len(images))
    cols = math.ceil(len(images) / rows)
    width, height = images[0].size
    grid = Image.new("RGB", (cols * width, rows * height), "black")
    for i, image in enumerate(images):
        grid.paste(image, ((i % cols) * width, (i // cols) * height))
    return grid


def filename_part(text: str) -> str:
    """A prompt as a file-name part: forbidden characters replaced by `_`, lone surrogates (undecodable argv bytes)
    by U+FFFD, trimmed to 128 characters."""
    return _INVALID_FILENAME_CHARS.sub("_", clean_text(text)).strip(" .")[:MAX_FILENAME_PART].strip(" .")


def next_sequence_number(directory: str, prefix: str = "") -> int:
    """One more than the largest `NNNNN` leading a file name (after `prefix`) in the folder, or 0."""
    largest = -1
    if os.path.isdir(directory):
        for name in os.listdir(directory):
            match = re.match(re.escape(prefix) + r"(\d+)", name)
            if match:
                largest = max(largest, int(match.group(1)))
    return largest + 1


def save_png(image: Image.Image, path: str, infotext: str | None = None) -> str:
    """Write a PNG with the infotext in its `parameters` text chunk, atomically: to a temporary file in the same
    folder, then renamed over `path`, so a reader never sees half a file and an interrupted write leaves none."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    info = PngImagePlugin.PngInfo()
    if infotext is not None:
        info.add_text("parameters", infotext)
    with atomic_write(path) as file:
        image.save(file, format="PNG", pnginfo=info)
    return path


def read_infotext(path: str | os.PathLike) -> str | None:
    """The `parameters` text of a PNG written by A1111 or by this package, or None; ImageError naming the file.

    Only the header and text chunks are read, never the pixels; PIL's own limits refuse the hostile cases: a text
    chunk that inflates beyond PngImagePlugin.MAX_TEXT_CHUNK (ValueError) and an image claiming more pixels than
    Image.MAX_IMAGE_PIXELS (PIL only warns below twice that; here the warning is an error too)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ImageError(f"image not found: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                return image.info.get("parameters")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as error:
        raise ImageError(f"cannot read image {path}: {error}") from None
