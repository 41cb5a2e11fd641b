"""python -m benchmarks.data_stream — training batches per second from webdataset shards: the offset reader
(train.data index + train.buckets batches) against the streaming reader (train.streaming), same shards, same batches.

    python -m benchmarks.data_stream [--shards 8] [--per-shard 64] [--size 256] [--batch 8] [--workers 0 2]
                                     [--buffer 256] [--folder DIR]

Writes `--shards` img2dataset-style shards of JPEGs (--size px on the long side, three aspect ratios) to --folder (a
temporary folder by default), then for each --workers count reads one epoch's worth of batches at --size resolution
with each reader. Printed per reader: the start-up time (the offset reader indexes and checks every image first; the
streaming reader fills its shuffle buffer), batches' images/s after the first batch, and images/s overall.
"""
import argparse
import io
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from train.buckets import TrainingData, batch_loader
from train.config import Preprocessing
from train.data import SkipReport, scan, source_items
from train.streaming import StreamLoader, StreamSpec, stream_shards


def write_shards(folder: Path, shards: int, per_shard: int, size: int) -> str:
    """Shards of JPEG photos-like images (smooth gradients with noise, quality 90); returns their brace range."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    shapes = [(size, size), (size, size * 3 // 4), (size * 3 // 4, size)]
    for s in range(shards):
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tar:
            for n in range(per_shard):
                width, height = shapes[n % len(shapes)]
                ramp = np.linspace(0, 255, width)[None, :, None] * rng.random(3)
                pixels = np.clip(ramp + rng.normal(0, 12, (height, width, 3)), 0, 255).astype(np.uint8)
                image = io.BytesIO()
                Image.fromarray(pixels).save(image, "JPEG", quality=90)
                for extension, data in (("jpg", image.getvalue()), ("txt", f"image {s} {n}".encode())):
                    info = tarfile.TarInfo(f"{s:05d}{n:04d}.{extension}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(folder / f"{{00000..{shards - 1:05d}}}.tar")


def offset_reader(pattern: str, prep: Preprocessing, batch: int, batches: int, workers: int) -> tuple[float, list]:
    """(start-up seconds, times at which each batch arrived) of train.data's index + train.buckets' loader."""
    started = time.perf_counter()
    report = SkipReport()
    items = scan(source_items(pattern, "webdataset", report), report, 64, prep.max_image_pixels, verify=False)
    data = TrainingData(items, prep, report, seed=0)
    order = [(0, b) for b in data.batches(0, batch, drop_last=True)][:batches]
    ready = time.perf_counter() - started
    arrivals = []
    for _ in batch_loader(data, order, workers):
        arrivals.append(time.perf_counter() - started)
    return ready, arrivals


def streaming_reader(pattern: str, prep: Preprocessing, batch: int, batches: int, workers: int,
                     buffer: int) -> tuple[float, list]:
    started = time.perf_counter()
    loader = StreamLoader(StreamSpec(stream_shards(pattern), prep, batch, seed=0, buffer_size=buffer),
                          num_workers=workers)
    arrivals = []
    for _ in loader:
        arrivals.append(time.perf_counter() - started)
        if len(arrivals) == batches:
            break
    return 0.0, arrivals


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.data_stream", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=8, help="shards to write (default 8)")
    parser.add_argument("--per-shard", type=int, default=64, help="images per shard (default 64)")
    parser.add_argument("--size", type=int, default=256, help="image long side and training resolution (default 256)")
    parser.add_argument("--batch", type=int, default=8, help="batch size (default 8)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="data-loader worker counts (0 2)")
    parser.add_argument("--buffer", type=int, default=256, help="streaming shuffle buffer per reader (default 256)")
    parser.add_argument("--folder", help="where to write the shards (default: a temporary folder)")
    args = parser.parse_args(argv)
    if min(args.shards, args.per_shard, args.size, args.batch) < 1 or min(args.workers) < 0:
        parser.error("--shards, --per-shard, --size and --batch must be >= 1 and --workers >= 0")
    if args.shards < max(1, *args.workers):
        parser.error(f"--shards {args.shards} cannot feed {max(args.workers)} streaming workers: give more shards")

    with tempfile.TemporaryDirectory() as temporary:
        pattern = write_shards(Path(args.folder or temporary), args.shards, args.per_shard, args.size)
        prep = Preprocessing(resolution=args.size, bucket_step=32, bucket_min_size=args.size // 2,
                             bucket_max_size=args.size * 2)
        # Both readers deliver the same number of batches: what the offset reader's epoch holds with drop_last.
        report = SkipReport()
        items = scan(source_items(pattern, "webdataset", report), report, 64, prep.max_image_pixels, verify=False)
        batches = len(TrainingData(items, prep, report, seed=0).batches(0, args.batch, drop_last=True))
        print(f"{args.shards} shards × {args.per_shard} JPEGs, {args.size} px, batch {args.batch}, {batches} batches")
        print("| reader | workers | start-up s | img/s after the first batch | img/s overall |")
        print("| --- | --- | --- | --- | --- |")
        for workers in args.workers:
            for name, run in (("offset", lambda: offset_reader(pattern, prep, args.batch, batches, workers)),
                              ("streaming", lambda: streaming_reader(pattern, prep, args.batch, batches, workers,
                                                                     args.buffer))):
                ready, arrivals = run()
                steady = (len(arrivals) - 1) * args.batch / (arrivals[-1] - arrivals[0]) if len(arrivals) > 1 \
                    else float("nan")
                print(f"| {name} | {workers} | {ready:.2f} | {steady:.1f} | "
                      f"{len(arrivals) * args.batch / arrivals[-1]:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
