"""Image files on disk: which files count as images, and the prompt an image file carries.

The one home of both facts for every package that lists or labels image folders (training sources, the metrics, the
shapes judge, the human-evaluation store). It sits in `sample` because `sample` writes these files (PNG infotexts)
and every other package may import it without `train` and `metrics` importing each other.

Prompt of an image file, in this order (the first that exists and is not blank wins):
1. a `.txt` file of the same name beside the image: the caption a person or a captioning tool wrote (kohya and
   img2dataset captions, a relabelled copy of an image), and the caption `train` reads for the same image;
2. the PNG's A1111 infotext (`parameters` text chunk): what the generator was asked for.
A text whose last line holds A1111's parameters (`Steps: …`) is an infotext and gives the prompt part of it, so a `.txt`
holding a whole infotext (A1111's "create a text file next to every image with generation parameters") gives its
prompt; any other text is the prompt itself (a caption such as "style: ink, mood: calm, light: dusk" stays whole).
"""
import os
from pathlib import Path

from .images import read_infotext
from .infotext import parse_infotext

# Every extension PIL reads that image folders use in practice; compared lower-case.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def is_image_file(path: str | os.PathLike) -> bool:
    """Whether `path` names an image by its extension (the file itself is not opened)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def list_images(folder: str | os.PathLike) -> list[Path]:
    """The image files directly inside `folder`, sorted by name (subfolders are not searched)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    return sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p))


def read_prompt(path: str | os.PathLike) -> str | None:
    """The prompt of an image file: its `.txt` caption, else its PNG infotext (see the module docstring), else None.
    Raises sample.images.ImageError when the image is missing or unreadable."""
    path = Path(path)
    caption = path.with_suffix(".txt")
    text = caption.read_text(encoding="utf-8") if caption.is_file() else None
    if text is None or not text.strip():
        text = read_infotext(path)
    if text is None or not text.strip():
        return None
    fields = parse_infotext(text)
    return (fields["Prompt"] if "Steps" in fields else text).strip() or None
