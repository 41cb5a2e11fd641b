"""`python -m metrics.compare`: same prompts and seeds per model, files ready for the human study, per-model metrics
including the shapes adherence hook, and the side-by-side report.

The generation pipeline is replaced by a stand-in with `sample.generate`'s interface (a Result with PIL `images` and
`infotexts`): model "good" draws the scene its shapes prompt describes, model "blank" draws nothing, so the adherence
scores have a known order.
"""
import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from PIL import Image

import metrics.compare as compare
from metrics.clip import clip_similarities
from random_weights import random_clip_file
from sample.imagefiles import read_prompt
from shapes.dataset import sample
from shapes.world import Vocabulary, render

SCENES = dict(reversed(sample(seed=3, index=i, vocabulary=Vocabulary())) for i in range(3))  # prompt -> scene


@dataclass
class StandInParams:
    prompt: str = ""
    seed: int = -1
    negative_prompt: str = ""
    sampler_name: str = "Euler a"
    scheduler: str = "Automatic"
    steps: int = 20
    cfg_scale: float = 7.0
    width: int | None = None
    height: int | None = None


@dataclass
class StandInResult:
    images: list = field(default_factory=list)
    infotexts: list = field(default_factory=list)


def stand_in_generate(model: str, params: StandInParams, embeddings=None) -> StandInResult:
    if model == "good" and params.prompt in SCENES:
        image = render(SCENES[params.prompt])
    else:
        image = Image.new("RGB", (64, 64), "white")
    infotext = (f"{params.prompt}\nSteps: {params.steps}, Sampler: {params.sampler_name}, Seed: {params.seed}, "
                f"Model: {model}")
    return StandInResult([image], [infotext])


@pytest.fixture
def pipeline(monkeypatch, tmp_path):
    monkeypatch.setattr(compare, "generation_pipeline", lambda: (stand_in_generate, StandInParams))
    monkeypatch.setattr(compare, "load_generator", lambda spec, device: (Path(spec.base).stem, None))  # good, blank
    checkpoints = {}
    for name in ("good", "blank"):
        checkpoints[name] = tmp_path / f"{name}.safetensors"
        checkpoints[name].write_bytes(b"weights")
    return checkpoints


def test_compare_generates_the_same_prompts_and_seeds_per_model(pipeline, tmp_path, capsys):
    prompts = list(SCENES)
    (tmp_path / "prompts.txt").write_text("# shapes prompts\n" + "\n".join(prompts) + "\n\n")
    outdir = tmp_path / "out"
    assert compare.main(["--prompts", str(tmp_path / "prompts.txt"), "--model", str(pipeline["good"]), "--model",
                         f"empty={pipeline['blank']}", "--seeds", "5,9", "--steps", "12", "--outdir",
                         str(outdir)]) == 0
    result = json.loads(capsys.readouterr().out)
    names = sorted(p.name for p in (outdir / "good").glob("*.png"))
    assert names == sorted(f"{i:04d}-{seed}.png" for i in range(3) for seed in (5, 9))
    assert names == sorted(p.name for p in (outdir / "empty").glob("*.png"))  # ready for metrics.human serve
    first = Image.open(outdir / "good" / "0001-9.png")
    assert "Seed: 9" in first.info["parameters"] and "Steps: 12" in first.info["parameters"]
    assert read_prompt(outdir / "empty" / "0001-9.png") == prompts[1]
    # The adherence hook: the shapes judge scores the scene-drawing model above the blank one.
    good, blank = result["metrics"]["good"], result["metrics"]["empty"]
    assert good["shapes shape"] > blank.get("shapes shape", 0) and good["shapes images"] == 6
    page = (outdir / "index.html").read_text()
    assert page.count("<h2>") == 3 and page.count("data:image/png;base64,") == 12
    assert "shapes shape" in page and "Seed: 5" in page


def test_adherence_scores_are_left_out_for_prompts_outside_the_domain(pipeline, tmp_path, capsys):
    (tmp_path / "prompts.txt").write_text("a photograph of a mountain lake at dawn\n")
    assert compare.main(["--prompts", str(tmp_path / "prompts.txt"), "--model", str(pipeline["good"]), "--model",
                         str(pipeline["blank"]), "--outdir", str(tmp_path / "out")]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"] == {"good": {}, "blank": {}}


def test_compare_reports_the_clip_score_of_each_model(pipeline, tmp_path, capsys):
    clip = random_clip_file(tmp_path / "clip.safetensors")
    prompts = list(SCENES)[:2]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in prompts))
    assert compare.main(["--prompts", str(tmp_path / "prompts.jsonl"), "--model", str(pipeline["good"]), "--model",
                         str(pipeline["blank"]), "--clip-weights", str(tmp_path / "clip.safetensors"),
                         "--adherence", "shapes", "--outdir", str(tmp_path / "out")]) == 0
    metrics = json.loads(capsys.readouterr().out)["metrics"]
    images = [Image.open(tmp_path / "out" / "good" / f"{i:04d}-0.png").convert("RGB") for i in range(2)]
    expected = max(clip_similarities(clip, images, prompts).mean().item(), 0.0)
    assert metrics["good"]["clip_score"] == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("arguments, message", [
    (["--model", "{good}"], "at least two --model"),
    (["--model", "{good}", "--model", "{good}"], "labels must differ"),
    (["--model", "{good}", "--model", "x={missing}"], "file not found"),
    (["--model", "{good}", "--model", "x={good}+{missing}:0.5"], "file not found"),
    (["--model", "{good}", "--model", "x={good}+"], "expected BASE[+FILE[:STRENGTH]]"),
    (["--model", "{good}", "--model", "{blank}", "--seeds", "1,x"], "comma-separated integers"),
    (["--model", "{good}", "--model", "{blank}", "--seeds", "-1"], "fixed seed")])
def test_compare_usage_errors_exit_2_with_one_line(pipeline, tmp_path, capsys, arguments, message):
    (tmp_path / "prompts.txt").write_text("a red circle\n")
    argv = ["--prompts", str(tmp_path / "prompts.txt")] + [
        a.format(good=pipeline["good"], blank=pipeline["blank"], missing=tmp_path / "missing.ckpt")
        for a in arguments]
    with pytest.raises(SystemExit) as exit_info:
        compare.main(argv)
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in error and error.count("\n") == 1


def test_compare_drives_the_real_pipeline_deterministically(tmp_path, capsys):
    """With sample.generate itself on a tiny random model: the same checkpoint under two labels gives identical
    images for the same prompt and seed, written with the pipeline's infotext."""
    import ldm
    torch.manual_seed(0)
    ldm.save_model(ldm.create_model("tiny"), tmp_path / "tiny.safetensors")
    (tmp_path / "prompts.txt").write_text("a red circle\n")
    assert compare.main(["--prompts", str(tmp_path / "prompts.txt"), "--model", f"a={tmp_path / 'tiny.safetensors'}",
                         "--model", f"b={tmp_path / 'tiny.safetensors'}", "--steps", "2", "--seeds", "3",
                         "--width", "64", "--height", "64", "--device", "cpu", "--outdir", str(tmp_path / "out")]) == 0
    capsys.readouterr()
    first, second = (Image.open(tmp_path / "out" / label / "0000-3.png") for label in ("a", "b"))
    assert first.tobytes() == second.tobytes()
    assert "Seed: 3" in first.info["parameters"] and "Steps: 2" in first.info["parameters"]
