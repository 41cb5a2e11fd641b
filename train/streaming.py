"""Streaming webdataset shards (LAION scale) with a position that resumes exactly.

The offset reader (train.data.webdataset_items) indexes every shard's tar headers up front and reads images by random
access; that needs every shard on a local disk and a scan of them all before the first step. This reader never seeks:
each shard is read once from start to end through an *opener* (a local file here; any URL scheme whose opener is
registered with `register_opener`, e.g. an HTTP or object-store client), so thousands of remote shards stream.

One *reader* per rank × DataLoader worker (reader = rank · num_workers + worker, R readers in all):

    the epoch's shards: all of them shuffled by (seed, epoch), dealt round-robin (reader r gets shards r, r+R, ...)
    → samples of each shard in file order
    → a shuffle buffer of `buffer_size` samples (encoded): when full, a seeded draw picks the sample that leaves
    → decoded, checked (unusable ones skipped and counted), cropped to its aspect-ratio bucket
    → per-bucket buffers: a sample waits in its aspect-ratio bucket until `batch_size` of that bucket are there
    → a batch (one bucket, so the pixels stack).

Readers never stop: after its last shard of epoch e a reader goes on with its shards of epoch e + 1 (the buffers carry
over), so every rank always has a next batch and DDP never waits on a rank that ran dry.

Position: every batch carries its reader's state *after* it, a replayable description rather than pixels: the epoch,
the shard and sample offset read up to, the number of shuffle draws made, and the samples waiting in the buffers as
references (shard number, sample index in the shard, epoch). Each shuffle draw and each sample's augmentation is a
pure function of its counter or reference, so a restored reader (which re-reads the referenced samples) continues
with the very batches an uninterrupted run would have made: no sample repeated, none skipped. `StreamLoader` keeps the
state of the last batch it handed out from each of its readers; that dict is what a checkpoint stores.

torch's DataLoader takes batches from its workers in turn (worker 0, 1, ..., 0, ...). A loader resumed after n
batches rotates its workers by n mod num_workers, so the next batch again comes from the reader whose turn it is.
"""
import logging
import os
import random
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import BinaryIO

import torch

from .buckets import TrainingData, _identity, _ignore_sigint, collate, crop_to_bucket, item_bucket, make_buckets, \
    process_caption
from .config import Preprocessing
from .data import SkipImage, SkipReport, _expand_braces, _split_key, displayed_size, load_rgb, open_image, \
    read_caption, shard_image_field, webdataset_shards

log = logging.getLogger("train.data")

# ----------------------------------------------------------------------------------------------------------------------
# Shard lists and openers

Opener = Callable[[str], BinaryIO]
OPENERS: dict[str, Opener] = {}


def register_opener(scheme: str, opener: Opener) -> None:
    """Read shards named `scheme://...` with `opener(url)`, which returns a binary file object read front to back
    (e.g. an HTTP response body). Register before the loader starts its workers (with the "spawn" start method,
    register at import time of a module the workers import too)."""
    OPENERS[scheme] = opener


def open_shard(url: str, openers: dict[str, Opener]) -> BinaryIO:
    scheme, sep, _ = url.partition("://")
    if not sep or scheme == "file":
        return open(url[len("file://"):] if sep else url, "rb")
    if scheme not in openers:
        raise ValueError(f"no opener for {scheme}:// shards ({url}); register one with "
                         f"train.streaming.register_opener({scheme!r}, fn) where fn(url) returns a binary file object")
    return openers[scheme](url)


def stream_shards(spec: str) -> list[str]:
    """The shards a streaming data spec names: a brace range (`shards/{00000..09999}.tar`, `s3://b/{0..9}.tar`), a
    text file listing one path, URL or brace range a line (blank lines and `#` comments skipped), a folder (its
    *.tar), a glob, or one .tar. Local paths must exist; URLs are opened only when read."""
    if os.path.isfile(spec) and not spec.lower().endswith(".tar"):
        with open(spec, encoding="utf-8") as f:
            lines = [line.strip() for line in f]
        patterns = [line for line in lines if line and not line.startswith("#")]
        if not patterns:
            raise ValueError(f"the shard list {spec} names no shards")
    elif "://" in spec or "{" in spec:
        patterns = [spec]
    else:
        return webdataset_shards(spec)
    shards = [name for pattern in patterns for name in _expand_braces(pattern)]
    missing = [name for name in shards if "://" not in name and not os.path.isfile(name)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of the {len(shards)} shards of {spec} do not exist (first: "
                                f"{missing[0]}); fix the list or the brace range")
    return shards


def shard_samples(url: str, openers: dict[str, Opener]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {field: bytes}) per sample of one shard, read as a stream (tar mode "r|": no seeking)."""
    with open_shard(url, openers) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
        current, fields = None, {}
        for member in tar:
            if not member.isfile():
                continue
            key, extension = _split_key(member.name)
            if key != current and current is not None:
                yield current, fields
                fields = {}
            current = key
            fields[extension] = tar.extractfile(member).read()
        if current is not None:
            yield current, fields


# ----------------------------------------------------------------------------------------------------------------------
# One reader


@dataclass
class ReaderState:
    """Where a reader stands (see the module docstring). A reference is [shard number in the full list, sample
    index in that shard, epoch]; `pending` maps a bucket "WxH" to the references waiting in it."""
    epoch: int = 0
    shard: int = 0        # position in this reader's shard list of `epoch`
    offset: int = 0       # samples of that shard already read
    draws: int = 0        # shuffle-buffer draws made so far
    buffer: list = field(default_factory=list)
    pending: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)  # samples skipped so far by reason (SkipReport counts)


@dataclass
class StreamSpec:
    """What every reader of a run shares (picklable, handed to DataLoader workers)."""
    shards: list[str]
    prep: Preprocessing
    batch_size: int
    seed: int
    buffer_size: int = 1000
    min_image_size: int = 64
    token: str = ""
    openers: dict = field(default_factory=dict)  # scheme -> opener, besides those given to register_opener


class ShardReader:
    """Batches of one reader, each with the reader's state after it."""

    def __init__(self, spec: StreamSpec, reader: int, readers: int, state: ReaderState):
        self.spec, self.reader, self.readers, self.state = spec, reader, readers, state
        # Counted here, in the worker process; the counts travel to the main process with each batch's state.
        self.report = SkipReport()
        self.report.counts.update(state.skipped)
        prep = spec.prep
        self.buckets = make_buckets(prep.resolution, prep.bucket_step, prep.bucket_min_size, prep.bucket_max_size)

    def epoch_shards(self, epoch: int) -> list[int]:
        order = list(range(len(self.spec.shards)))
        random.Random(f"stream-shards/{self.spec.seed}/{epoch}").shuffle(order)
        return order[self.reader::self.readers]

    def _read(self) -> Iterator[tuple[list[int], str, dict]]:
        """(reference, key, fields) of every sample from the state's position on, forever; the state's epoch,
        shard and offset always point just past the sample last yielded."""
        state = self.state
        while True:
            fresh, read_this_epoch = state.shard == 0 and state.offset == 0, 0
            for position, shard in enumerate(self.epoch_shards(state.epoch)):
                if position < state.shard:
                    continue
                start = state.offset
                for index, (key, fields) in enumerate(self._shard(shard)):
                    if index < start:
                        continue
                    state.offset = index + 1
                    read_this_epoch += 1
                    yield [shard, index, state.epoch], key, fields
                state.shard, state.offset = position + 1, 0
            if fresh and read_this_epoch == 0:
                raise ValueError(f"reader {self.reader} read no sample from its shards in epoch {state.epoch} "
                                 f"({self.report.summary()})")
            state.epoch, state.shard, state.offset = state.epoch + 1, 0, 0

    def _shard(self, shard: int) -> Iterator[tuple[str, dict]]:
        url = self.spec.shards[shard]
        try:
            yield from shard_samples(url, self.spec.openers)
        except (tarfile.TarError, OSError) as e:
            # A damaged or unreachable shard costs its remaining samples, not the run (counted, logged once).
            self.report.add("unreadable shard", url, f"{type(e).__name__}: {e}")
            log.warning("skipping the rest of %s: %s", url, e)

    def _fetch(self, references: list[list[int]]) -> list[tuple[list[int], str, dict]]:
        """(reference, key, fields) of saved references, re-read shard by shard, in the saved order."""
        wanted: dict[int, dict[int, list[int]]] = {}
        for n, (shard, index, _) in enumerate(references):
            wanted.setdefault(shard, {}).setdefault(index, []).append(n)
        found: list = [None] * len(references)
        for shard, indices in wanted.items():
            last = max(indices)
            for index, (key, fields) in enumerate(self._shard(shard)):
                for n in indices.get(index, ()):
                    found[n] = (references[n], key, fields)
                if index == last:
                    break
        return [sample for sample in found if sample is not None]  # None: its shard is no longer readable

    def _prepare(self, reference: list[int], key: str, fields: dict, report: SkipReport) -> dict | None:
        """A training sample as TrainingData.load makes it, plus "key" and "reference"; None (counted in `report`)
        when the sample cannot be trained on. Augmentation is seeded by (seed, epoch, key)."""
        prep, shard_key = self.spec.prep, f"{os.path.basename(self.spec.shards[reference[0]])}/{key}"
        image_field = shard_image_field(fields)
        if image_field is None:
            report.add("no image in sample", shard_key)
            return None
        caption = ""
        if "txt" in fields:
            caption, utf8 = read_caption(fields["txt"])
            if not utf8:
                report.add("caption not UTF-8 (read as Windows-1252)", shard_key)
        try:
            size = displayed_size(open_image(fields[image_field], prep.max_image_pixels))
            if min(size) < self.spec.min_image_size:
                raise SkipImage("too small", f"{size[0]}x{size[1]} < min_image_size={self.spec.min_image_size}")
            image = load_rgb(fields[image_field], prep.max_image_pixels)
        except SkipImage as e:
            report.add(e.reason, shard_key, e.detail)
            return None
        rng = random.Random(f"stream-sample/{self.spec.seed}/{reference[2]}/{shard_key}")
        text = process_caption(caption, prep.keep_tokens, prep.caption_shuffle, prep.caption_dropout, rng)
        bucket = item_bucket(image.size, prep, self.buckets)
        pixels, crop = crop_to_bucket(image, bucket, prep.random_crop, prep.flip, rng)
        return {"caption": TrainingData.caption_text(text, prep.caption_template, self.spec.token),
                "target_size": (bucket[1], bucket[0]), "weight": 1.0, "pixels": pixels,
                "original_size": (image.height, image.width), "crop_top_left": crop, "key": shard_key,
                "reference": reference}

    def _shuffled(self) -> Iterator[tuple[list[int], str, dict]]:
        """Samples through the shuffle buffer (self.buffer, restored from the state). The buffer holds the encoded
        files, not decoded pixels: 1000 JPEGs are tens of MB, 1000 decoded 512² images 3 GB."""
        spec, state = self.spec, self.state
        for sample in self._read():
            self.buffer.append(sample)
            if len(self.buffer) < spec.buffer_size:
                continue
            pick = random.Random(f"stream-shuffle/{spec.seed}/{self.reader}/{state.draws}").randrange(
                len(self.buffer))
            state.draws += 1
            self.buffer[pick], self.buffer[-1] = self.buffer[-1], self.buffer[pick]
            yield self.buffer.pop()

    def batches(self) -> Iterator[dict]:
        """Endless collated batches of one bucket each; batch["stream"] = (reader, state after this batch)."""
        state = self.state
        self.buffer = self._fetch(state.buffer)
        pending: dict[str, list[dict]] = {}
        for bucket, references in state.pending.items():
            # Counted when first prepared (the counts came back with the state): prepared again without counting.
            prepared = (self._prepare(*sample, SkipReport()) for sample in self._fetch(references))
            pending[bucket] = [sample for sample in prepared if sample is not None]
        for raw in self._shuffled():
            sample = self._prepare(*raw, self.report)
            if sample is None:
                continue
            width, height = sample["target_size"][1], sample["target_size"][0]
            waiting = pending.setdefault(f"{width}x{height}", [])
            waiting.append(sample)
            if len(waiting) < self.spec.batch_size:
                continue
            del pending[f"{width}x{height}"]
            batch = collate([{k: v for k, v in s.items() if k != "reference"} for s in waiting])
            batch["stream"] = (self.reader, {
                "epoch": state.epoch, "shard": state.shard, "offset": state.offset, "draws": state.draws,
                "buffer": [reference for reference, _, _ in self.buffer],
                "pending": {b: [s["reference"] for s in samples] for b, samples in pending.items()},
                "skipped": dict(self.report.counts)})
            yield batch


# ----------------------------------------------------------------------------------------------------------------------
# The loader of one rank


class _ReaderDataset(torch.utils.data.IterableDataset):
    """The readers of one rank behind a DataLoader: worker w runs reader rank·W + (w + rotation) mod W."""

    def __init__(self, spec: StreamSpec, rank: int, world_size: int, num_workers: int, states: dict[int, dict],
                 rotation: int):
        super().__init__()
        self.spec, self.rank, self.world_size, self.workers = spec, rank, world_size, max(1, num_workers)
        self.states, self.rotation = states, rotation

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = (info.id if info is not None else 0) + self.rotation
        reader = self.rank * self.workers + worker % self.workers
        state = ReaderState(**self.states[reader]) if reader in self.states else ReaderState()
        return ShardReader(self.spec, reader, self.world_size * self.workers, state).batches()


class StreamLoader:
    """Endless batches of one rank, and `position()`, the state that resumes them (see the module docstring).

    `position` (from a previous `position()` of the same rank) resumes; it must come from a run with the same world
    size and num_workers, since they decide which reader reads which shard.
    """

    def __init__(self, spec: StreamSpec, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                 position: dict | None = None):
        self.spec, self.rank, self.world_size, self.num_workers = spec, rank, world_size, num_workers
        readers = world_size * max(1, num_workers)
        if len(spec.shards) < readers:
            raise ValueError(f"{len(spec.shards)} shards cannot feed {readers} readers (world size × num_workers): "
                             "every reader needs at least one shard; use fewer workers or more shards")
        position = position or {"world_size": world_size, "num_workers": num_workers, "batches": 0, "readers": {}}
        if (position["world_size"], position["num_workers"]) != (world_size, num_workers):
            raise ValueError(f"the saved data position is of {position['world_size']} process(es) × "
                             f"{position['num_workers']} data workers; resume a streaming run with the same "
                             f"(this run: {world_size} × {num_workers})")
        self.batches = position["batches"]
        self.epoch = 0  # the epoch its reader was reading when the last batch was handed out
        self.readers = {int(r): state for r, state in position["readers"].items()}

    def position(self) -> dict:
        """JSON-able description of the batches handed out so far."""
        return {"world_size": self.world_size, "num_workers": self.num_workers, "batches": self.batches,
                "readers": {str(r): state for r, state in sorted(self.readers.items())}}

    def skipped(self) -> dict[str, int]:
        """Samples this rank's readers skipped so far (in the batches handed out), by reason."""
        total = Counter()
        for state in self.readers.values():
            total.update(state["skipped"])
        return dict(total)

    def __iter__(self) -> Iterator[dict]:
        workers = max(1, self.num_workers)
        # The openers registered by now travel with the spec to the workers (a "spawn" worker starts without them).
        spec = replace(self.spec, openers={**OPENERS, **self.spec.openers})
        dataset = _ReaderDataset(spec, self.rank, self.world_size, self.num_workers, dict(self.readers),
                                 self.batches % workers)
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                                             collate_fn=_identity, worker_init_fn=_ignore_sigint if self.num_workers
                                             else None, prefetch_factor=2 if self.num_workers else None)
        for batch in loader:
            reader, state = batch.pop("stream")
            self.readers[int(reader)] = state
            self.batches += 1
            self.epoch = state["epoch"]
            yield batch
