"""From checked items to batches: aspect-ratio buckets, crops and flips, caption augmentation, and the dataset that
builds each epoch's batches.

Every random choice of a sample (crop, flip, caption shuffle and dropout) comes from a generator seeded by
(seed, epoch, slot), and the batch order from one seeded by (seed, epoch), so any batch can be rebuilt from its index
alone: that is what makes resuming exact and lets data-loader workers run in any order.
"""
import logging
import math
import random
from collections import defaultdict
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image, ImageOps

from .config import Preprocessing
from .data import Item, SkipImage, SkipReport, load_rgb

log = logging.getLogger("train.data")

# ----------------------------------------------------------------------------------------------------------------------
# Aspect-ratio buckets (kohya's scheme)


def make_buckets(resolution: int, step: int = 64, min_size: int = 256, max_size: int = 1024) -> list[tuple[int, int]]:
    """(width, height) buckets: both sides multiples of `step` within [min_size, max_size], area ≤ resolution², as
    large as that allows, plus the square. Sorted."""
    max_area = resolution * resolution
    min_size = max(step, min(min_size, resolution) // step * step)
    max_size = max(max_size, resolution)
    side = resolution // step * step
    buckets = {(side, side)}
    for width in range(min_size, max_size + 1, step):
        height = min(max_size, max_area // width // step * step)
        if height >= min_size:
            buckets.update({(width, height), (height, width)})
    return sorted(buckets)


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to the image's (compared in log space, so 2:1 and 1:2 are as far
    from 1:1); ties go to the first bucket in sorted order."""
    log_ratio = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - log_ratio))


def no_upscale_bucket(size: tuple[int, int], resolution: int, step: int) -> tuple[int, int]:
    """kohya's bucket_no_upscale: the image's own size, scaled down to area ≤ resolution² if larger, each side
    rounded down to a multiple of `step` (so images are only ever shrunk)."""
    width, height = size
    scale = min(1.0, math.sqrt(resolution * resolution / (width * height)))
    return (max(step, int(width * scale) // step * step), max(step, int(height * scale) // step * step))


def item_bucket(size: tuple[int, int], prep: Preprocessing, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The (width, height) bucket of an image of displayed `size`: the square when bucketing is off, else by
    prep.bucket_no_upscale, else the nearest of `buckets` (make_buckets of prep)."""
    if not prep.bucket:
        square = prep.resolution // prep.bucket_step * prep.bucket_step
        return square, square
    if prep.bucket_no_upscale:
        return no_upscale_bucket(size, prep.resolution, prep.bucket_step)
    return nearest_bucket(size, buckets)


# ----------------------------------------------------------------------------------------------------------------------
# Per-sample preprocessing


def sample_rng(seed: int, epoch: int, slot: int) -> random.Random:
    # Seeding random.Random with a string hashes it with SHA-512: stable across processes and Python runs.
    return random.Random(f"sample/{seed}/{epoch}/{slot}")


def process_caption(caption: str, keep_tokens: int, shuffle: bool, dropout: float, rng: random.Random) -> str:
    """kohya's caption augmentation: with probability `dropout` the caption becomes "" (for classifier-free
    guidance); else the comma-separated tags after the first `keep_tokens` are shuffled when `shuffle`."""
    if dropout and rng.random() < dropout:
        return ""
    if not shuffle:
        return caption
    tags = [t.strip() for t in caption.split(",") if t.strip()]
    fixed, rest = tags[:keep_tokens], tags[keep_tokens:]
    rng.shuffle(rest)
    return ", ".join(fixed + rest)


def crop_geometry(size: tuple[int, int], bucket: tuple[int, int], random_crop: bool,
                  rng: random.Random | None) -> tuple[tuple[int, int], int, int]:
    """((resized width, height), top, left): the image is scaled to cover the bucket, then cropped at (top, left)."""
    bucket_w, bucket_h = bucket
    width, height = size
    scale = max(bucket_w / width, bucket_h / height)
    resized_w, resized_h = max(bucket_w, round(width * scale)), max(bucket_h, round(height * scale))
    if random_crop:
        top, left = rng.randint(0, resized_h - bucket_h), rng.randint(0, resized_w - bucket_w)
    else:
        top, left = (resized_h - bucket_h) // 2, (resized_w - bucket_w) // 2
    return (resized_w, resized_h), top, left


def crop_to_bucket(image: Image.Image, bucket: tuple[int, int], random_crop: bool, flip: bool,
                   rng: random.Random | None) -> tuple[torch.Tensor, tuple[int, int]]:
    """Resize so the image covers the bucket, crop to it, maybe flip.

    Returns (pixels [3, h, w] in [-1, 1], crop_top_left (top, left) in the resized image, SDXL's convention;
    after a flip, left is measured in the flipped image).
    """
    (resized_w, resized_h), top, left = crop_geometry(image.size, bucket, random_crop, rng)
    if (resized_w, resized_h) != image.size:
        image = image.resize((resized_w, resized_h), Image.Resampling.LANCZOS)
    bucket_w, bucket_h = bucket
    image = image.crop((left, top, left + bucket_w, top + bucket_h))
    if flip and rng.random() < 0.5:
        image = ImageOps.mirror(image)
        left = resized_w - left - bucket_w
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)  # [3, h, w] uint8
    return pixels.float() / 127.5 - 1.0, (top, left)


# ----------------------------------------------------------------------------------------------------------------------
# The dataset


class TrainingData:
    """Checked items with their buckets; builds each epoch's batches and loads samples.

    A *slot* is one occurrence of an item in an epoch (an item with repeats=N has N slots). Batches are lists of
    slots whose items share a bucket.
    """

    def __init__(self, items: list[Item], prep: Preprocessing, report: SkipReport, seed: int, token: str = "",
                 hint_files: bool = False, hint_function: Callable[[torch.Tensor], torch.Tensor] | None = None):
        """`token`: the textual-inversion word that `{token}` in prep.caption_template stands for. Control images
        for ControlNet training (samples' "hint" [3, h, w] in [0, 1]) come from each item's `conditioning` (a file,
        or a member of its shard), cropped and flipped exactly as its image, with `hint_files`; or from
        `hint_function`(pixels [3, h, w] in [-1, 1]) applied to the cropped image."""
        if not items:
            raise ValueError(f"no usable training images ({report.summary()})")
        self.items, self.prep, self.report, self.seed, self.token = items, prep, report, seed, token
        self.hint_files, self.hint_function = hint_files, hint_function
        buckets = make_buckets(prep.resolution, prep.bucket_step, prep.bucket_min_size, prep.bucket_max_size)
        self.buckets = [item_bucket(item.size, prep, buckets) for item in items]
        self.slots = [i for i, item in enumerate(items) for _ in range(item.repeats)]
        # With a latent cache the pixels are not needed: only captions and size conditions are loaded.
        self.skip_pixels = False
        self.failed: set[int] = set()

    def batches(self, epoch: int, batch_size: int, drop_last: bool) -> list[list[int]]:
        """The epoch's batches of slots: slots shuffled within each bucket, cut into batches, batches shuffled."""
        rng = random.Random(f"batches/{self.seed}/{epoch}")
        by_bucket = defaultdict(list)
        for slot, item_index in enumerate(self.slots):
            by_bucket[self.buckets[item_index]].append(slot)
        batches = []
        for bucket in sorted(by_bucket):
            slots = by_bucket[bucket]
            rng.shuffle(slots)
            for start in range(0, len(slots), batch_size):
                batch = slots[start:start + batch_size]
                if len(batch) == batch_size or not drop_last:
                    batches.append(batch)
        rng.shuffle(batches)
        return batches

    def caption(self, item: Item, rng: random.Random) -> str:
        text = process_caption(item.caption, self.prep.keep_tokens, self.prep.caption_shuffle,
                               self.prep.caption_dropout, rng)
        return self.caption_text(text, self.prep.caption_template, self.token)

    @staticmethod
    def caption_text(caption: str, template: str, token: str) -> str:
        """The caption put into `template` ({caption}, {token}); a dangling ", " left by an empty caption goes."""
        if not template:
            return caption
        return " ".join(template.format(caption=caption, token=token).split()).strip(" ,")

    def load(self, slot: int, epoch: int) -> dict | None:
        """One sample {"pixels" [3, h, w], "caption", "original_size" (h, w), "crop_top_left", "target_size",
        "weight", "item"}; None (counted and logged once per image) when the image fails to load."""
        item_index = self.slots[slot]
        item = self.items[item_index]
        if item_index in self.failed:
            return None
        rng = sample_rng(self.seed, epoch, slot)
        caption = self.caption(item, rng)
        bucket = self.buckets[item_index]
        sample = {"caption": caption, "target_size": (bucket[1], bucket[0]), "weight": item.loss_weight,
                  "item": item_index}
        if self.skip_pixels:
            _, top, left = crop_geometry(item.size, bucket, False, None)
            return {**sample, "original_size": (item.size[1], item.size[0]), "crop_top_left": (top, left)}
        try:
            image = load_rgb(item.read_bytes(), self.prep.max_image_pixels)
        except (SkipImage, OSError) as e:
            self.failed.add(item_index)
            self.report.add("failed to load", item.key, str(e))
            log.warning("skipping %s: it failed to load (%s)", item.key, e)
            return None
        geometry = rng.getstate()  # the crop and flip draws, replayed for the control image
        pixels, crop = crop_to_bucket(image, bucket, self.prep.random_crop, self.prep.flip, rng)
        sample = {**sample, "pixels": pixels, "original_size": (image.height, image.width), "crop_top_left": crop}
        if self.hint_function is not None:
            sample["hint"] = self.hint_function(pixels)
        elif self.hint_files:
            try:
                control = load_rgb(item.read_conditioning(), self.prep.max_image_pixels)
            except (SkipImage, OSError) as e:
                self.failed.add(item_index)
                self.report.add("control image failed to load", item.key, str(e))
                log.warning("skipping %s: its control image failed to load (%s)", item.key, e)
                return None
            if control.size != image.size:
                self.failed.add(item_index)
                self.report.add("control image size differs", item.key, f"{control.size} vs {image.size}")
                log.warning("skipping %s: its control image is %s, the image %s", item.key, control.size, image.size)
                return None
            replay = random.Random()
            replay.setstate(geometry)
            hint, _ = crop_to_bucket(control, bucket, self.prep.random_crop, self.prep.flip, replay)
            sample["hint"] = (hint + 1) / 2
        return sample

    def load_batch(self, slots: list[int], epoch: int) -> dict:
        """The samples of `slots`, collated. A slot whose image fails to load is replaced by the next loadable slot
        of the same bucket (a deterministic choice), so a batch keeps its size: every DDP rank then holds an equal
        share, and an epoch never stops on a bad file."""
        samples = []
        for slot in slots:
            sample = self.load(slot, epoch)
            if sample is None:
                sample = self._replacement(slot, epoch)
            samples.append(sample)
        return collate(samples)

    def _replacement(self, slot: int, epoch: int) -> dict:
        bucket = self.buckets[self.slots[slot]]
        same_bucket = [s for s in range(len(self.slots)) if self.buckets[self.slots[s]] == bucket]
        start = same_bucket.index(slot)
        for candidate in same_bucket[start + 1:] + same_bucket[:start]:
            sample = self.load(candidate, epoch)
            if sample is not None:
                return sample
        raise ValueError(f"every image of the {bucket[0]}x{bucket[1]} bucket failed to load "
                         f"({self.report.summary()})")


def collate(samples: list[dict]) -> dict:
    batch = {key: [s[key] for s in samples] for key in samples[0] if key not in ("pixels", "hint")}
    for key in ("pixels", "hint"):
        if key in samples[0]:
            batch[key] = torch.stack([s[key] for s in samples])  # [B, 3, h, w]
    batch["weight"] = torch.tensor(batch["weight"], dtype=torch.float32)
    return batch


class BatchList(torch.utils.data.Dataset):
    """Map-style view of a list of (epoch, slots) batches, for torch's DataLoader (batch_size=None)."""

    def __init__(self, data: TrainingData, batches: list[tuple[int, list[int]]]):
        self.data, self.batches = data, batches

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, index: int) -> dict:
        epoch, slots = self.batches[index]
        return self.data.load_batch(slots, epoch)


def _identity(x):
    return x


def _ignore_sigint(worker_id: int) -> None:
    # Ctrl-C reaches the whole process group; the main process saves a checkpoint and stops the loader itself.
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def batch_loader(data: TrainingData, batches: list[tuple[int, list[int]]], num_workers: int):
    return torch.utils.data.DataLoader(BatchList(data, batches), batch_size=None, shuffle=False,
                                       num_workers=num_workers, collate_fn=_identity,
                                       worker_init_fn=_ignore_sigint if num_workers else None,
                                       prefetch_factor=2 if num_workers else None)
