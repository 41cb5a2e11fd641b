"""Streaming webdataset reader (train.streaming): shard lists, sharding over ranks and workers, seeded shuffling,
per-bucket batches, and a saved position that resumes exactly."""
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.checkpoint import read_state_dict
from train import train
from train.config import ConfigError, Preprocessing
from train.trainer import Trainer
from train.streaming import StreamLoader, StreamSpec, register_opener, stream_shards
from train_support import cli_args, fast_config

REPO = Path(__file__).resolve().parents[1]

SIZES = ((16, 16), (24, 16), (16, 24))
# Buckets (w, h) of 24² area at step 8: 16×16 images go to (24, 24), 24×16 to (32, 16), 16×24 to (16, 32).
PREP = Preprocessing(resolution=24, bucket_step=8, bucket_min_size=8, bucket_max_size=32)


def write_shards(folder: Path, shards: int, per_shard: int, broken: bool = True) -> list[Path]:
    """img2dataset-style shards: `<key>.png` + `<key>.txt`; with `broken`, shard 0 also holds a sample without an
    image and one whose image bytes are garbage (both must be skipped the same way every time)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for s in range(shards):
        path = folder / f"{s:05d}.tar"
        with tarfile.open(path, "w") as tar:
            def add(name: str, data: bytes):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            for n in range(per_shard):
                width, height = SIZES[(s + n) % len(SIZES)]
                png = io.BytesIO()
                Image.fromarray((rng.random((height, width, 3)) * 255).astype(np.uint8)).save(png, "PNG")
                add(f"{s:05d}{n:04d}.png", png.getvalue())
                add(f"{s:05d}{n:04d}.txt", f"shape {s} {n}".encode())
            if broken and s == 0:
                add("caption-only.txt", b"no image here")
                add("garbage.png", b"not a png")
                add("garbage.txt", b"broken")
        paths.append(path)
    return paths


def spec(shards, **overrides) -> StreamSpec:
    values = dict(shards=[str(p) for p in shards], prep=PREP, batch_size=2, seed=3, buffer_size=4, min_image_size=8)
    values.update(overrides)
    return StreamSpec(**values)


def keys(loader: StreamLoader, batches: int) -> list[list[str]]:
    out = []
    for batch in loader:
        out.append(batch["key"])
        if len(out) == batches:
            return out
    raise AssertionError("the stream ended")


def test_two_ranks_with_two_workers_resume_exactly_where_they_stopped(tmp_path):
    shards = write_shards(tmp_path, 8, 6)
    stream = spec(shards)
    total, stop = 7, 3  # stop after an odd number of batches: the resumed loader must rotate its two workers
    for rank in range(2):
        whole = keys(StreamLoader(stream, rank, 2, num_workers=2), total)
        first = StreamLoader(stream, rank, 2, num_workers=2)
        head = keys(first, stop)
        position = first.position()
        tail = keys(StreamLoader(stream, rank, 2, num_workers=2, position=position), total - stop)
        # Not only the union: the resumed run hands out the very batches, in the same order.
        assert head + tail == whole
    # 2 ranks × 7 batches × 2 = 28 of the 48 samples: within the first epoch, so nothing may repeat across ranks.
    seen = [k for rank in range(2) for batch in keys(StreamLoader(stream, rank, 2, num_workers=2), total)
            for k in batch]
    assert len(seen) == len(set(seen)) == 28
    assert not any("garbage" in k or "caption-only" in k for k in seen)
    # Shard 0's two broken samples (its last) are met by one reader of one rank within 10 batches per rank, and
    # counted once, resumed or not.
    skipped = [StreamLoader(stream, rank, 2, num_workers=2) for rank in range(2)]
    for loader in skipped:
        keys(loader, 4)
        keys(loader, 6)
    assert sum(loader.skipped().get("no image in sample", 0) for loader in skipped) == 1
    assert sum(loader.skipped().get("corrupt", 0) for loader in skipped) == 1


def test_every_sample_is_read_once_per_epoch_and_the_epochs_differ(tmp_path):
    shards = write_shards(tmp_path, 4, 5, broken=False)
    square = Preprocessing(resolution=16, bucket=False, bucket_step=8)
    all_keys = {f"{s:05d}.tar/{s:05d}{n:04d}" for s in range(4) for n in range(5)}
    # A buffer of one sample passes samples on in reading order: epoch 0 is the first 20, epoch 1 the next 20.
    seen = [k for batch in keys(StreamLoader(spec(shards, prep=square, buffer_size=1)), 20) for k in batch]
    assert set(seen[:20]) == set(seen[20:]) == all_keys
    assert seen[:20] != seen[20:]  # each epoch deals the shards in a new order
    # A buffer of 4: the first 16 samples out come from the first 19 read, all of epoch 0, in a shuffled order.
    shuffled = [k for batch in keys(StreamLoader(spec(shards, prep=square, buffer_size=4)), 8) for k in batch]
    assert len(set(shuffled)) == 16 and set(shuffled) < all_keys
    assert shuffled != [k for k in seen if k in set(shuffled)]


def test_batches_hold_one_bucket_and_all_buckets_occur(tmp_path):
    shards = write_shards(tmp_path, 3, 6, broken=False)
    sizes = set()
    for _, batch in zip(range(9), StreamLoader(spec(shards))):
        assert batch["pixels"].shape[0] == 2
        assert all(t == batch["target_size"][0] for t in batch["target_size"])
        assert tuple(batch["pixels"].shape[2:]) == batch["target_size"][0]
        sizes.add(batch["target_size"][0])
        if len(sizes) == 3:
            break
    assert sizes == {(24, 24), (16, 32), (32, 16)}  # (h, w)


def _local(url: str):
    return open(url.removeprefix("test://"), "rb")


def test_shard_lists_brace_ranges_and_registered_url_schemes(tmp_path):
    shards = write_shards(tmp_path / "shards", 3, 2, broken=False)
    assert stream_shards(str(tmp_path / "shards" / "{00000..00002}.tar")) == [str(p) for p in shards]
    listing = tmp_path / "shards.txt"
    listing.write_text(f"# three shards\n\ntest://{tmp_path}/shards/{{00000..00001}}.tar\n{shards[2]}\n")
    named = stream_shards(str(listing))
    assert named == [f"test://{shards[0]}", f"test://{shards[1]}", str(shards[2])]
    with pytest.raises(ValueError, match=r"register_opener\('test'"):
        keys(StreamLoader(spec(named)), 1)
    register_opener("test", _local)
    got = [k for batch in keys(StreamLoader(spec(named, buffer_size=1)), 3) for k in batch]
    assert sorted(got) == sorted(f"{s:05d}.tar/{s:05d}{n:04d}" for s in range(3) for n in range(2))


def test_unusable_positions_and_shard_lists_fail_with_what_to_do(tmp_path):
    shards = write_shards(tmp_path, 2, 2, broken=False)
    with pytest.raises(FileNotFoundError, match="1 of the 3 shards"):
        stream_shards(str(tmp_path / "{00000..00002}.tar"))
    with pytest.raises(ValueError, match="every reader needs at least one shard"):
        StreamLoader(spec(shards), 0, 2, num_workers=2)
    loader = StreamLoader(spec(shards), 0, 1, num_workers=0)
    keys(loader, 1)
    with pytest.raises(ValueError, match="same"):
        StreamLoader(spec(shards), 0, 1, num_workers=2, position=loader.position())


def test_streaming_training_resumes_bitwise_from_its_checkpoint(tmp_path):
    write_shards(tmp_path / "shards", 4, 4)
    options = dict(streaming=True, shuffle_buffer=3, num_workers=2, resolution=24, batch_size=2, seed=5)
    data = tmp_path / "shards" / "{00000..00003}.tar"
    straight = train(fast_config(data, tmp_path / "a", max_steps=5, **options))
    first = train(fast_config(data, tmp_path / "b", max_steps=3, **options))
    position = json.loads((first.checkpoint / "stream.json").read_text())["ranks"][0]
    assert position["batches"] == 3 and position["num_workers"] == 2
    resumed = train(fast_config(data, tmp_path / "b", max_steps=5, resume="latest", **options))
    a, b = read_state_dict(straight.weights), read_state_dict(resumed.weights)
    assert all(torch.equal(a[key], b[key]) for key in a)
    losses = [[json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
              for run in ("a", "b")]
    assert losses[0] == losses[1] and len(losses[0]) == 5
    # The skips met before the checkpoint travel in it: the resumed run reports the uninterrupted run's counts.
    assert straight.data_report == resumed.data_report
    with pytest.raises(ConfigError, match="same"):
        Trainer(fast_config(data, tmp_path / "b", max_steps=6, resume="latest", **{**options, "num_workers": 1}))
    with pytest.raises(ConfigError, match="streaming trains the methods full and lora"):
        fast_config(data, tmp_path / "c", method="textual-inversion", token="<x>", **options).validate()


@pytest.mark.slow
def test_two_process_streaming_training_resumes_bitwise(tmp_path):
    write_shards(tmp_path / "shards", 4, 4)
    config = dict(streaming=True, shuffle_buffer=3, num_workers=1, resolution=24, batch_size=1, seed=5,
                  save_every=2)
    data = tmp_path / "shards" / "{00000..00003}.tar"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}

    def torchrun(output: str, steps: int, *extra: str):
        argv = cli_args(fast_config(data, tmp_path / output, max_steps=steps, **config))
        result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                 "2", "-m", "train", *argv, *extra, "--no-progress"],
                                env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]

    torchrun("straight", 4)
    torchrun("resumed", 2)
    ranks = json.loads((tmp_path / "resumed" / "checkpoint-2" / "stream.json").read_text())["ranks"]
    assert [r["batches"] for r in ranks] == [2, 2] and set(ranks[0]["readers"]) == {"0"} \
        and set(ranks[1]["readers"]) == {"1"}  # one reader per rank: rank · num_workers + worker
    torchrun("resumed", 4, "--resume", "latest")
    a = read_state_dict(tmp_path / "straight" / "model.safetensors")
    b = read_state_dict(tmp_path / "resumed" / "model.safetensors")
    assert all(torch.equal(a[key], b[key]) for key in a)
