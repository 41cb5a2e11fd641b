"""The `controlnet` training method: control images from an imagefolder column (cropped and flipped with their image)
or a function, the loss falls, resume is bitwise, the file is one load_controlnet reads, the base model stays frozen."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.checkpoint import CheckpointError, read_state_dict
from ldm.controlnet import load_controlnet
from train import train
from train.config import ConfigError
from train.trainer import Trainer
from oracles import import_oracle
from train_support import fast_config, pretrained_file, write_shard

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def controlled(tmp_path_factory):
    """An imagefolder of 4 random 16×24 images whose control image is the image itself: a ControlNet can then lower
    the loss far below what the (random) frozen model reaches."""
    folder = tmp_path_factory.mktemp("controlled")
    rng = np.random.default_rng(0)
    rows = []
    for n in range(4):
        pixels = (rng.random((16, 24, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{n}.png")
        Image.fromarray(pixels).save(folder / f"{n}-control.png")
        rows.append({"file_name": f"{n}.png", "text": f"a shape number {n}", "conditioning_image": f"{n}-control.png"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


@pytest.fixture(scope="module")
def controlled_shards(controlled, tmp_path_factory):
    """The `controlled` imagefolder as a webdataset shard, in the same order: per sample `<key>.png`, `.txt`,
    `.json` (img2dataset's, with the URL the LAION join matches) and the control image `<key>.conditioning.png`."""
    folder = tmp_path_factory.mktemp("controlled_shards")
    rows = [json.loads(line) for line in (controlled / "metadata.jsonl").read_text().splitlines()]
    write_shard(folder / "shard-00000.tar", [
        (f"{n:06d}", {"png": (controlled / row["file_name"]).read_bytes(), "txt": row["text"].encode(),
                      "json": json.dumps({"url": f"http://x/{n}.png"}).encode(),
                      "conditioning.png": (controlled / row["conditioning_image"]).read_bytes()})
        for n, row in enumerate(rows)])
    return folder


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    return pretrained_file(tmp_path_factory.mktemp("model") / "base.safetensors")


def config_for(data, pretrained, output, **overrides):
    return fast_config(data, output, model=str(pretrained), architecture={}, method="controlnet", **overrides)


def fixed_loss(trainer: Trainer) -> float:
    """The objective on every item at three timesteps with fixed noise (no caption dropout, centre crop)."""
    generator = torch.Generator().manual_seed(0)
    model, total = trainer.model, 0.0
    with torch.no_grad():
        for slot in range(len(trainer.data.slots)):
            sample = trainer.data.load(slot, epoch=0)
            latents = model.first_stage_model.encode(sample["pixels"][None]).mean * model.scale_factor
            for t in (100, 500, 900):
                noise = torch.randn(latents.shape, generator=generator)
                total += trainer.objective(latents, noise, torch.tensor([t]), None, [sample["caption"]],
                                           hint=sample["hint"][None]).item()
    return total


def test_controlnet_training_lowers_the_loss_and_leaves_the_base_model_untouched(controlled, pretrained, tmp_path):
    trainer = Trainer(config_for(controlled, pretrained, tmp_path, max_steps=30, lr=2e-3, batch_size=2))
    base = {key: value.clone() for key, value in trainer.model.state_dict().items()}
    before = fixed_loss(trainer)
    result = trainer.run()
    after = fixed_loss(trainer)
    assert after < 0.8 * before, (before, after)
    for key, value in trainer.model.state_dict().items():
        assert torch.equal(value, base[key]), key  # sd_locked: the whole base model is frozen
    net = load_controlnet(result.weights)
    for key, value in trainer.method.controlnet.state_dict().items():
        assert torch.equal(net.state_dict()[key], value), key
    assert net.hint_downscale == trainer.model.first_stage_model.downscale


def test_control_images_are_cropped_and_flipped_with_their_image(controlled, pretrained, tmp_path):
    trainer = Trainer(config_for(controlled, pretrained, tmp_path, flip=True, random_crop=True))
    for epoch in range(3):
        for slot in range(len(trainer.data.slots)):
            sample = trainer.data.load(slot, epoch)
            # The control image is the image: after the same crop and flip the hint is its pixels in [0, 1].
            torch.testing.assert_close(sample["hint"], (sample["pixels"] + 1) / 2, atol=1e-6, rtol=0)


def test_controlnet_resume_is_bitwise_identical(controlled, pretrained, tmp_path):
    options = dict(ema_decay=0.9, lr_scheduler="cosine", warmup_steps=1, caption_dropout=0.5, sd_locked=False,
                   gradient_accumulation=2, min_snr_gamma=5.0)
    straight = train(config_for(controlled, pretrained, tmp_path / "a", max_steps=4, **options))
    train(config_for(controlled, pretrained, tmp_path / "b", max_steps=2, **options))
    resumed = train(config_for(controlled, pretrained, tmp_path / "b", max_steps=4, resume="latest", **options))
    for name in ("controlnet.safetensors", "controlnet-model.safetensors"):  # unlocked: the model beside it
        a, b = read_state_dict(tmp_path / "a" / name), read_state_dict(tmp_path / "b" / name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
    losses = [[json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
              for run in ("a", "b")]
    assert losses[0] == losses[1] and len(losses[0]) == 4
    assert straight.weights.name == resumed.weights.name == "controlnet.safetensors"


def losses_of(output) -> list[float]:
    return [json.loads(line)["loss"] for line in (output / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("source", ["webdataset", "laion"])
def test_shard_samples_with_control_members_train_exactly_as_the_imagefolder(controlled, controlled_shards,
                                                                               pretrained, tmp_path, source):
    # The same images, captions and control images in the same order, so the same seed draws the same batches,
    # crops, flips, caption dropout and noise: every step's loss and the trained ControlNet must agree exactly.
    options = dict(max_steps=3, lr=2e-3, random_crop=True, flip=True, caption_dropout=0.5)
    if source == "laion":  # shards joined with LAION parquet metadata that lists every sample's URL
        pa = import_oracle("pyarrow")
        import pyarrow.parquet as pq
        pq.write_table(pa.table({"URL": [f"http://x/{n}.png" for n in range(4)] + ["http://elsewhere"]}),
                       tmp_path / "keep.parquet")
        options["metadata"] = str(tmp_path / "keep.parquet")
    folder = train(config_for(controlled, pretrained, tmp_path / "imagefolder", **{**options, "metadata": ""}))
    shards = train(config_for(controlled_shards, pretrained, tmp_path / source, **options))
    losses = losses_of(tmp_path / source)
    assert losses == losses_of(tmp_path / "imagefolder") and len(losses) == 3
    a, b = read_state_dict(folder.weights), read_state_dict(shards.weights)
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def test_control_images_from_a_function(controlled, pretrained, tmp_path):
    trainer = Trainer(config_for(controlled, pretrained, tmp_path, conditioning_function="silhouette"))
    sample = trainer.data.load(0, epoch=0)
    ink = ((1 - sample["pixels"]) * 127.5).norm(dim=0) > 60  # the shapes judge's background rule
    assert torch.equal(sample["hint"], ink.float().expand(3, -1, -1))


def test_controlnet_settings_and_data_errors_say_what_to_do(controlled, pretrained, tmp_path):
    with pytest.raises(ConfigError, match="cannot use cache_latents"):
        config_for(controlled, pretrained, tmp_path, cache_latents=True).validate()
    with pytest.raises(ConfigError, match="conditioning_function='edges' is not one of silhouette"):
        config_for(controlled, pretrained, tmp_path, conditioning_function="edges").validate()
    with pytest.raises(ConfigError, match="4 of 4 training images have no control image.*'hint' column"):
        Trainer(config_for(controlled, pretrained, tmp_path, conditioning_column="hint"))


def test_shard_samples_without_the_control_member_are_refused_naming_the_field(controlled_shards, pretrained,
                                                                              tmp_path):
    with pytest.raises(ConfigError, match=r"4 of 4 training images have no control image \(e.g. "
                                          r"shard-00000.tar/000000, .*\): each webdataset sample needs a member "
                                          r"<key>.hint.png \(conditioning_field = 'hint.png'"):
        Trainer(config_for(controlled_shards, pretrained, tmp_path, conditioning_field="hint.png"))


def test_controlnet_init_starts_from_a_trained_controlnet_file(controlled, pretrained, tmp_path):
    first = train(config_for(controlled, pretrained, tmp_path / "first", max_steps=2, lr=2e-3))
    trained = read_state_dict(first.weights)
    trainer = Trainer(config_for(controlled, pretrained, tmp_path / "second", controlnet_init=str(first.weights)))
    start = trainer.method.controlnet.state_dict()
    assert {"control_model." + key for key in start} == trained.keys()
    for key, value in start.items():
        assert torch.equal(value, trained["control_model." + key]), key
    assert start["zero_convs.0.0.weight"].abs().sum() > 0  # trained, unlike from_unet's zero convolutions
    # A file that is not a ControlNet (the base model itself) is refused before training starts.
    with pytest.raises(CheckpointError, match="ControlNet"):
        Trainer(config_for(controlled, pretrained, tmp_path / "third", controlnet_init=str(pretrained)))
