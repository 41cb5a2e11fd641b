"""Training data sources and image hygiene, and `python -m train.data filter|check`. What happens to the checked
items next (buckets, crops, captions, batches) is train.buckets; the on-disk latent and text caches are train.cache.

Sources (each gives a list of `Item`s, then `scan` checks every image once):

- an image folder with same-name caption files (A1111 / kohya convention): nested folders are walked; a folder named
  `N_name` repeats its images N times per epoch, and `name` is the caption of images without a caption file;
- a Hugging Face "imagefolder": `metadata.jsonl` or `metadata.csv` with `file_name` and a caption column (`text`);
- webdataset `.tar` shards as img2dataset writes them (`<key>.jpg|png|webp`, `<key>.txt`, `<key>.json`): indexed by
  reading the tar headers only, then read by offset (train.streaming streams them instead, without an index); for
  ControlNet training a sample's control image is one more member, `<key>.<conditioning_field>` (e.g.
  `000123.conditioning.png`: webdataset's field is everything after the key's first dot);
- LAION parquet metadata (see `train.laion`): restricts shard samples to the URLs a filtered parquet keeps.

Hygiene rules (counted in a `SkipReport`, never fatal):
- skipped: unreadable / corrupt / truncated images, zero-byte files, images whose shorter side is below
  `min_image_size`, images above `max_image_pixels` (decompression bombs, refused before decoding), shard samples
  without an image; with empty_captions="skip" also images whose caption is empty;
- converted: EXIF orientation applied; palette, grayscale, 16-bit, CMYK images to 8-bit RGB; transparency composited
  on white;
- captions: UTF-8 (a BOM is allowed); a file that is not valid UTF-8 is read as Windows-1252 (the usual encoding of
  hand-written caption files; undefined bytes become U+FFFD) and counted; runs of whitespace, newlines included,
  become one space; an empty or whitespace-only caption is the empty caption "" (unconditional training, as caption
  dropout does) unless empty_captions="skip".
"""
import csv
import glob
import io
import json
import os
import re
import tarfile
import threading
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from sample.imagefiles import IMAGE_EXTENSIONS

REPEAT_FOLDER = re.compile(r"^(\d+)_(.*)$")
EXIF_ORIENTATION = 0x0112
# EXIF orientations 5..8 rotate by 90 degrees, so the stored width and height swap.
TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}


class SkipImage(Exception):
    """An image that cannot be trained on; `reason` is one of the SkipReport categories."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class SkipReport:
    """Counts of skipped items (and of converted captions) by reason, with a few example keys of each."""
    counts: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=lambda: defaultdict(list))
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, reason: str, key: str, detail: str = "") -> None:
        with self._lock:
            self.counts[reason] += 1
            if len(self.examples[reason]) < 3:
                self.examples[reason].append(f"{key} ({detail})" if detail else key)

    def __getstate__(self):
        # Picklable for data-loader workers started with "spawn"; each copy gets a fresh lock.
        return {"counts": self.counts, "examples": self.examples}

    def __setstate__(self, state):
        self.counts, self.examples, self._lock = state["counts"], state["examples"], threading.Lock()

    def summary(self) -> str:
        if not self.counts:
            return "no items skipped"
        return "; ".join(f"{reason}: {n} (e.g. {', '.join(self.examples[reason])})"
                         for reason, n in sorted(self.counts.items()))


@dataclass
class Item:
    """One training image before loading. For a shard sample, `path` is the .tar and `member` the (offset, size)
    of the image bytes inside it."""
    path: str
    caption: str
    key: str
    member: tuple[int, int] | None = None
    url: str = ""
    size: tuple[int, int] = (0, 0)  # (width, height) as displayed, i.e. after the EXIF orientation
    repeats: int = 1
    loss_weight: float = 1.0
    # The item's control image (ControlNet training): a file named by an imagefolder column, or the .tar of a shard
    # sample whose control image member is at (offset, size) `conditioning_member`.
    conditioning: str = ""
    conditioning_member: tuple[int, int] | None = None

    def read_bytes(self) -> bytes:
        return _read_file_part(self.path, self.member)

    def read_conditioning(self) -> bytes:
        return _read_file_part(self.conditioning, self.conditioning_member)


def _read_file_part(path: str, member: tuple[int, int] | None) -> bytes:
    """The whole file, or the (offset, size) part of it (a member of a .tar)."""
    with open(path, "rb") as f:
        if member is None:
            return f.read()
        offset, size = member
        f.seek(offset)
        return f.read(size)


# ----------------------------------------------------------------------------------------------------------------------
# Images and captions


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Open (header only) and check the size before any pixel is decoded; raises SkipImage."""
    if not data:
        raise SkipImage("zero-size file")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise SkipImage("decompression bomb", str(e)) from None
    except Exception as e:  # PIL raises many types for damaged headers (UnidentifiedImageError, SyntaxError, ...)
        raise SkipImage("corrupt", f"{type(e).__name__}: {e}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise SkipImage("decompression bomb", f"{width}x{height} is over max_image_pixels={max_pixels}")
    if width == 0 or height == 0:
        raise SkipImage("zero-size image")
    return image


def displayed_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) once the EXIF orientation is applied, read without decoding."""
    try:
        orientation = image.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:
        orientation = 1
    width, height = image.size
    return (height, width) if orientation in TRANSPOSING_ORIENTATIONS else (width, height)


def to_rgb(image: Image.Image) -> Image.Image:
    """A decoded image as 8-bit RGB: EXIF orientation applied, transparency composited on white, 16-bit scaled."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        # 16-bit samples run 0..65535; 65535 / 257 = 255 maps white to white. Float ("F") images are taken as 0..255.
        if image.mode != "F" and values.max(initial=0) > 255:
            values = values / 257.0
        image = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def load_rgb(data: bytes, max_pixels: int) -> Image.Image:
    """Decode fully and convert to RGB; raises SkipImage for truncated or otherwise undecodable data."""
    image = open_image(data, max_pixels)
    try:
        image.load()
        return to_rgb(image)
    except OSError as e:
        reason = "truncated" if "truncated" in str(e) else "corrupt"
        raise SkipImage(reason, str(e)) from None
    except Exception as e:
        raise SkipImage("corrupt", f"{type(e).__name__}: {e}") from None


def read_caption(data: bytes) -> tuple[str, bool]:
    """(caption, was valid UTF-8) by the module's caption rule."""
    try:
        text, utf8 = data.decode("utf-8-sig"), True
    except UnicodeDecodeError:
        text, utf8 = data.decode("cp1252", errors="replace"), False
    return " ".join(text.split()), utf8


def _caption_file(path: Path, key: str, report: SkipReport) -> str | None:
    if not path.is_file():
        return None
    caption, utf8 = read_caption(path.read_bytes())
    if not utf8:
        report.add("caption not UTF-8 (read as Windows-1252)", key)
    return caption


# ----------------------------------------------------------------------------------------------------------------------
# Sources


def folder_items(root: str | os.PathLike, caption_extension: str, report: SkipReport) -> list[Item]:
    """Images under `root` (recursively, sorted) with same-name caption files; `N_name` folders repeat N times."""
    root = Path(root)
    items = []
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()):
        key = path.relative_to(root).as_posix()
        repeats, folder_caption = 1, None
        # The nearest `N_name` folder above the image decides its repeats and its fallback caption.
        for parent in path.relative_to(root).parents:
            match = REPEAT_FOLDER.match(parent.name)
            if match:
                repeats, folder_caption = int(match.group(1)), match.group(2).strip()
                break
        caption = _caption_file(path.with_suffix(caption_extension), key, report)
        items.append(Item(str(path), caption if caption is not None else (folder_caption or ""), key,
                          repeats=max(repeats, 1)))
    return items


def imagefolder_items(root: str | os.PathLike, caption_column: str, report: SkipReport,
                      conditioning_column: str = "conditioning_image") -> list[Item]:
    """Hugging Face imagefolder: every metadata.jsonl / metadata.csv under root lists `file_name` relative to its
    own folder, the caption in `caption_column` and, optionally, a control image file in `conditioning_column`
    (relative to the same folder; diffusers' ControlNet training convention)."""
    root = Path(root)
    items = []
    for meta in sorted([*root.rglob("metadata.jsonl"), *root.rglob("metadata.csv")]):
        if meta.suffix == ".jsonl":
            with open(meta, encoding="utf-8") as f:
                rows = [json.loads(line) for line in f if line.strip()]
        else:
            with open(meta, newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
        for n, row in enumerate(rows):
            if "file_name" not in row:
                raise ValueError(f"{meta} row {n + 1} has no 'file_name' column (columns: {sorted(row)})")
            path = meta.parent / row["file_name"]
            key = path.relative_to(root).as_posix()
            if not path.is_file():
                report.add("missing image file", key)
                continue
            caption = row.get(caption_column)
            control = row.get(conditioning_column)
            items.append(Item(str(path), " ".join(str(caption or "").split()), key,
                              conditioning=str(meta.parent / control) if control else ""))
    return items


def _expand_braces(pattern: str) -> list[str]:
    """webdataset's shard notation: `shard-{000..012}.tar` -> shard-000.tar ... shard-012.tar (zero padding kept)."""
    match = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if not match:
        return [pattern]
    first, last = match.group(1), match.group(2)
    width = len(first)
    return [name for n in range(int(first), int(last) + 1)
            for name in _expand_braces(pattern[:match.start()] + str(n).zfill(width) + pattern[match.end():])]


def webdataset_shards(spec: str) -> list[str]:
    """The .tar files a data spec names: a folder (its *.tar), a file, a glob, or a brace range."""
    if os.path.isdir(spec):
        return sorted(glob.glob(os.path.join(spec, "**", "*.tar"), recursive=True))
    shards = sorted(p for pattern in _expand_braces(spec) for p in glob.glob(pattern))
    if not shards:
        raise FileNotFoundError(f"no .tar shards match {spec!r}")
    return shards


def _split_key(name: str) -> tuple[str, str]:
    """webdataset's grouping: the key is the path up to the first dot of the file name, the rest is the field."""
    folder, base = os.path.split(name)
    stem, dot, extension = base.partition(".")
    return (os.path.join(folder, stem) if folder else stem), extension.lower()


def _shard_samples(shard: str) -> Iterator[tuple[str, dict[str, tarfile.TarInfo], tarfile.TarFile]]:
    """(key, {field: member}) per sample of one shard, in file order (members of a sample are adjacent)."""
    try:
        tar = tarfile.open(shard, "r:")
    except tarfile.TarError as e:
        raise ValueError(f"{shard} is not a readable .tar shard ({e}): give an image folder, an imagefolder, or "
                         "webdataset .tar shards") from None
    with tar:
        current, fields = None, {}
        for member in tar:
            if not member.isfile():
                continue
            key, extension = _split_key(member.name)
            if key != current and current is not None:
                yield current, fields, tar
                fields = {}
            current = key
            fields[extension] = member
        if current is not None:
            yield current, fields, tar


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    return tar.extractfile(member).read()


# The fields of a webdataset sample that hold its image, in order of preference (img2dataset writes one of them).
SHARD_IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")


def shard_image_field(fields: dict, conditioning_field: str | None = None) -> str | None:
    """The field of a shard sample's image; None if it has none. The control image is never the image, even when its
    field is an image extension (`<key>.png` beside a .jpg)."""
    return next((f for f in SHARD_IMAGE_FIELDS if f in fields and f != conditioning_field), None)


def _shard_item(shard: str, key: str, fields: dict, tar: tarfile.TarFile, report: SkipReport,
                conditioning_field: str) -> Item | None:
    sample_key = f"{os.path.basename(shard)}/{key}"
    image_field = shard_image_field(fields, conditioning_field)
    if image_field is None:
        report.add("no image in sample", sample_key)
        return None
    caption = ""
    if "txt" in fields:
        caption, utf8 = read_caption(_read_member(tar, fields["txt"]))
        if not utf8:
            report.add("caption not UTF-8 (read as Windows-1252)", sample_key)
    url = ""
    if "json" in fields:
        try:
            url = str(json.loads(_read_member(tar, fields["json"])).get("url") or "")
        except (ValueError, AttributeError):
            report.add("unreadable .json", sample_key)
    member, control = fields[image_field], fields.get(conditioning_field) if conditioning_field else None
    return Item(shard, caption, sample_key, member=(member.offset_data, member.size), url=url,
                conditioning=shard if control is not None else "",
                conditioning_member=(control.offset_data, control.size) if control is not None else None)


def webdataset_items(shards: list[str], report: SkipReport, conditioning_field: str = "") -> list[Item]:
    """Index shards by their tar headers; image bytes are read later by offset (no extraction). A sample's
    `<key>.<conditioning_field>` member (lower case, as fields are matched), if any, is its control image."""
    items = []
    for shard in shards:
        for key, fields, tar in _shard_samples(shard):
            item = _shard_item(shard, key, fields, tar, report, conditioning_field.lower())
            if item is not None:
                items.append(item)
    return items


def detect_format(spec: str) -> str:
    if not os.path.isdir(spec):
        return "webdataset"
    root = Path(spec)
    if any(root.rglob("metadata.jsonl")) or any(root.rglob("metadata.csv")):
        return "imagefolder"
    if any(root.rglob("*.tar")):
        return "webdataset"
    return "folder"


def source_items(spec: str, data_format: str, report: SkipReport, caption_extension: str = ".txt",
                 caption_column: str = "text", conditioning_column: str = "conditioning_image",
                 conditioning_field: str = "") -> list[Item]:
    """The items of a data spec, unchecked (see `scan`); control images from an imagefolder's `conditioning_column`
    or a shard sample's `conditioning_field` member."""
    if not os.path.exists(spec) and not any(c in spec for c in "*?[{"):
        raise FileNotFoundError(f"data {spec} does not exist: give an image folder, an imagefolder, a .tar shard, "
                                "or a shard pattern")
    if os.path.isfile(spec) and not spec.lower().endswith(".tar"):
        raise ValueError(f"data {spec} is a single file, not an image folder or a .tar shard: give the folder that "
                         "holds the images")
    data_format = detect_format(spec) if data_format == "auto" else data_format
    if data_format == "folder":
        return folder_items(spec, caption_extension, report)
    if data_format == "imagefolder":
        return imagefolder_items(spec, caption_column, report, conditioning_column)
    if data_format == "webdataset":
        return webdataset_items(webdataset_shards(spec), report, conditioning_field)
    raise ValueError(f"unknown data format {data_format!r}")


def scan(items: list[Item], report: SkipReport, min_size: int, max_pixels: int, verify: bool,
         empty_captions: str = "keep") -> list[Item]:
    """Check every item once: record its displayed size, drop (and count) the ones that cannot be trained on.

    verify=True decodes every image fully (finds truncated files now rather than during training); otherwise only
    headers are read and a bad file found later is replaced in its batch (see TrainingData.load_batch).
    """
    kept = []
    for item in items:
        if not item.caption and empty_captions == "skip":
            report.add("empty caption", item.key)
            continue
        try:
            data = item.read_bytes()
            image = load_rgb(data, max_pixels) if verify else open_image(data, max_pixels)
            width, height = image.size if verify else displayed_size(image)
        except SkipImage as e:
            report.add(e.reason, item.key, e.detail)
            continue
        except OSError as e:
            report.add("unreadable file", item.key, str(e))
            continue
        if min(width, height) < min_size:
            report.add("too small", item.key, f"{width}x{height} < min_image_size={min_size}")
            continue
        item.size = (width, height)
        kept.append(item)
    return kept



# ----------------------------------------------------------------------------------------------------------------------
# Command line: python -m train.data filter|check


def _main(argv=None) -> int:
    import argparse
    import sys
    parser = argparse.ArgumentParser(prog="python -m train.data", description="Dataset tools (nothing is downloaded).")
    commands = parser.add_subparsers(dest="command", required=True)
    f = commands.add_parser("filter", help="filter LAION parquet metadata (needs pyarrow)")
    f.add_argument("--in", dest="source", required=True, help="input .parquet")
    f.add_argument("--out", dest="destination", required=True, help="output .parquet")
    f.add_argument("--min-size", type=int, default=0, help="minimum WIDTH and HEIGHT in pixels")
    f.add_argument("--min-similarity", type=float, help="minimum CLIP image-text SIMILARITY")
    f.add_argument("--max-pwatermark", type=float, help="maximum watermark probability PWATERMARK")
    f.add_argument("--max-punsafe", type=float, help="maximum NSFW probability PUNSAFE")
    f.add_argument("--language", help="keep only this LANGUAGE code (e.g. en)")
    c = commands.add_parser("check", help="scan a data source and report what would be skipped")
    c.add_argument("--data", required=True, help="image folder, imagefolder, or .tar shards")
    c.add_argument("--data-format", default="auto", choices=("auto", "folder", "imagefolder", "webdataset"))
    c.add_argument("--metadata", default="", help="filtered LAION parquet to join shard samples with (by URL)")
    c.add_argument("--min-image-size", type=int, default=64)
    c.add_argument("--max-image-pixels", type=int, default=8192 * 8192)
    c.add_argument("--no-verify", action="store_true", help="read image headers only (faster)")
    args = parser.parse_args(argv)

    if args.command == "filter":
        from .laion import LaionFilter, filter_parquet
        spec = LaionFilter(args.min_size, args.min_similarity, args.max_pwatermark, args.max_punsafe, args.language)
        try:
            rows_in, rows_out, removed = filter_parquet(args.source, args.destination, spec)
        except (ImportError, OSError, ValueError) as e:
            parser.exit(2, f"python -m train.data filter: error: {e}\n")
        for name, count in removed:
            print(f"{name}: removed {count}")
        print(f"kept {rows_out} of {rows_in} rows -> {args.destination}")
        return 0

    report = SkipReport()
    try:
        items = source_items(args.data, args.data_format, report)
        if args.metadata:
            from .laion import join_by_url
            items = join_by_url(items, args.metadata, report)
    except (ImportError, OSError, ValueError) as e:
        parser.exit(2, f"python -m train.data check: error: {e}\n")
    kept = scan(items, report, args.min_image_size, args.max_image_pixels, verify=not args.no_verify)
    print(f"{len(kept)} usable images of {len(items)}; {report.summary()}")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
