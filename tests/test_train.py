"""train: configuration, the loss maths, the loop (loss decreases, NaN handling), exact resume, atomic checkpoints,
signals, metrics and the plot."""
import argparse
import json
import logging
import math
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ldm
from ldm.checkpoint import read_metadata, read_state_dict
from ldm.model import LatentDiffusion
from random_weights import randomize_weights
from train import ConfigError, TrainConfig, resume, train
from train.config import Preprocessing, add_arguments, config_from_args, config_from_dict
from train.objective import VAEObjective, min_snr_weight, noisy_latents, snr, zero_terminal_snr
from train.resume import list_checkpoints
from train.trainer import Trainer, TrainingError, lr_factor, preset_with_architecture
from train_support import FAST_ARCHITECTURE, cli_args, fast_config, pretrained_file, write_images

REPO = Path(__file__).resolve().parents[1]


# Tiny tensors: one thread (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


def subprocess_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    write_images(folder, 5)
    return folder


# ----------------------------------------------------------------------------------------------------------------------
# Configuration


def parse(argv: list[str]) -> TrainConfig:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return config_from_args(parser.parse_args(argv))


def test_toml_tables_and_command_line_overrides(tmp_path):
    (tmp_path / "c.toml").write_text(textwrap.dedent("""
        model = "preset:tiny"
        data = "imgs"
        output = "out"
        method = "lora"
        lr = 1
        validation_prompts = ["a cat"]
        [lora]
        rank = 8
        [architecture]
        unet = {model_channels = 64}
    """))
    config = parse(["--config", str(tmp_path / "c.toml"), "--lr", "2e-4", "--lora-rank", "16", "--flip",
                    "--validation-prompts", '["a", "b"]', "--architecture", "{vae = {ch = 64}}"])
    assert config.method == "lora" and config.lr == 2e-4 and config.lora_rank == 16
    assert config.preprocessing.flip is True
    assert config.validation_prompts == ["a", "b"] and config.architecture == {"vae": {"ch": 64}}
    assert parse(["--config", str(tmp_path / "c.toml")]).lr == 1.0  # TOML ints are accepted for floats
    assert parse(["--config", str(tmp_path / "c.toml")]).architecture == {"unet": {"model_channels": 64}}


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="unknown config key 'lora_rnk'"):
        config_from_dict({"lora": {"rnk": 3}})
    with pytest.raises(ConfigError, match="max_steps must be a int"):
        config_from_dict({"max_steps": "ten"})
    with pytest.raises(ConfigError, match="cache_latents .* random_crop"):
        config_from_dict(dict(model="m", data="d", output="o", cache_latents=True, random_crop=True)).validate()
    with pytest.raises(ConfigError, match="textual inversion needs token"):
        TrainConfig(model="m", data="d", output="o", method="textual-inversion").validate()


def test_cli_usage_errors_exit_2_with_one_line(tmp_path):
    for argv in (["--model", "preset:tiny"], ["--max-steps", "[1,"]):
        result = subprocess.run([sys.executable, "-m", "train", *argv], capture_output=True, text=True,
                                env=subprocess_env(), timeout=120)
        assert result.returncode == 2, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


# ----------------------------------------------------------------------------------------------------------------------
# Loss maths


def test_forward_process_and_v_target_match_their_definitions():
    alphas_cumprod = torch.cumprod(1 - torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2,
                                   0).float()
    x0, noise = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    t = torch.tensor([0, 500, 999])
    a = alphas_cumprod[t].view(3, 1, 1, 1)
    x_t, v = noisy_latents(x0, noise, t, alphas_cumprod, "v")
    torch.testing.assert_close(x_t, a.sqrt() * x0 + (1 - a).sqrt() * noise)
    torch.testing.assert_close(v, a.sqrt() * noise - (1 - a).sqrt() * x0)
    # v-parameterisation identity (Salimans & Ho 2022, §4): x0 = sqrt(ᾱ) x_t − sqrt(1−ᾱ) v.
    torch.testing.assert_close(a.sqrt() * x_t - (1 - a).sqrt() * v, x0, atol=1e-5, rtol=1e-5)
    assert noisy_latents(x0, noise, t, alphas_cumprod, "eps")[1] is noise


def test_min_snr_gamma_weights():
    snr_t = torch.tensor([0.5, 5.0, 20.0])
    torch.testing.assert_close(min_snr_weight(snr_t, 5.0, "eps"), torch.tensor([1.0, 1.0, 0.25]))
    torch.testing.assert_close(min_snr_weight(snr_t, 5.0, "v"), torch.tensor([0.5 / 1.5, 5 / 6, 5 / 21]))
    torch.testing.assert_close(min_snr_weight(snr_t, 0.0, "eps"), torch.ones(3))
    alphas_cumprod = torch.tensor([0.8])
    torch.testing.assert_close(snr(alphas_cumprod), torch.tensor([4.0]))


def test_zero_terminal_snr_keeps_first_step_and_zeroes_last():
    base = torch.cumprod(1 - torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2, 0).float()
    rescaled = zero_terminal_snr(base)
    torch.testing.assert_close(rescaled[0], base[0])
    assert rescaled[-1] < 1e-7 and (rescaled[1:] < rescaled[:-1]).all()
    # Lin et al. Alg. 1 is an affine map of sqrt(ᾱ): the middle values keep their relative spacing.
    s, r = base.double().sqrt(), rescaled[:-1].double().sqrt()
    expected = (s[:-1] - s[-1]) * s[0] / (s[0] - s[-1])
    torch.testing.assert_close(r, expected, atol=1e-6, rtol=1e-5)


def test_lr_schedules_with_warmup():
    assert [lr_factor(s, 2, 10, "constant") for s in (0, 1, 2, 9)] == [0.5, 1.0, 1.0, 1.0]
    assert lr_factor(2, 2, 10, "linear") == 1.0 and lr_factor(6, 2, 10, "linear") == 0.5
    assert math.isclose(lr_factor(6, 2, 10, "cosine"), 0.5) and math.isclose(lr_factor(10, 2, 10, "cosine"), 0.0)


# ----------------------------------------------------------------------------------------------------------------------
# The loop


@torch.no_grad()
def fixed_loss(trainer: Trainer) -> float:
    """Loss over all images at fixed timesteps and noise, independent of the training's random streams."""
    generator = torch.Generator().manual_seed(123)
    total = 0.0
    for slot in range(len(trainer.data.slots)):
        sample = trainer.data.load(slot, 0)
        caption = trainer.data.items[trainer.data.slots[slot]].caption
        moments = trainer.model.first_stage_model.encode(sample["pixels"][None])
        latents = moments.mean * trainer.model.scale_factor
        for t in (100, 400, 700):
            noise = torch.randn(latents.shape, generator=generator)
            total += trainer.objective(latents, noise, torch.tensor([t]), None, [caption]).item()
    return total


def test_loss_decreases_when_overfitting_a_handful_of_images(images, tmp_path):
    trainer = Trainer(fast_config(images, tmp_path / "out", max_steps=30, lr=2e-3, batch_size=1))
    before = fixed_loss(trainer)
    result = trainer.run()
    after = fixed_loss(trainer)
    assert result.step == 30 and result.weights.is_file()
    assert after < 0.7 * before, (before, after)
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 31))
    assert all(r["lr"] == 2e-3 and r["grad_norm"] > 0 and r["img_per_s"] > 0 for r in records)
    # The written model is an ordinary checkpoint that ldm loads, and it holds the trained UNet.
    loaded = ldm.load_model(result.weights)
    for key, value in trainer.model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key

    from train.plot import main as plot_main
    assert plot_main([str(tmp_path / "out")]) == 0
    with Image.open(tmp_path / "out" / "loss.png") as png:
        assert png.size == (900, 500)


RESUME_OPTIONS = dict(ema_decay=0.9, lr_scheduler="cosine", warmup_steps=1, flip=True, random_crop=True,
                      caption_dropout=0.3, gradient_accumulation=2, noise_offset=0.1, min_snr_gamma=5.0,
                      train_text_encoder=True, lr_text_encoder=5e-4)


def test_resume_is_bitwise_identical(images, tmp_path):
    straight = train(fast_config(images, tmp_path / "a", max_steps=4, **RESUME_OPTIONS))
    first = train(fast_config(images, tmp_path / "b", max_steps=2, **RESUME_OPTIONS))
    assert first.checkpoint.name == "checkpoint-2"
    resumed = train(fast_config(images, tmp_path / "b", max_steps=4, resume="latest", **RESUME_OPTIONS))
    a, b = read_state_dict(straight.weights), read_state_dict(resumed.weights)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    losses = [[json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
              for run in ("a", "b")]
    assert losses[0] == losses[1] and len(losses[0]) == 4


def test_resume_from_a_checkpoint_with_another_world_size_is_refused(images, tmp_path):
    train(fast_config(images, tmp_path, max_steps=1))
    state_path = tmp_path / "checkpoint-1" / "state.json"
    state = json.loads(state_path.read_text())
    state_path.write_text(json.dumps({**state, "world_size": 2}))
    with pytest.raises(ConfigError, match="same number of processes"):
        Trainer(fast_config(images, tmp_path, max_steps=2, resume="latest"))


def test_kill_during_checkpoint_save_leaves_the_previous_one_loadable(images, tmp_path):
    train(fast_config(images, tmp_path, max_steps=2, save_every=1, keep_checkpoints=1))
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2"]
    # A child resumes, trains step 3 and is killed (os._exit: no cleanup runs) after writing some checkpoint files.
    script = textwrap.dedent(f"""
        import os, sys, torch
        sys.path.insert(0, {str(REPO / 'tests')!r})
        from train_support import fast_config
        from train import train
        real_save = torch.save
        def save_then_die(obj, path, *args, **kwargs):
            real_save(obj, path, *args, **kwargs)
            os._exit(137)
        torch.save = save_then_die
        train(fast_config({str(images)!r}, {str(tmp_path)!r}, max_steps=4, save_every=1, keep_checkpoints=1,
                          resume="latest"))
    """)
    result = subprocess.run([sys.executable, "-c", script], env=subprocess_env(), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 137, result.stderr
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2"]
    leftovers = list(tmp_path.glob(".checkpoint-3-*.tmp"))
    assert len(leftovers) == 1 and (leftovers[0] / "model.safetensors").is_file()
    ldm.load_model(tmp_path / "checkpoint-2" / "model.safetensors")
    resumed = train(fast_config(images, tmp_path, max_steps=3, resume="latest"))
    assert resumed.step == 3 and not list(tmp_path.glob(".checkpoint-*.tmp"))


def test_sigterm_saves_a_resumable_checkpoint_and_exits(images, tmp_path):
    argv = [sys.executable, "-m", "train", *cli_args(fast_config(images, tmp_path, max_steps=100000))]
    process = subprocess.Popen(argv, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 2):
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    assert "stopped by SIGTERM" in stderr and "Traceback" not in stderr
    (checkpoint,) = list_checkpoints(tmp_path)
    state = json.loads((checkpoint / "state.json").read_text())
    assert checkpoint.name == f"checkpoint-{state['step']}" and state["step"] >= 2
    assert not (tmp_path / "model.safetensors").exists()  # an interrupted run writes no final model
    resumed = Trainer(fast_config(images, tmp_path, max_steps=state["step"] + 1, resume="latest"))
    assert resumed.step == state["step"]


def test_nan_steps_are_skipped_and_counted_then_abort(images, tmp_path):
    trainer = Trainer(fast_config(images, tmp_path, max_steps=3, max_nan_steps=3))
    poisoned = {"calls": 0}

    def poison(module, inputs, output):
        poisoned["calls"] += 1
        return output * float("nan") if poisoned["calls"] == 2 else output
    hook = trainer.objective.register_forward_hook(poison)
    before = {k: v.clone() for k, v in trainer.model.unet.state_dict().items()}
    result = trainer.run()
    assert result.skipped_nan_steps == 1 and result.step == 3
    assert all(torch.isfinite(v).all() for v in trainer.model.unet.state_dict().values())
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.unet.state_dict().items())
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_nan"] for r in records] == [0, 1, 1]
    hook.remove()

    trainer = Trainer(fast_config(images, tmp_path / "abort", max_steps=10, max_nan_steps=3))
    trainer.objective.register_forward_hook(lambda module, inputs, output: output * float("nan"))
    with pytest.raises(TrainingError, match="NaN/inf for 3 consecutive steps"):
        trainer.run()


def test_vae_method_lowers_reconstruction_error(images, tmp_path):
    trainer = Trainer(fast_config(images, tmp_path, method="vae", max_steps=25, lr=2e-3, batch_size=1))
    pixels = torch.stack([trainer.data.load(s, 0)["pixels"] for s in range(len(trainer.data.slots))
                          if trainer.data.buckets[trainer.data.slots[s]] == (16, 16)])

    def error():
        with torch.no_grad():
            vae = trainer.model.first_stage_model
            return (vae.decode(vae.encode(pixels).mode()) - pixels).abs().mean().item()
    before = error()
    trainer.run()
    assert error() < 0.9 * before  # 0.565 -> 0.478 with this seed


def test_vae_objective_terms_follow_their_definitions():
    torch.manual_seed(0)
    model = LatentDiffusion(preset_with_architecture("tiny", FAST_ARCHITECTURE))
    randomize_weights(model, seed=0)
    vae = model.first_stage_model
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1
    noise = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        mean, logvar = vae.quant_conv(vae.encoder(pixels)).chunk(2, dim=1)
        error = pixels - vae.decoder(vae.post_quant_conv(mean + (0.5 * logvar).exp() * noise))
        # KL(N(mean, var) || N(0, 1)) per element, averaged over the image's 3·16·16 pixel values
        kl = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3)) / (3 * 16 * 16)
        for loss, expected in (("l1", error.abs().mean(dim=(1, 2, 3))), ("mse", error.square().mean(dim=(1, 2, 3)))):
            got = VAEObjective(model, kl_weight=0.5, reconstruction_loss=loss)(pixels, noise)
            torch.testing.assert_close(got, expected + 0.5 * kl, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="'l1' or 'mse'"):
        VAEObjective(model, kl_weight=0.0, reconstruction_loss="l2")


def test_vae_training_records_the_latent_scale_factor(images, tmp_path):
    result = train(fast_config(images, tmp_path, method="vae", max_steps=3, reconstruction_loss="mse"))
    model = ldm.load_model(result.weights)
    assert read_metadata(result.weights)["ldm.scale_factor"] == repr(model.scale_factor)
    assert model.scale_factor != ldm.PRESETS["tiny"].scale_factor
    # The recorded factor gives unit-variance latents on the training images (measured on other posterior noise).
    latents = []
    with torch.no_grad():
        for path in sorted(images.glob("*.png")):
            pixels = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)[None] / 127.5 - 1
            latents.append(model.encode_image(pixels.float(), torch.Generator().manual_seed(1)).flatten())
    assert abs(torch.cat(latents).std().item() - 1.0) < 0.05


def test_final_file_holds_the_ema_of_every_trained_weight_in_the_save_precision(tmp_path):
    base = pretrained_file(tmp_path / "base.safetensors")
    ldm_model = ldm.load_model(base)
    ldm_model.scale_factor = 0.3
    ldm.save_model(ldm_model, base)
    write_images(tmp_path / "imgs", 4, sizes=((16, 16),))
    result = train(fast_config(tmp_path / "imgs", tmp_path / "out", model=str(base), architecture={}, max_steps=3,
                               ema_decay=0.5, train_text_encoder=True, save_precision="fp16"))
    final = read_state_dict(result.weights)
    raw = read_state_dict(result.checkpoint / "model.safetensors")
    ema = read_state_dict(result.checkpoint / "ema.safetensors")
    assert final.keys() == raw.keys() and not any(k.startswith("model_ema.") for k in final)
    trained = {k[len("model."):] for k in ema}
    assert any(k.startswith("cond_stage_model.") for k in trained) and any(k.startswith("model.") for k in trained)
    for key, value in final.items():
        expected = ema["model." + key] if key in trained else raw[key]
        if key == "alphas_cumprod":
            assert value.dtype == torch.float32 and torch.equal(value, expected)
        else:
            assert value.dtype == torch.float16 and torch.equal(value, expected.half()), key
    assert any(not torch.equal(ema["model." + k], raw[k]) for k in trained)  # EMA differs from the raw weights
    assert ldm.load_model(result.weights).scale_factor == 0.3  # carried over from the file it started from
    # Fine-tuning that fp16 file trains fp32 master weights (its raw checkpoint is fp32).
    again = train(fast_config(tmp_path / "imgs", tmp_path / "again", model=str(result.weights), architecture={},
                              max_steps=1))
    assert {v.dtype for v in read_state_dict(again.weights).values()} == {torch.float32}


def test_latent_cache_is_reused_and_invalidated_by_resolution(images, tmp_path):
    cached = train(fast_config(images, tmp_path / "a", max_steps=2, cache_latents=True,
                               cache_dir=str(tmp_path / "cache")))
    plain = train(fast_config(images, tmp_path / "b", max_steps=2))
    # One image at a time vs whole batches through the VAE: the losses differ by float round-off only.
    losses = [[json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
              for run in (tmp_path / "a", tmp_path / "b")]
    torch.testing.assert_close(torch.tensor(losses[0]), torch.tensor(losses[1]), atol=0, rtol=1e-4)
    assert cached.step == plain.step == 2
    (folder,) = (tmp_path / "cache").iterdir()
    shards = {p: p.stat().st_mtime_ns for p in folder.iterdir()}
    train(fast_config(images, tmp_path / "c", max_steps=1, cache_latents=True, cache_dir=str(tmp_path / "cache")))
    assert {p: p.stat().st_mtime_ns for p in folder.iterdir()} == shards  # read, not rewritten
    train(fast_config(images, tmp_path / "d", max_steps=1, cache_latents=True, cache_dir=str(tmp_path / "cache"),
                      resolution=24))
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_text_cache_gives_the_same_training_as_encoding_each_step(images, tmp_path):
    cached = train(fast_config(images, tmp_path / "a", max_steps=2, cache_text=True, caption_dropout=0.5))
    plain = train(fast_config(images, tmp_path / "b", max_steps=2, caption_dropout=0.5))
    a, b = read_state_dict(cached.weights), read_state_dict(plain.weights)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)


def test_text_cache_is_not_shared_by_models_reading_another_block_of_the_same_tower(images, tmp_path):
    from dataclasses import replace

    import ldm
    from ldm.model import LatentDiffusion
    from random_weights import randomize_weights
    files = {}
    for layer in ("last", "penultimate"):  # the same weights; the second file records its layer in the metadata
        preset = ldm.get_preset("tiny")
        model = LatentDiffusion(replace(preset, text=(replace(preset.text[0], layer=layer),)))
        files[layer] = tmp_path / f"{layer}.safetensors"
        ldm.save_model(randomize_weights(model, seed=0), files[layer])
    for layer, path in files.items():
        train(fast_config(images, tmp_path / layer, model=str(path), architecture={}, max_steps=1, cache_text=True,
                          cache_dir=str(tmp_path / "cache")))
    folders = sorted(p.name.split("-")[0] for p in (tmp_path / "cache").iterdir())
    assert folders == ["text", "text"]  # one cache per readout, though the tower's weights are equal


def test_validation_images_are_written_every_n_steps(images, tmp_path):
    train(fast_config(images, tmp_path, max_steps=2, validation_every=2, validation_prompts=["a shape"],
                      validation_steps=2))
    with Image.open(tmp_path / "samples" / "step-000002-0.png") as image:
        assert image.size == (16, 16)


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_example_configs_are_valid(path):
    from train.config import load_toml
    from train.methods import method_class
    config = config_from_dict(load_toml(path)).validate()
    if config.model.startswith("preset:"):
        # The architecture is buildable (text width matches context_dim, ...) by the method that trains it.
        method_class(config.method).build_model(config, torch.device("meta"))


def test_data_loader_workers_give_the_same_training(images, tmp_path):
    single = train(fast_config(images, tmp_path / "a", max_steps=2, random_crop=True, flip=True))
    workers = train(fast_config(images, tmp_path / "b", max_steps=2, random_crop=True, flip=True, num_workers=2))
    a, b = read_state_dict(single.weights), read_state_dict(workers.weights)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_a_different_batch_size_is_refused(images, tmp_path):
    train(fast_config(images, tmp_path, max_steps=1))
    with pytest.raises(ConfigError, match="different batch_size"):
        Trainer(fast_config(images, tmp_path, max_steps=2, batch_size=1, resume="latest"))


def test_textual_inversion_without_the_token_in_any_caption_is_refused(images, tmp_path):
    with pytest.raises(ConfigError, match="no training caption contains the token 'zzq'"):
        Trainer(fast_config(images, tmp_path, method="textual-inversion", token="zzq"))


def test_gradient_checkpointing_gives_identical_training(images, tmp_path):
    plain = train(fast_config(images, tmp_path / "a", max_steps=2))
    checkpointed = train(fast_config(images, tmp_path / "b", max_steps=2, gradient_checkpointing=True))
    a, b = read_state_dict(plain.weights), read_state_dict(checkpointed.weights)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_close_to_fp32(images, tmp_path, precision):
    def losses(run):
        return [json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
    train(fast_config(images, tmp_path / "fp32", max_steps=3))
    train(fast_config(images, tmp_path / precision, max_steps=3, mixed_precision=precision))
    # The weights stay fp32 (autocast computes in low precision): losses agree to low-precision round-off.
    torch.testing.assert_close(torch.tensor(losses(precision)), torch.tensor(losses("fp32")), atol=0, rtol=2e-2)


def test_every_config_key_has_a_help_label_and_missing_data_is_one_error_line(tmp_path):
    from train.config import HELP, option_types
    assert set(HELP) == set(option_types())
    result = subprocess.run([sys.executable, "-m", "train", "--model", "preset:tiny", "--data", str(tmp_path / "no"),
                             "--output", str(tmp_path / "out"), "--no-progress"], capture_output=True, text=True,
                            env=subprocess_env(), timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].endswith("or a shard pattern")


def test_preprocessing_is_a_toml_table_with_its_keys_also_accepted_flat(tmp_path):
    (tmp_path / "c.toml").write_text(textwrap.dedent("""
        model = "preset:tiny"
        data = "imgs"
        output = "out"
        caption_template = "a photo of {caption}"
        [preprocessing]
        resolution = 256
        random_crop = true
    """))
    config = parse(["--config", str(tmp_path / "c.toml"), "--preprocessing.bucket-step", "32", "--no-bucket"])
    assert config.preprocessing == Preprocessing(resolution=256, random_crop=True, bucket_step=32, bucket=False,
                                                 caption_template="a photo of {caption}")
    # The command line overrides the TOML table through either name.
    assert parse(["--config", str(tmp_path / "c.toml"), "--resolution", "128"]).preprocessing.resolution == 128
    assert not parse(["--config", str(tmp_path / "c.toml"), "--no-preprocessing.random-crop"]).preprocessing.random_crop
    with pytest.raises(ConfigError, match="unknown config key 'preprocessing.crop'"):
        config_from_dict({"preprocessing": {"crop": True}})
    with pytest.raises(ConfigError, match="preprocessing.flip must be a bool"):
        config_from_dict({"flip": "yes"})


# ----------------------------------------------------------------------------------------------------------------------
# Bad input ends in one line (issue 23)


def run_main(argv: list[str], capsys) -> tuple[int, list[str]]:
    """`python -m train` in this process: (exit status, stderr lines); a traceback would raise here instead."""
    from train.__main__ import main
    status = main(argv)
    return status, capsys.readouterr().err.strip().splitlines()


def test_skipped_images_are_counted_once_in_the_data_report(tmp_path, caplog):
    data = tmp_path / "data"
    write_images(data, 4)
    (data / "empty.png").write_bytes(b"")
    (data / "broken.png").write_bytes(b"\x89PNG not really")
    with caplog.at_level(logging.INFO, logger="train"):
        result = train(fast_config(data, tmp_path / "out", max_steps=1))
    report = json.loads((tmp_path / "out" / "data_report.json").read_text())
    assert report["usable_images"] == 4 and report["skipped"] == {"zero-size file": 1, "corrupt": 1}
    assert "corrupt: 1" in result.data_report and "zero-size file: 1" in result.data_report
    assert any("4 usable images" in line and "zero-size file: 1" in line for line in caplog.messages)


def test_data_given_as_a_single_file_or_a_broken_shard_is_one_error_line(tmp_path, capsys):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "broken.tar").write_bytes(b"not a tar archive" * 40)
    common = ["--model", "preset:tiny", "--output", str(tmp_path / "out"), "--no-progress"]
    status, lines = run_main(["--data", str(tmp_path / "empty.png"), *common], capsys)
    assert status == 1 and len(lines) == 1
    assert "empty.png is a single file, not an image folder or a .tar shard" in lines[0]
    status, lines = run_main(["--data", str(tmp_path / "broken.tar"), *common], capsys)
    assert status == 1 and len(lines) == 1 and "broken.tar is not a readable .tar shard" in lines[0]


class _RunsCode:
    """Unpickling this calls os.system: what a hostile checkpoint file would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("name", ["optimizer.pt", "rng.pt"])
def test_hostile_or_garbage_resume_files_are_one_error_line(images, tmp_path, capsys, name):
    argv = cli_args(fast_config(images, tmp_path / "out", max_steps=1))
    assert run_main(argv, capsys)[0] == 0
    target = resume.list_checkpoints(tmp_path / "out")[-1] / name
    marker = tmp_path / "executed"
    hostile = pickle.dumps(_RunsCode(marker))
    garbage = b"\x80\x02garbage" * 10
    wrong_contents = tmp_path / "wrong.pt"
    torch.save({"unexpected": torch.zeros(1)}, wrong_contents)
    resumed = cli_args(fast_config(images, tmp_path / "out", max_steps=2, resume="latest"))
    for contents in (hostile, garbage, wrong_contents.read_bytes(), b""):
        target.write_bytes(contents)
        status, lines = run_main(resumed, capsys)
        assert status == 1 and len(lines) == 1, lines
        assert str(target) in lines[0] and "older checkpoint" in lines[0]
        assert "weights_only" not in lines[0]
    assert not marker.exists()


def test_a_trained_model_is_named_after_its_run_in_infotexts(images, tmp_path):
    from sample import GenerationParams, generate, load_checkpoint
    result = train(fast_config(images, tmp_path / "shapes-run", max_steps=1))
    assert result.weights.name == "model.safetensors"
    checkpoint = load_checkpoint(result.weights)
    assert checkpoint.name == "shapes-run"
    params = GenerationParams(prompt="a shape", steps=1, width=16, height=16, seed=1)
    assert "Model: shapes-run," in generate(checkpoint, params, progress=False).infotexts[0]
    named = train(fast_config(images, tmp_path / "other", max_steps=1, output_name="my-shapes"))
    assert load_checkpoint(named.weights).name == "my-shapes"
