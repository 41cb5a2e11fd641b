"""Self-contained HTML reports: one file, images embedded as data URIs, so a report can be mailed or archived whole."""
import base64
import html
import io
import os

import torch
from PIL import Image

from ldm.files import atomic_write

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.7em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
td.number { text-align: right; font-variant-numeric: tabular-nums; }
figure { display: inline-block; margin: 0.3em; }
figure img { min-width: 160px; image-rendering: pixelated; }  /* small images enlarged without blur */
figcaption, .infotext { font-size: 0.8em; white-space: pre-wrap; max-width: 320px; color: #555; }
.note { color: #8a4b00; }
"""


def escape(value) -> str:
    return html.escape(str(value))


def image_data_uri(image: Image.Image | torch.Tensor, max_side: int = 256) -> str:
    """A PNG data URI of `image` (PIL, or a tensor [3, H, W] in [0, 1]) scaled down to at most `max_side` pixels."""
    if isinstance(image, torch.Tensor):
        pixels = (image.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
        image = Image.fromarray(pixels.permute(1, 2, 0).numpy())
    image = image.convert("RGB")
    image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def format_number(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return escape(value)


def table(header: list[str], rows: list[list]) -> str:
    """An HTML table; numbers are right-aligned and shown with 4 significant digits, everything else escaped."""
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f'<td class="number">{format_number(v)}</td>' if isinstance(v, (int, float))
                         else f"<td>{escape(v)}</td>" for v in row) + "</tr>"
        for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def figure(image, caption: str = "", max_side: int = 256) -> str:
    return (f'<figure><img src="{image_data_uri(image, max_side)}" alt="{escape(caption)}">'
            f"<figcaption>{escape(caption)}</figcaption></figure>")


def write_page(path: str | os.PathLike, title: str, body: list[str]) -> None:
    """Write an HTML page of the given body fragments atomically (a crash never leaves half a report)."""
    path = os.fspath(path)
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f"<style>{STYLE}</style></head><body><h1>{escape(title)}</h1>\n" + "\n".join(body) + "\n</body></html>\n")
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with atomic_write(path, "w", encoding="utf-8") as file:
        file.write(page)
