"""Shared helpers of the training tests (tests/test_train*.py): tiny image folders, a tiny, fast configuration, the
module fixtures `images` and `pretrained` (import them into a test module to use them), and runs under torchrun
against one process."""
import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from train import TrainConfig, config_from_dict, train

REPO = Path(__file__).resolve().parents[1]

# A smaller architecture than preset:tiny (one UNet level, one text layer): a training step takes milliseconds.
FAST_ARCHITECTURE = {
    "unet": {"channel_mult": [1], "num_res_blocks": 1, "attention_resolutions": [1], "transformer_depth": [1],
             "transformer_depth_middle": 1},
    "vae": {"ch_mult": [1, 2], "num_res_blocks": 1},
    "text": {"layers": 1},
}


def write_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    """A webdataset .tar: for each (key, {field: bytes}) the members `<key>.<field>`, in order."""
    with tarfile.open(path, "w") as tar:
        for key, fields in samples:
            for extension, data in fields.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def write_images(folder: Path, count: int, sizes=((16, 16), (24, 16), (16, 24)), seed: int = 0,
                 captions: bool = True) -> list[Path]:
    """`count` random RGB PNGs (cycling through `sizes`) with "<n> shape" captions."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for n in range(count):
        width, height = sizes[n % len(sizes)]
        path = folder / f"img{n:03d}.png"
        Image.fromarray((rng.random((height, width, 3)) * 255).astype(np.uint8)).save(path)
        if captions:
            path.with_suffix(".txt").write_text(f"a shape number {n}")
        paths.append(path)
    return paths


def fast_config(data: Path, output: Path, **overrides) -> TrainConfig:
    values = dict(model="preset:tiny", architecture=FAST_ARCHITECTURE, data=str(data), output=str(output),
                  resolution=16, bucket_step=8, bucket_min_size=8, bucket_max_size=32, min_image_size=8,
                  batch_size=2, max_steps=4, lr=1e-3, progress=False, seed=1)
    values.update(overrides)
    # config_from_dict accepts preprocessing keys (resolution, flip, ...) at the top level, as TOML does.
    return config_from_dict(values)


def pretrained_file(path: Path) -> Path:
    """A FAST_ARCHITECTURE model with random non-zero weights everywhere, saved as an ordinary checkpoint.

    A from-scratch model is useless for testing adapters: its zero-initialised output layers make the UNet ignore
    the text and LoRA updates at first, so their gradients are exactly zero.
    """
    import torch

    import ldm
    from ldm.model import LatentDiffusion
    from random_weights import randomize_weights
    from train.trainer import preset_with_architecture
    torch.manual_seed(0)
    model = LatentDiffusion(preset_with_architecture("tiny", FAST_ARCHITECTURE))
    randomize_weights(model, seed=0)
    ldm.save_model(model, path)
    return path


def toml_value(value) -> str:
    """A Python value (dict / list / str / number / bool) as a TOML inline value, for `--key VALUE` options."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def cli_args(config: TrainConfig) -> list[str]:
    """`python -m train` options that reproduce `config` (every setting that differs from the default)."""
    from train.config import option_types, option_value
    default = TrainConfig()
    argv = []
    for name in option_types():
        value = option_value(config, name)
        if value == option_value(default, name):
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + name.replace("_", "-"))
        else:
            argv += [flag, value if isinstance(value, str) else toml_value(value)]
    return argv


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Four small captioned training images, shared by a test module."""
    folder = tmp_path_factory.mktemp("images")
    write_images(folder, 4)
    return folder


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A tiny model file (pretrained_file), shared by a test module."""
    return pretrained_file(tmp_path_factory.mktemp("base") / "base.safetensors")


def torchrun(processes: int, config: TrainConfig, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -m train` under torchrun with `processes` CPU (gloo) processes of one thread each; asserts it succeeds."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                             str(processes), "-m", "train", *cli_args(config), "--no-progress"],
                            env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def single_process(config: TrainConfig):
    """train(config) in this process with one thread, as each torchrun process has (the thread count is restored)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(config)
    finally:
        torch.set_num_threads(threads)
