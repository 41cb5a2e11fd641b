"""The forgetting monitor (train.retention): the retention-loss delta on the base's own generations is exactly zero
for an untouched model and grows under a destructive fine-tune, the triples survive a resume bitwise, the shapes judge
reports when it applies, and train.plot draws the curves."""
import json
import logging

import pytest
from PIL import Image

from ldm.checkpoint import read_state_dict
from train import ConfigError, train
from train.plot import main as plot_main
from train.trainer import Trainer
from train_support import fast_config
from train_support import images, pretrained  # noqa: F401 (module fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")
# Two prompts × one generation × two (t, noise) draws; 2 Euler steps per generation: a measurement takes milliseconds.
MONITOR = dict(architecture={}, retention_prompts=["a red circle", "a shape number 3"], retention_images=1, retention_timesteps=2,
               validation_steps=2, retention_every=2, method="full")


def records(output) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def retention_records(output) -> list[dict]:
    return [r for r in records(output) if "retention_delta" in r]


def test_delta_is_exactly_zero_for_an_untouched_model(images, pretrained, tmp_path):
    # lr 1e-30: AdamW's steps are far below fp32's resolution of the weights, which stay bitwise the base's.
    train(fast_config(images, tmp_path, model=str(pretrained), lr=1e-30, max_steps=5, **MONITOR))
    measured = retention_records(tmp_path)
    assert [r["step"] for r in measured] == [0, 2, 4, 5]  # every retention_every steps, and the last
    assert all(r["retention_delta"] == 0.0 and r["retention_loss"] == r["retention_base_loss"] > 0 for r in measured)
    triples = read_state_dict(tmp_path / "retention.safetensors")
    assert triples["latents"].shape[0] == 4 and triples["timesteps"].tolist() != [triples["timesteps"][0]] * 4


def test_delta_grows_under_a_destructive_fine_tune_and_warns(images, pretrained, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="train"):
        train(fast_config(images, tmp_path, model=str(pretrained), lr=3e-2, max_grad_norm=0, max_steps=4,
                          **MONITOR))
    measured = retention_records(tmp_path)
    deltas = [r["retention_delta"] for r in measured]
    base = measured[0]["retention_base_loss"]
    assert deltas[0] == 0.0 and min(deltas[1:]) > 0.1 * base, measured  # more than 10% worse than the base
    assert "the retention loss rose" in caplog.text and "retention_warn" in caplog.text


def test_resume_keeps_the_triples_and_the_measurements(images, pretrained, tmp_path):
    options = dict(model=str(pretrained), lr=1e-2, **MONITOR)
    train(fast_config(images, tmp_path / "a", max_steps=4, **options))
    train(fast_config(images, tmp_path / "b", max_steps=2, **options))
    triples = (tmp_path / "b" / "retention.safetensors").read_bytes()
    train(fast_config(images, tmp_path / "b", max_steps=4, resume="latest", **options))
    assert (tmp_path / "b" / "retention.safetensors").read_bytes() == triples
    assert (tmp_path / "a" / "retention.safetensors").read_bytes() == triples
    assert records(tmp_path / "a") == [{**r, "img_per_s": a["img_per_s"]} if "img_per_s" in r else r
                                       for r, a in zip(records(tmp_path / "b"), records(tmp_path / "a"))]
    assert len(retention_records(tmp_path / "b")) == 3


def test_triples_of_other_settings_are_not_reused(images, pretrained, tmp_path):
    train(fast_config(images, tmp_path, model=str(pretrained), max_steps=1, **MONITOR))
    with pytest.raises(ConfigError, match="other retention settings"):
        Trainer(fast_config(images, tmp_path, model=str(pretrained), max_steps=2, resume="latest",
                            **{**MONITOR, "retention_prompts": ["a blue square"]}))


def test_the_shapes_judge_scores_retention_prompts_in_its_vocabulary_and_plot_draws_both(images, pretrained,
                                                                                         tmp_path):
    train(fast_config(images, tmp_path / "shapes", model=str(pretrained), max_steps=2, **MONITOR))
    measured = retention_records(tmp_path / "shapes")
    assert all(0.0 <= r["retention_shapes_accuracy"] <= 1.0 for r in measured)
    assert plot_main([str(tmp_path / "shapes")]) == 0
    with Image.open(tmp_path / "shapes" / "loss.png") as png:
        assert png.size == (900, 500 + 2 * 300)
    train(fast_config(images, tmp_path / "other", model=str(pretrained), max_steps=2,
                      **{**MONITOR, "retention_prompts": ["a photograph of a lake"]}))
    assert all("retention_shapes_accuracy" not in r for r in retention_records(tmp_path / "other"))


def test_retention_prompts_on_the_command_line_and_their_checks(images, tmp_path):
    import argparse

    from train.config import add_arguments, config_from_args
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = config_from_args(parser.parse_args(["--model", "preset:tiny", "--data", "d", "--output", "o",
                                                 "--retention-prompts", '["a red circle", "a blue square"]',
                                                 "--retention-every", "25"]))
    assert config.retention_prompts == ["a red circle", "a blue square"] and config.retention_every == 25
    with pytest.raises(ConfigError, match="retention_prompts must be a list of non-empty prompts"):
        fast_config(images, tmp_path, retention_prompts=[""]).validate()
    with pytest.raises(ConfigError, match="method vae trains no denoiser"):
        fast_config(images, tmp_path, method="vae", retention_prompts=["a red circle"]).validate()
