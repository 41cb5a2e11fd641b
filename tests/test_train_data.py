"""train.data: every source, the bad-image corpus, conversions, captions, buckets, augmentation and caches."""
import io
import json
import struct
import subprocess
import sys
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from oracles import import_oracle
from train.buckets import TrainingData, make_buckets, nearest_bucket, no_upscale_bucket, process_caption
from train.cache import TensorCache
from train.config import Preprocessing
from train.data import (Item, SkipReport, folder_items, imagefolder_items, read_caption, scan,
                        source_items, webdataset_items, webdataset_shards)
from train_support import write_shard


# Tiny tensors: one thread (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


def png_bytes(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **kwargs)
    return buffer.getvalue()


def jpeg_bytes(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", **kwargs)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height, with no pixel data: what a decompression bomb looks like to a
    header reader."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + \
        chunk(b"IEND", b"")


def random_rgb(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((height, width, 3)) * 255).astype(np.uint8))


# ----------------------------------------------------------------------------------------------------------------------
# Hygiene


def test_bad_image_corpus_is_skipped_and_counted_by_reason(tmp_path):
    good = random_rgb(32, 32)
    (tmp_path / "good.png").write_bytes(png_bytes(good))
    whole = jpeg_bytes(random_rgb(64, 64, 1))
    (tmp_path / "truncated.jpg").write_bytes(whole[:len(whole) * 2 // 3])  # header intact, scan data cut
    (tmp_path / "corrupt.png").write_bytes(b"this is not an image at all" * 10)
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "small.png").write_bytes(png_bytes(random_rgb(8, 40)))
    (tmp_path / "bomb.png").write_bytes(png_header_only(100_000, 100_000))  # 10^10 px: PIL's own bomb error
    (tmp_path / "big.png").write_bytes(png_header_only(5000, 5000))  # over our max_image_pixels
    report = SkipReport()
    kept = scan(folder_items(tmp_path, ".txt", report), report, min_size=16, max_pixels=4096 * 4096, verify=True)
    assert [item.key for item in kept] == ["good.png"]
    assert report.counts == Counter({"truncated": 1, "corrupt": 1, "zero-size file": 1, "too small": 1,
                                     "decompression bomb": 2})
    assert "bomb.png" in " ".join(report.examples["decompression bomb"])
    assert "truncated: 1" in report.summary()


def test_truncated_image_found_at_load_time_is_replaced_in_its_batch(tmp_path):
    (tmp_path / "a.png").write_bytes(png_bytes(random_rgb(16, 16)))
    whole = jpeg_bytes(random_rgb(64, 64, 1))
    (tmp_path / "b.jpg").write_bytes(whole[:len(whole) * 2 // 3])
    report = SkipReport()
    items = scan(folder_items(tmp_path, ".txt", report), report, min_size=8, max_pixels=10 ** 8, verify=False)
    assert len(items) == 2  # header reads cannot see the truncation
    data = TrainingData(items, Preprocessing(resolution=16, bucket_step=8, bucket_min_size=8), report, seed=0)
    batch = data.load_batch([1, 0], epoch=0)  # slot 1 is b.jpg (sorted after a.png); both share the 16x16 bucket
    assert batch["item"] == [0, 0] and batch["pixels"].shape == (2, 3, 16, 16)
    assert torch.equal(batch["pixels"][0], batch["pixels"][1])
    data.load_batch([1], epoch=1)
    assert report.counts["failed to load"] == 1  # counted once per image, not per attempt


def load_single(tmp_path, name: str, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    report = SkipReport()
    items = scan(folder_items(tmp_path, ".txt", report), report, min_size=1, max_pixels=10 ** 8, verify=True)
    data_set = TrainingData(items, Preprocessing(resolution=8, bucket=False, bucket_step=8, bucket_min_size=8),
                            report, seed=0)
    return items[0], data_set.load(0, 0)


def pixel_values(sample) -> np.ndarray:
    return ((sample["pixels"] + 1) * 127.5).round().permute(1, 2, 0).numpy()  # [h, w, 3] in 0..255


def test_transparency_is_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    _, sample = load_single(tmp_path, "a.png", png_bytes(rgba))
    values = pixel_values(sample)
    assert (values[1:, 1:] == 255).all()  # transparent -> white, not red or black
    assert tuple(values[0, 0]) == (0, 0, 255)


def test_palette_with_transparency_and_la_become_rgb_on_white(tmp_path):
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    palette.putpixel((1, 1), 1)
    _, sample = load_single(tmp_path, "p.png", png_bytes(palette, transparency=0))
    values = pixel_values(sample)
    assert tuple(values[1, 1]) == (10, 200, 30) and tuple(values[0, 0]) == (255, 255, 255)
    la = Image.new("LA", (8, 8), (0, 128))  # black at half opacity over white -> 127
    (tmp_path / "la").mkdir()
    _, sample = load_single(tmp_path / "la", "la.png", png_bytes(la))
    assert abs(pixel_values(sample)[0, 0, 0] - 127) <= 1


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
    values = np.full((8, 8), 32896, dtype=np.uint16)  # 32896 / 257 = 128
    values[0, 0] = 65535
    image = Image.fromarray(values)
    assert image.mode.startswith("I")
    _, sample = load_single(tmp_path, "g16.png", png_bytes(image))
    got = pixel_values(sample)
    assert tuple(got[1, 1]) == (128, 128, 128) and tuple(got[0, 0]) == (255, 255, 255)


def test_cmyk_jpeg_converts_to_rgb(tmp_path):
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red in CMYK
    _, sample = load_single(tmp_path, "c.jpg", jpeg_bytes(cmyk, quality=100))
    r, g, b = pixel_values(sample)[4, 4]
    assert r > 240 and g < 15 and b < 15


def test_exif_orientation_is_applied_to_size_and_pixels(tmp_path):
    image = Image.new("RGB", (16, 8), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 8, 8))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    path = tmp_path / "rot.jpg"
    image.save(path, exif=exif, quality=100)
    report = SkipReport()
    for verify in (False, True):
        (item,) = scan(folder_items(tmp_path, ".txt", report), report, 1, 10 ** 8, verify=verify)
        assert item.size == (8, 16)  # displayed: portrait
    data = TrainingData([item], Preprocessing(resolution=16, bucket_no_upscale=True, bucket_step=8), report, 0)
    sample = data.load(0, 0)
    values = pixel_values(sample)
    assert sample["pixels"].shape == (3, 16, 8)
    # Rotated clockwise, the white left half becomes the top half.
    assert values[:7].mean() > 240 and values[9:].mean() < 15


# ----------------------------------------------------------------------------------------------------------------------
# Captions and folder sources


def test_caption_rule_utf8_bom_cp1252_whitespace_and_empty():
    assert read_caption("\ufeffa  cat\n on\ta mat \n".encode("utf-8")) == ("a cat on a mat", True)
    assert read_caption("café".encode("cp1252")) == ("café", False)
    assert read_caption(b" \n\t ") == ("", True)


def test_folder_source_walks_nested_folders_with_repeats_and_caption_fallbacks(tmp_path):
    png = png_bytes(random_rgb(16, 16))
    (tmp_path / "3_sks dog" / "deep").mkdir(parents=True)
    (tmp_path / "3_sks dog" / "deep" / "a.png").write_bytes(png)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "b.png").write_bytes(png)
    (tmp_path / "other" / "b.txt").write_bytes("  red,\n blue ".encode())
    (tmp_path / "other" / "c.png").write_bytes(png)
    (tmp_path / "other" / "c.txt").write_bytes("na\xefve".encode("cp1252"))
    (tmp_path / "other" / "d.png").write_bytes(png)
    (tmp_path / "other" / "d.txt").write_text("   ")
    report = SkipReport()
    items = {i.key: i for i in folder_items(tmp_path, ".txt", report)}
    assert items["3_sks dog/deep/a.png"].repeats == 3 and items["3_sks dog/deep/a.png"].caption == "sks dog"
    assert items["other/b.png"].caption == "red, blue" and items["other/b.png"].repeats == 1
    assert items["other/c.png"].caption == "naïve"
    assert report.counts["caption not UTF-8 (read as Windows-1252)"] == 1
    assert items["other/d.png"].caption == ""
    kept = scan(list(items.values()), report, 1, 10 ** 8, verify=False, empty_captions="skip")
    assert "other/d.png" not in {i.key for i in kept} and report.counts["empty caption"] == 1
    data = TrainingData(kept, Preprocessing(resolution=16, bucket_step=8, bucket_min_size=8), report, 0)
    assert len(data.slots) == 3 + 1 + 1  # the repeat folder counts three times per epoch


def test_imagefolder_metadata_jsonl_and_csv(tmp_path):
    png = png_bytes(random_rgb(16, 16))
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "x.png").write_bytes(png)
    (tmp_path / "train" / "metadata.jsonl").write_text(
        json.dumps({"file_name": "x.png", "text": "a  red square"}) + "\n"
        + json.dumps({"file_name": "gone.png", "text": "missing"}) + "\n")
    (tmp_path / "val" / "img").mkdir(parents=True)
    (tmp_path / "val" / "img" / "y.png").write_bytes(png)
    (tmp_path / "val" / "metadata.csv").write_text('file_name,text\nimg/y.png,"a circle, blue"\n')
    report = SkipReport()
    items = imagefolder_items(tmp_path, "text", report)
    assert [(i.key, i.caption) for i in items] == [("train/x.png", "a red square"), ("val/img/y.png", "a circle, blue")]
    assert report.counts["missing image file"] == 1
    assert [i.key for i in source_items(str(tmp_path), "auto", SkipReport())] == ["train/x.png", "val/img/y.png"]


# ----------------------------------------------------------------------------------------------------------------------
# webdataset shards and LAION metadata


def make_shards(folder: Path, shards: int = 3, per_shard: int = 4) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        samples = []
        for k in range(per_shard):
            key = f"{s:05d}{k:04d}"
            samples.append((key, {"jpg": jpeg_bytes(random_rgb(24, 16, s * 10 + k)),
                                  "txt": f"caption {key}".encode(),
                                  "json": json.dumps({"url": f"http://x/{key}.jpg", "key": key}).encode()}))
        write_shard(folder / f"shard-{s:05d}.tar", samples)
    return [str(folder / f"shard-{s:05d}.tar") for s in range(shards)]


def test_webdataset_index_reads_images_by_offset(tmp_path):
    shards = make_shards(tmp_path / "wds")
    write_shard(tmp_path / "wds" / "shard-00003.tar", [("broken", {"txt": b"no image here"}),
                                                       ("bad", {"jpg": b"garbage", "txt": b"x"})])
    assert webdataset_shards(str(tmp_path / "wds" / "shard-{00000..00002}.tar")) == shards
    report = SkipReport()
    items = webdataset_items(webdataset_shards(str(tmp_path / "wds")), report)
    assert len(items) == 13 and report.counts["no image in sample"] == 1
    kept = scan(items, report, min_size=8, max_pixels=10 ** 8, verify=True)
    assert len(kept) == 12 and report.counts["corrupt"] == 1
    first = kept[0]
    assert first.caption == "caption 000000000" and first.url == "http://x/000000000.jpg" and first.size == (24, 16)
    with Image.open(io.BytesIO(first.read_bytes())) as image:
        assert image.size == (24, 16)


def test_a_shard_samples_control_image_member_is_indexed_beside_its_image(tmp_path):
    image, control = png_bytes(random_rgb(24, 16, 1)), png_bytes(random_rgb(24, 16, 2))
    write_shard(tmp_path / "s.tar", [("a", {"jpg": jpeg_bytes(random_rgb(24, 16, 0)), "png": control, "txt": b"x"}),
                                     ("b", {"png": image, "Cond.PNG": control}), ("c", {"png": image})])
    # The field may be an image extension: `<key>.png` beside `<key>.jpg` is then the control image, not the image.
    report = SkipReport()
    (a,) = webdataset_items([str(tmp_path / "s.tar")], report, conditioning_field="png")
    assert a.read_conditioning() == control and a.read_bytes()[:2] == b"\xff\xd8"  # the JPEG is the image
    assert report.counts["no image in sample"] == 2  # b and c hold only control images
    a, b, c = webdataset_items([str(tmp_path / "s.tar")], SkipReport(), conditioning_field="cond.png")
    assert (b.read_bytes(), b.read_conditioning()) == (image, control)  # fields match case-insensitively
    assert a.conditioning == c.conditioning == "" and a.conditioning_member is None


def laion_table(pa):
    return pa.table({
        "URL": [f"http://x/{i:05d}0000.jpg" for i in range(6)],
        "TEXT": [f"t{i}" for i in range(6)],
        "WIDTH": [1024, 300, 800, 800, 800, 800],
        "HEIGHT": [768, 900, 800, 800, 800, None],
        "LANGUAGE": ["en", "en", "EN", "de", "en", "en"],
        "SIMILARITY": [0.35, 0.4, 0.1, 0.3, 0.3, 0.3],
        "PWATERMARK": [0.1, 0.1, 0.1, 0.1, 0.9, 0.1],
        "PUNSAFE": [0.01, 0.0, 0.0, 0.0, 0.0, 0.0],
    })


def test_laion_filter_command_reports_what_each_filter_removed(tmp_path):
    pa = import_oracle("pyarrow")
    import pyarrow.parquet as pq
    pq.write_table(laion_table(pa), tmp_path / "in.parquet")
    result = subprocess.run([sys.executable, "-m", "train.data", "filter", "--in", str(tmp_path / "in.parquet"),
                             "--out", str(tmp_path / "out.parquet"), "--min-size", "512", "--min-similarity", "0.28",
                             "--max-pwatermark", "0.5", "--max-punsafe", "0.1", "--language", "en"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    # Row 1 too small, row 5 has a null HEIGHT; row 2 similarity; row 4 watermark; row 3 language.
    assert "min size 512: removed 2" in result.stdout
    assert "similarity < 0.28: removed 1" in result.stdout
    assert "pwatermark > 0.5: removed 1" in result.stdout
    assert "punsafe > 0.1: removed 0" in result.stdout
    assert "language != en: removed 1" in result.stdout
    assert "kept 1 of 6 rows" in result.stdout
    assert pq.read_table(tmp_path / "out.parquet").column("URL").to_pylist() == ["http://x/000000000.jpg"]


def test_laion_metadata_join_keeps_only_listed_shard_samples(tmp_path):
    pa = import_oracle("pyarrow")
    import pyarrow.parquet as pq
    from train.laion import join_by_url
    make_shards(tmp_path / "wds", shards=2, per_shard=2)
    pq.write_table(pa.table({"URL": ["http://x/000000001.jpg", "http://x/000010000.jpg", "http://elsewhere"]}),
                   tmp_path / "keep.parquet")
    report = SkipReport()
    items = join_by_url(source_items(str(tmp_path / "wds"), "auto", report), str(tmp_path / "keep.parquet"), report)
    assert [i.key for i in items] == ["shard-00000.tar/000000001", "shard-00001.tar/000010000"]
    assert report.counts["not in metadata"] == 2


def test_filter_command_without_input_file_exits_2_with_one_line(tmp_path):
    import_oracle("pyarrow")
    result = subprocess.run([sys.executable, "-m", "train.data", "filter", "--in", str(tmp_path / "none.parquet"),
                             "--out", str(tmp_path / "o.parquet")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------------------------------------------------------
# Buckets and augmentation


def test_buckets_are_step_multiples_within_area_and_size_limits():
    buckets = make_buckets(512, 64, 256, 1024)
    assert (512, 512) in buckets and (768, 320) in buckets and (320, 768) in buckets
    for width, height in buckets:
        assert width % 64 == 0 and height % 64 == 0
        assert width * height <= 512 * 512
        assert 256 <= width <= 1024 and 256 <= height <= 1024
    assert buckets == sorted(set(buckets))


def test_nearest_bucket_matches_aspect_ratio_and_no_upscale_keeps_small_images_small():
    buckets = make_buckets(512, 64, 256, 1024)
    assert nearest_bucket((1000, 1000), buckets) == (512, 512)
    assert nearest_bucket((1920, 1080), buckets) == (640, 384)  # 16:9 -> 1.667, the closest ratio on the grid
    assert nearest_bucket((1080, 1920), buckets) == (384, 640)
    assert no_upscale_bucket((300, 200), 512, 64) == (256, 192)   # smaller than 512^2: own size, floored to 64
    width, height = no_upscale_bucket((4000, 3000), 512, 64)       # larger: scaled down to area <= 512^2
    assert width * height <= 512 * 512 and width % 64 == 0 and height % 64 == 0 and width > height


def prepared(tmp_path, count=6, **prep):
    png = [png_bytes(random_rgb(w, h, i)) for i, (w, h) in enumerate([(32, 16), (16, 32), (20, 20)] * 2)][:count]
    for i, data in enumerate(png):
        (tmp_path / f"{i}.png").write_bytes(data)
        (tmp_path / f"{i}.txt").write_text("alpha, beta, gamma, delta, epsilon")
    report = SkipReport()
    items = scan(folder_items(tmp_path, ".txt", report), report, 1, 10 ** 8, verify=False)
    options = dict(resolution=16, bucket_step=8, bucket_min_size=8, bucket_max_size=32)
    options.update(prep)
    return TrainingData(items, Preprocessing(**options), report, seed=3)


def test_batches_share_a_bucket_cover_every_slot_and_depend_only_on_seed_and_epoch(tmp_path):
    data = prepared(tmp_path)
    batches = data.batches(0, 2, drop_last=False)
    assert sorted(s for b in batches for s in b) == list(range(6))
    for batch in batches:
        assert len({data.buckets[data.slots[s]] for s in batch}) == 1
    assert batches == data.batches(0, 2, drop_last=False)
    assert batches != data.batches(1, 2, drop_last=False)
    assert {data.buckets[i] for i in range(6)} == {(24, 8), (8, 24), (16, 16)}


def test_center_crop_records_sdxl_crop_coordinates_and_sizes(tmp_path):
    (tmp_path / "wide.png").write_bytes(png_bytes(random_rgb(40, 16)))
    report = SkipReport()
    items = scan(folder_items(tmp_path, ".txt", report), report, 1, 10 ** 8, verify=False)
    data = TrainingData(items, Preprocessing(resolution=16, bucket=False, bucket_step=8), report, 0)
    sample = data.load(0, 0)
    assert sample["pixels"].shape == (3, 16, 16)
    assert sample["original_size"] == (16, 40) and sample["target_size"] == (16, 16)
    assert sample["crop_top_left"] == (0, 12)  # (40 - 16) / 2


def test_random_crop_varies_per_epoch_but_repeats_exactly(tmp_path):
    data = prepared(tmp_path, count=1, random_crop=True, bucket=False)
    loads = [data.load(0, epoch) for epoch in range(12)]
    assert len({s["crop_top_left"] for s in loads}) > 1
    again = data.load(0, 5)
    assert torch.equal(again["pixels"], loads[5]["pixels"]) and again["crop_top_left"] == loads[5]["crop_top_left"]


def test_flip_mirrors_about_half_of_the_samples(tmp_path):
    data = prepared(tmp_path, count=1, flip=True, bucket=False)
    loads = [data.load(0, epoch) for epoch in range(16)]
    reference = loads[0]["pixels"]
    same = sum(torch.equal(s["pixels"], reference) for s in loads)
    mirrored = sum(torch.equal(s["pixels"], reference.flip(-1)) for s in loads)
    assert same + mirrored == 16 and 0 < same < 16


def test_caption_shuffle_keeps_leading_tokens_and_dropout_rate():
    import random
    rng = random.Random(0)
    caption = "sks, dog, grass, sunny, park"
    shuffled = {process_caption(caption, 2, True, 0.0, rng) for _ in range(50)}
    assert all(s.startswith("sks, dog, ") for s in shuffled) and len(shuffled) > 1
    assert all(sorted(s.split(", ")) == sorted(caption.split(", ")) for s in shuffled)
    dropped = sum(process_caption(caption, 0, False, 0.25, rng) == "" for _ in range(4000))
    assert abs(dropped / 4000 - 0.25) < 0.03


def test_tensor_cache_round_trip_and_fingerprint_folders(tmp_path):
    cache = TensorCache(tmp_path, "latents", "abc")
    values = {f"{i}.mean": torch.randn(4, 2, 2) for i in range(600)}
    cache.write(values)
    reopened = TensorCache(tmp_path, "latents", "abc")
    assert "599.mean" in reopened and torch.equal(reopened.get("599.mean"), values["599.mean"])
    assert len(list((tmp_path / "latents-abc").glob("shard-*.safetensors"))) == 3
    assert "0.mean" not in TensorCache(tmp_path, "latents", "other")


def test_item_reads_its_bytes_from_a_tar_member(tmp_path):
    write_shard(tmp_path / "s.tar", [("k", {"png": b"0123456789"})])
    (item,) = webdataset_items([str(tmp_path / "s.tar")], SkipReport())
    assert isinstance(item, Item) and item.read_bytes() == b"0123456789"


def test_check_command_prints_usable_count_and_skips(tmp_path, capsys):
    from train.data import _main
    (tmp_path / "ok.png").write_bytes(png_bytes(random_rgb(16, 16)))
    (tmp_path / "bad.png").write_bytes(b"")
    assert _main(["check", "--data", str(tmp_path), "--min-image-size", "8"]) == 0
    out = capsys.readouterr().out
    assert "1 usable images of 2" in out and "zero-size file: 1" in out
