"""The embedded default model (ldm/data/tiny-shapes.safetensors, docs/SHAPES.md): it loads as what it is, its hash is
stable, it draws what it is asked for (judged by metrics.shapes), and a short fine-tune teaches it a new word."""
import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

import ldm
from ldm.checkpoint import read_metadata, read_state_dict
from metrics.shapes import main as shapes_metric_main
from sample import GenerationParams, generate
from sample.models import DEFAULT_MODEL, default_model
from shapes.captions import parse_caption
from shapes.dataset import make_dataset
from shapes.judge import detect_objects, generate_images, nearest_colour, score_image
from shapes.world import Vocabulary
from train import config_from_dict, train

# sha256 of the shipped file; A1111's "Model hash" is its first 10 hex digits. Retraining changes it on purpose.
SHA256 = "0fa35f15e4d65c0551ba12e5f8e9ba911988590040d9eb0688d326e29f04308f"


@pytest.fixture(scope="module")
def checkpoint():
    return default_model()


def test_the_file_is_an_fp16_sd1_style_model_under_25_mb_with_its_own_settings():
    assert DEFAULT_MODEL.stat().st_size <= 25 * 10**6
    metadata = read_metadata(DEFAULT_MODEL)
    assert metadata["ldm.prediction"] == "v" and metadata["ldm.resolution"] == "64"
    state = read_state_dict(DEFAULT_MODEL)
    assert {v.dtype for k, v in state.items() if k != "alphas_cumprod"} == {torch.float16}
    # Original (CompVis) key layout: the three top-level modules of an SD1 checkpoint and nothing else.
    assert {k.split(".")[0] for k in state} == {"model", "first_stage_model", "cond_stage_model", "alphas_cumprod"}
    model = ldm.load_model(DEFAULT_MODEL)
    assert model.preset.family == "sd1" and model.preset.resolution == 64 and model.parameterization == "v"
    assert model.scale_factor == float(metadata["ldm.scale_factor"]) != ldm.PRESETS["sd15"].scale_factor


def test_hash_and_name_are_stable_and_go_into_the_infotext(checkpoint):
    assert hashlib.sha256(DEFAULT_MODEL.read_bytes()).hexdigest() == SHA256
    assert ldm.model_hash(DEFAULT_MODEL) == SHA256[:10]
    assert (checkpoint.name, checkpoint.hash) == ("tiny-shapes", SHA256[:10])
    assert checkpoint.model.dtype == torch.float32  # on a CPU
    result = generate(checkpoint, GenerationParams(prompt="a red circle", seed=3, steps=2), progress=False)
    assert result.images[0].size == (64, 64)  # the model's own resolution when none is given
    assert f"Model hash: {SHA256[:10]}, Model: tiny-shapes" in result.infotexts[0]


def test_a_red_circle_is_mostly_red_on_white(checkpoint):
    """Euler a, 20 steps, CFG 3 (the model's best range is 2-3, docs/SHAPES.md), four seeds: each image is white
    background around one red circle."""
    result = generate(checkpoint, GenerationParams(prompt="a red circle", seed=0, steps=20, cfg_scale=3.0,
                                                   batch_size=4), progress=False)
    for image in result.images:
        pixels = np.asarray(image, dtype=np.float64).reshape(-1, 3)
        ink = np.linalg.norm(pixels - 255.0, axis=1) > 60.0
        assert 0.02 < ink.mean() < 0.5  # an object, on a mostly white background
        reds = sum(nearest_colour(rgb) == "red" for rgb in pixels[ink])
        assert reds / ink.sum() > 0.8
        objects = detect_objects(image)
        assert [(o.colour, o.shape) for o in objects] == [("red", "circle")]


def test_metrics_shapes_generates_for_held_out_prompts_with_the_default_model(tmp_path, capsys):
    grid = tmp_path / "grid.png"
    assert shapes_metric_main(["--model", "default", "--n", "4", "--steps", "4", "--cfg-scale", "5",
                               "--grid", str(grid), "--outdir", str(tmp_path / "images")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == 4 and summary["unparsed"] == 0
    rows = [json.loads(line) for line in (tmp_path / "images" / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and Image.open(tmp_path / "images" / rows[0]["file_name"]).size == (64, 64)
    assert grid.is_file()


def colour_accuracy(prompts: list[str], lora=None) -> float:
    """Share of images whose object has the colour the prompt means ("zqx" means purple), Euler a, 20 steps, CFG 5."""
    images = generate_images(str(DEFAULT_MODEL), prompts, seed=0, steps=20, cfg_scale=5.0, lora=lora,
                             progress=False)
    scores = [score_image(p, detect_objects(image), parse_caption(p.replace("zqx", "purple")))
              for p, image in zip(prompts, images)]
    return sum(bool(s.colour[0]) for s in scores) / len(scores)


def test_a_short_lora_fine_tune_teaches_a_new_colour_word(tmp_path):
    """'zqx' never occurred in the model's training captions; 32 images of purple shapes captioned with it and a
    40-step LoRA run (a few seconds) make the model draw "a zqx <shape>" purple in most images instead of never. A
    smoke test of the whole fine-tune -> LoRA file -> generation -> judge path: such a tiny run is not stable in its
    step count (60 steps drifted back to red here), the measured experiment with 200 images is docs/RESULTS.md."""
    data = tmp_path / "zqx"
    make_dataset(data, 32, seed=5, vocabulary=Vocabulary(colours=("purple",)), two_object_fraction=0.0)
    rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()]
    (data / "metadata.jsonl").write_text("".join(
        json.dumps({**row, "text": row["text"].replace("purple", "zqx")}) + "\n" for row in rows))
    prompts = [f"a zqx {shape}" for shape in ("circle", "square", "triangle", "hexagon", "cross", "star")] * 2
    before = colour_accuracy(prompts)
    result = train(config_from_dict(dict(
        model=str(DEFAULT_MODEL), method="lora", train_text_encoder=True, data=str(data), output=str(tmp_path / "out"),
        resolution=64, bucket=False, flip=False, random_crop=False, min_image_size=16, verify_images=False,
        cache_latents=True, max_steps=40, batch_size=8, lr=2e-3, lora_rank=8, lora_alpha=8.0, lora_name="zqx",
        progress=False, seed=0)))
    after = colour_accuracy(prompts, lora=str(result.weights))
    assert before <= 0.1 and after >= 0.5, (before, after)  # measured: 0.0 -> 0.67
    # The scorer's --lora-strength: at 0 the LoRA changes no pixel, at 1 it changes the images.
    short = dict(seed=0, steps=4, cfg_scale=5.0, progress=False)
    plain = [np.asarray(image) for image in generate_images(str(DEFAULT_MODEL), prompts[:2], **short)]
    for strength, same in ((0.0, True), (1.0, False)):
        images = generate_images(str(DEFAULT_MODEL), prompts[:2], lora=str(result.weights), lora_strength=strength,
                                 **short)
        assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(plain, images)) == same, strength
