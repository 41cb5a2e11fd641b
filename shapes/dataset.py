"""Data sets of the shapes world: captioned images with their ground truth, as an imagefolder and webdataset shards.

    python -m shapes make --out data/shapes --n 20000 --seed 0
    python -m shapes make --out data/base --n 20000 --exclude-shape star --exclude-colour purple
    python -m shapes make --out data/new --n 200 --seed 1 --require-shape star --require-colour purple
    python -m shapes make --out data/control --n 4000 --silhouettes     # + control images for ControlNet training
    python -m shapes make --out data/seg --n 4000 --segmentation        # + colour segmentation control images

Output of `make_dataset`, both holding the same samples:
- `DIR/metadata.jsonl` + `DIR/<key>.png`: a Hugging Face imagefolder; each row has `file_name`, `text` (the caption),
  `objects` (the ground truth, see `shapes.world.SceneObject`) and `relation`; with `silhouettes`, also
  `conditioning_image`: `<key>-silhouette.png`, the objects' silhouettes (`shapes.world.silhouette`) as a ControlNet
  control image (train's `conditioning_column`); with `segmentation_maps`, `<key>-segmentation.png` instead, each
  object in its flat colour on black (`shapes.world.segmentation`);
- `DIR/shards/shapes-NNNNN.tar`: webdataset shards of `<key>.png`, `<key>.txt` (caption), `<key>.json` (the row).

Image i depends only on (seed, i) and the vocabulary options, so a run with a larger n extends a smaller one, and
the same call gives byte-identical files.
"""
import io
import json
import sys
import tarfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from .captions import random_caption
from .world import Scene, Vocabulary, render, sample_scene, segmentation, silhouette


def sample(seed: int, index: int, vocabulary: Vocabulary, two_object_fraction: float = 0.4, rotation: float = 0.0,
           width: int = 64, height: int = 64) -> tuple[Scene, str]:
    """Scene and caption of sample `index`: a function of (seed, index) and the options only."""
    rng = np.random.default_rng([seed, index])
    scene = sample_scene(rng, vocabulary, two_object_fraction, rotation, width, height)
    return scene, random_caption(rng, scene)


def metadata_row(key: str, scene: Scene, text: str) -> dict:
    return {"file_name": f"{key}.png", "text": text,
            "objects": [{k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(o).items()}
                        for o in scene.objects],
            "relation": scene.relation}


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def _add_to_tar(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    # Fixed owner, mode and mtime so that the same samples give the same bytes.
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def make_dataset(out: str | Path, n: int, seed: int = 0, vocabulary: Vocabulary = Vocabulary(),
                 two_object_fraction: float = 0.4, rotation: float = 0.0, width: int = 64, height: int = 64,
                 shard_size: int = 1000, progress: bool = False, silhouettes: bool = False,
                 segmentation_maps: bool = False) -> list[dict]:
    """Write n samples to `out` as an imagefolder (metadata.jsonl + PNGs) and as webdataset shards under
    `out/shards`; returns the metadata rows. `out` must be empty or absent. `silhouettes` adds each image's
    silhouette control image to the imagefolder (column `conditioning_image`), `segmentation_maps` its colour
    segmentation (`shapes.world.segmentation`) instead."""
    if silhouettes and segmentation_maps:
        raise ValueError("choose one control image per data set: silhouettes or segmentation maps (both would be "
                         "the one conditioning_image column)")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; choose a new folder (old files would mix with the new set)")
    (out / "shards").mkdir(parents=True, exist_ok=True)
    rows = []
    with (open(out / "metadata.jsonl", "w", encoding="utf-8") as metadata,
          tqdm(total=n, desc="rendering", unit="img", disable=not progress, file=sys.stderr) as bar):
        for first in range(0, n, shard_size):
            shard = out / "shards" / f"shapes-{first // shard_size:05d}.tar"
            with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
                for index in range(first, min(first + shard_size, n)):
                    scene, text = sample(seed, index, vocabulary, two_object_fraction, rotation, width, height)
                    key = f"{index:06d}"
                    png = _png_bytes(render(scene, width, height))
                    (out / f"{key}.png").write_bytes(png)
                    row = metadata_row(key, scene, text)
                    if silhouettes:
                        row["conditioning_image"] = f"{key}-silhouette.png"
                        (out / row["conditioning_image"]).write_bytes(_png_bytes(silhouette(scene, width, height)))
                    if segmentation_maps:
                        row["conditioning_image"] = f"{key}-segmentation.png"
                        (out / row["conditioning_image"]).write_bytes(_png_bytes(segmentation(scene, width, height)))
                    metadata.write(json.dumps(row) + "\n")
                    rows.append(row)
                    _add_to_tar(tar, f"{key}.png", png)
                    _add_to_tar(tar, f"{key}.txt", text.encode("utf-8"))
                    _add_to_tar(tar, f"{key}.json", json.dumps({"key": key, "caption": text, **row}).encode("utf-8"))
                    bar.update()
    return rows


