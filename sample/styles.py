"""A1111 prompt styles: named prompt / negative-prompt snippets from a `styles.csv` (columns name, prompt,
negative_prompt), merged into the prompts before generation."""
import csv
import os
from dataclasses import dataclass

from ldm.files import atomic_write

COLUMNS = ("name", "prompt", "negative_prompt")


@dataclass(frozen=True)
class Style:
    name: str
    prompt: str = ""
    negative_prompt: str = ""


def load_styles(path: str | os.PathLike) -> dict[str, Style]:
    """name -> Style from an A1111 styles.csv."""
    with open(path, newline="", encoding="utf-8-sig") as file:
        rows = list(csv.DictReader(file))
    if rows and "name" not in rows[0]:
        raise ValueError(f"{path}: expected the columns name, prompt, negative_prompt; found {list(rows[0])}")
    return {row["name"]: Style(row["name"], row.get("prompt") or "", row.get("negative_prompt") or "")
            for row in rows}


def save_styles(path: str | os.PathLike, styles: dict[str, Style]) -> None:
    """Writes `styles` as an A1111 styles.csv (its columns, UTF-8 with the BOM A1111 writes), atomically."""
    with atomic_write(path, "w", encoding="utf-8-sig", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=COLUMNS)
        writer.writeheader()
        for style in styles.values():
            writer.writerow({"name": style.name, "prompt": style.prompt, "negative_prompt": style.negative_prompt})


def merge_prompt(style_text: str, prompt: str) -> str:
    """A style containing `{prompt}` wraps the prompt; otherwise it is appended after `, ` (A1111's rule)."""
    if "{prompt}" in style_text:
        return style_text.replace("{prompt}", prompt)
    return ", ".join(part for part in (prompt.strip(), style_text.strip()) if part)


def apply_styles(prompt: str, negative_prompt: str, names: list[str],
                 styles: dict[str, Style]) -> tuple[str, str]:
    """(prompt, negative prompt) with the named styles merged in order; an unknown name raises KeyError listing
    the known ones."""
    for name in names:
        if name not in styles:
            raise KeyError(f"unknown style {name!r}; known styles: {', '.join(styles) or 'none'}")
        prompt = merge_prompt(styles[name].prompt, prompt)
        negative_prompt = merge_prompt(styles[name].negative_prompt, negative_prompt)
    return prompt, negative_prompt
