"""Method "clip": the contrastive loss against its closed form, the temperature's clip, GradCache against one big
batch, DDP (gloo) against one process with the doubled batch, exact resume, the file's round trips into metrics.clip
and ldm.clip / ldm.assemble, and zero-shot colour retrieval of a tiny CLIP trained here."""
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import ldm
from ldm.assemble import assemble, openclip_text_tower
from ldm.assemble import main as assemble_main
from ldm.checkpoint import read_state_dict
from ldm.clip import FrozenOpenCLIPEmbedder
from ldm.clip_model import CLIP, CLIPConfig, load_clip, save_clip
from shapes.__main__ import main as shapes_main
from shapes.dataset import make_dataset
from shapes.world import Vocabulary
from shapes.zero_shot import zero_shot_accuracy
from train import config_from_dict, train
from train.config import ConfigError
from train.contrastive import INITIAL_LOGIT_SCALE, clip_loss, gradient_cache_step
from train.methods.clip import ContrastivePretraining
from train.negatives import negative_captions, swap_colour_words, swap_spatial_words, turn_relation
from train_support import single_process, torchrun, write_images

# 16×16 images in 8×8 patches, one block per tower: a training step takes milliseconds.
TINY = dict(embed_dim=16, image_resolution=16, patch_size=8, vision_width=32, vision_layers=1, vision_heads=2,
            text_width=32, text_layers=1, text_heads=2)


def clip_config(data: Path, output: Path, **overrides):
    values = dict(model="preset:shapes-64", architecture=TINY, method="clip", data=str(data), output=str(output),
                  resolution=16, bucket=False, bucket_step=8, min_image_size=8, batch_size=4, max_steps=4, lr=1e-3,
                  progress=False, seed=1)
    values.update(overrides)
    return config_from_dict(values)


def tiny_clip(seed: int = 0) -> CLIP:
    torch.manual_seed(seed)
    return CLIP(CLIPConfig(**TINY, activation="gelu"))


# ----------------------------------------------------------------------------------------------------------------------
# The loss


def test_info_nce_matches_its_closed_form():
    torch.manual_seed(0)
    images, texts = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    scale = torch.tensor(1.3, dtype=torch.float64)
    # Radford et al. 2021, Fig. 3, written out per pair: -log softmax of the matching entry, along rows and columns.
    a, b = images / images.norm(dim=1, keepdim=True), texts / texts.norm(dim=1, keepdim=True)
    s = math.exp(1.3) * (a @ b.T).numpy()
    rows = [-(s[i, i] - math.log(sum(math.exp(s[i, j]) for j in range(5)))) for i in range(5)]
    columns = [-(s[j, j] - math.log(sum(math.exp(s[i, j]) for i in range(5)))) for j in range(5)]
    expected = (sum(rows) / 5 + sum(columns) / 5) / 2
    assert clip_loss(images, texts, scale).item() == pytest.approx(expected, rel=1e-6)
    # Perfectly aligned, well separated pairs cost almost nothing; the loss starts near log N for random ones.
    identity = torch.eye(5)
    assert clip_loss(identity, identity, torch.tensor(math.log(100))).item() < 1e-3


def test_temperature_is_clipped_at_100_with_no_gradient_beyond():
    torch.manual_seed(0)
    images, texts = torch.randn(6, 4), torch.randn(6, 4)
    above = torch.tensor(math.log(1000.0), requires_grad=True)
    at = torch.tensor(math.log(100.0))
    loss = clip_loss(images, texts, above)
    loss.backward()
    assert loss.item() == pytest.approx(clip_loss(images, texts, at).item(), rel=1e-6)
    assert above.grad.item() == 0.0
    below = torch.tensor(INITIAL_LOGIT_SCALE, requires_grad=True)
    clip_loss(images, texts, below).backward()
    assert below.grad.item() != 0.0
    assert math.exp(INITIAL_LOGIT_SCALE) == pytest.approx(1 / 0.07)
    assert tiny_clip().logit_scale.item() == pytest.approx(INITIAL_LOGIT_SCALE)


def test_hard_negatives_are_extra_columns_of_the_image_to_text_half_only():
    torch.manual_seed(0)
    images, texts = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    negatives = torch.randn(2, 3, dtype=torch.float64)
    a, b = images / images.norm(dim=1, keepdim=True), texts / texts.norm(dim=1, keepdim=True)
    n = negatives / negatives.norm(dim=1, keepdim=True)
    s = math.exp(1.3) * (a @ torch.cat([b, n]).T).numpy()  # [4, 6]: the batch's captions, then the negatives
    rows = [-(s[i, i] - math.log(sum(math.exp(s[i, j]) for j in range(6)))) for i in range(4)]
    columns = [-(s[j, j] - math.log(sum(math.exp(s[i, j]) for i in range(4)))) for j in range(4)]
    expected = (sum(rows) / 4 + sum(columns) / 4) / 2
    scale = torch.tensor(1.3, dtype=torch.float64)
    assert clip_loss(images, texts, scale, negatives).item() == pytest.approx(expected, rel=1e-6)
    # The negatives only add terms to the rows' denominators: the loss rises.
    assert clip_loss(images, texts, scale, negatives).item() > clip_loss(images, texts, scale).item()


def test_negative_captions_change_spatial_words_and_swap_colours():
    assert swap_spatial_words("a red circle left of a blue square") == ["a red circle right of a blue square"]
    assert swap_spatial_words("Above, a cross near the top") == ["Below, a cross near the bottom"]
    assert swap_spatial_words("a red circle in the center") == []
    assert swap_colour_words("a red circle left of a blue square") == ["a blue circle left of a red square"]
    assert swap_colour_words("Red circle, red square") == []
    assert swap_colour_words("Red circle under a Blue square") == ["Blue circle under a Red square"]
    # Negatives that are true captions of the step are dropped, and each negative is used once.
    batch = ["a red circle on the left", "a red circle on the right", "a blue square on the left"]
    assert negative_captions(batch[:1], ["spatial"], batch) == []
    assert negative_captions(batch, ["spatial", "colours"]) == ["a blue square on the right"]
    assert negative_captions(["a red circle left of a blue square"] * 2, ["spatial", "colours"]) == [
        "a red circle right of a blue square", "a blue circle left of a red square"]


def test_relations_turn_to_the_other_axis():
    assert turn_relation("a red circle to the left of a blue square") == [
        "a red circle above a blue square", "a red circle below a blue square"]
    assert turn_relation("Beneath the star, a cross") == ["To the left of the star, a cross",
                                                          "To the right of the star, a cross"]
    # Position phrases are not relations; only the first relation phrase turns.
    assert turn_relation("a red circle on the left") == []
    assert turn_relation("a star over a cross under a circle") == ["a star to the left of a cross under a circle",
                                                                   "a star to the right of a cross under a circle"]
    # With the opposites, every wrong relation of the four is a negative.
    assert sorted(negative_captions(["a star right of a cross"], ["spatial", "axes"])) == [
        "a star above a cross", "a star below a cross", "a star left of a cross"]


def test_hard_negatives_of_micro_batches_are_those_of_the_whole_step(tmp_path, monkeypatch):
    # Two micro-batches whose captions give the same negative: the step holds it once, as one big batch would.
    make_dataset(tmp_path / "shapes", 8, seed=0, width=16, height=16)
    config = clip_config(tmp_path / "shapes", tmp_path / "run", data_format="imagefolder", verify_images=False,
                         clip_negatives=["spatial", "colours"])
    method = ContrastivePretraining(config, tiny_clip())
    captions = [["a red circle on the left", "a blue cross"], ["a red circle on the left", "a red square on the right"]]
    micro_batches = [({"pixels": torch.zeros(2, 3, 16, 16), "caption": c}, None) for c in captions]
    seen = []
    monkeypatch.setattr(method, "model_inputs", lambda batch, device, negatives=(): seen.append(list(negatives)))
    monkeypatch.setattr("train.methods.clip.gradient_cache_step", lambda embed, train, count: 0.0)
    method.accumulate(SimpleNamespace(device=torch.device("cpu")), micro_batches)
    assert seen == [["a red circle on the right"], ["a red square on the left"]]
    assert sum(seen, []) == negative_captions(sum(captions, []), ["spatial", "colours"])


@pytest.mark.parametrize("with_negatives", [False, True], ids=["plain", "hard-negatives"])
def test_gradient_cache_over_micro_batches_equals_one_big_batch(with_negatives):
    model = tiny_clip()
    torch.manual_seed(1)
    pixels = torch.randn(10, 3, 16, 16)
    tokens = model.tokenizer([f"caption number {i}" for i in range(10)])
    # Micro-batch 0 has two hard negatives, micro-batch 1 none, micro-batch 2 one.
    negative = model.tokenizer([f"negative caption {i}" for i in range(3)]) if with_negatives else None
    micro = [(pixels[:4], tokens[:4], None if negative is None else negative[:2]), (pixels[4:8], tokens[4:8], None),
             (pixels[8:], tokens[8:], None if negative is None else negative[2:])]

    def run(p, t, n=None):
        return (model.encode_image(p), model.encode_text(t), model.logit_scale,
                None if n is None else model.encode_text(n))

    big = clip_loss(*run(pixels, tokens, negative))
    big.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    def train_micro(i, loss_of):
        loss = loss_of(*run(*micro[i]))
        loss.backward()
        return loss

    loss = gradient_cache_step(lambda i: run(*micro[i]), train_micro, len(micro))
    assert loss == pytest.approx(big.item(), rel=1e-6)
    for name, parameter in model.named_parameters():
        # Only float32 round-off differs (the sums over micro-batches are ordered differently).
        torch.testing.assert_close(parameter.grad, expected[name], atol=1e-6, rtol=1e-4, msg=name)
    assert expected["logit_scale"].abs().item() > 0


# ----------------------------------------------------------------------------------------------------------------------
# The engine


def test_training_lowers_the_loss_and_resumes_bitwise(tmp_path):
    write_images(tmp_path / "images", 8, sizes=((16, 16),))
    whole = train(clip_config(tmp_path / "images", tmp_path / "whole", max_steps=6, gradient_accumulation=2,
                              lr=3e-3, ema_decay=0.9))
    losses = [json.loads(line)["loss"] for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0]
    train(clip_config(tmp_path / "images", tmp_path / "part", max_steps=3, gradient_accumulation=2, lr=3e-3,
                      ema_decay=0.9, save_every=3))
    resumed = train(clip_config(tmp_path / "images", tmp_path / "part", max_steps=6, gradient_accumulation=2,
                                lr=3e-3, ema_decay=0.9, resume="latest"))
    a, b = read_state_dict(whole.weights), read_state_dict(resumed.weights)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_training_with_hard_negatives_resumes_bitwise(tmp_path):
    # Renders with positions and relations, so both kinds of negatives occur; two micro-batches per step.
    make_dataset(tmp_path / "shapes", 32, seed=0, two_object_fraction=0.5, width=16, height=16)
    options = dict(data_format="imagefolder", verify_images=False, batch_size=8, gradient_accumulation=2, lr=3e-3,
                   clip_negatives=["spatial", "colours"])
    whole = train(clip_config(tmp_path / "shapes", tmp_path / "whole", max_steps=4, **options))
    plain = train(clip_config(tmp_path / "shapes", tmp_path / "plain", max_steps=4,
                              **{**options, "clip_negatives": []}))
    train(clip_config(tmp_path / "shapes", tmp_path / "part", max_steps=2, save_every=2, **options))
    resumed = train(clip_config(tmp_path / "shapes", tmp_path / "part", max_steps=4, resume="latest", **options))
    a, b, c = (read_state_dict(r.weights) for r in (whole, resumed, plain))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)  # the negatives took part


def test_two_process_ddp_matches_one_process_with_the_doubled_batch(tmp_path):
    write_images(tmp_path / "images", 8, sizes=((16, 16),))
    # Two micro-batches per step: GradCache and the all-gather together. A large Adam epsilon keeps updates
    # proportional to the gradients (see test_train_ddp), so this compares gradients.
    options = dict(max_steps=3, lr=1e-2, adam_epsilon=1e-2, gradient_accumulation=2)
    distributed = clip_config(tmp_path / "images", tmp_path / "ddp", **{**options, "batch_size": 2})
    torchrun(2, distributed, timeout=600)
    single = single_process(clip_config(tmp_path / "images", tmp_path / "one", **{**options, "batch_size": 4}))
    a, b = read_state_dict(tmp_path / "ddp" / "clip.safetensors"), read_state_dict(single.weights)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5, msg=key)
    losses = [[json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
              for run in ("ddp", "one")]
    torch.testing.assert_close(torch.tensor(losses[0]), torch.tensor(losses[1]), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("overrides, message", [
    (dict(bucket=True), "bucket = false"),
    (dict(resolution=24), "resolution = 16"),
    (dict(caption_dropout=0.1), "caption_dropout = 0"),
    (dict(cache_latents=True), "cache_latents"),
    (dict(model="preset:tiny"), "presets are"),
    (dict(architecture={"unet": {}}), "unknown key"),
    (dict(clip_negatives=["antonyms"]), "spatial, colours"),
    (dict(clip_negatives=["spatial"], method="full", model="preset:tiny", architecture={}), "method clip"),
])
def test_settings_that_cannot_train_a_clip_are_refused(tmp_path, overrides, message):
    write_images(tmp_path / "images", 4, sizes=((16, 16),))
    with pytest.raises(ConfigError, match=message):
        train(clip_config(tmp_path / "images", tmp_path / "run", **overrides))


# ----------------------------------------------------------------------------------------------------------------------
# The file


def test_the_file_round_trips_into_metrics_clip_and_ldm_clip(tmp_path, capsys):
    model = tiny_clip(3)
    with torch.no_grad():
        for parameter in model.parameters():  # non-trivial values everywhere (LayerNorms start at 1 and 0)
            parameter.add_(0.02 * torch.randn_like(parameter))
    save_clip(model, tmp_path / "clip.safetensors")
    loaded = load_clip(tmp_path / "clip.safetensors")
    assert loaded.config == model.config  # activation and head counts from the metadata
    original, again = model.state_dict(), loaded.state_dict()
    assert original.keys() == again.keys() and all(torch.equal(original[k], again[k]) for k in original)

    # The text keys are an SD2-family text encoder's `model.*`, loaded strictly, bitwise.
    config, text_state = openclip_text_tower(str(tmp_path / "clip.safetensors"))
    encoder = FrozenOpenCLIPEmbedder(width=config.width, layers=config.layers, heads=config.heads,
                                     embed_dim=config.embed_dim, layer="last", return_pooled=True)
    encoder.model.load_state_dict(text_state, strict=True)
    tokens = model.tokenizer(["a red circle above a blue star", "a green square"])
    with torch.no_grad():
        _, pooled = encoder.encode_tokens(tokens)
        torch.testing.assert_close(pooled, model.encode_text(tokens), atol=0, rtol=0)

    # Assembled into a whole model, saved and loaded: the text tower is still the CLIP's, bitwise.
    base = ldm.create_model("tiny")
    assembled = assemble(base, config, text_state, seed=0)
    ldm.save_model(assembled, tmp_path / "model.safetensors")
    reloaded = ldm.load_model(tmp_path / "model.safetensors")
    assert reloaded.preset.family == "sd2" and reloaded.preset.unet.context_dim == 32
    assert reloaded.preset.text == (config,)
    text = reloaded.cond_stage_model.model.state_dict()
    assert all(torch.equal(text[k], original[k]) for k in text)
    vae = reloaded.first_stage_model.state_dict()
    assert all(torch.equal(v, base.first_stage_model.state_dict()[k]) for k, v in vae.items())

    # The command, with a destination it cannot write (a folder of that name): exit 2 and one line, no traceback.
    ldm.save_model(base, tmp_path / "base.safetensors")
    (tmp_path / "taken.safetensors").mkdir()
    status = assemble_main(["--base", str(tmp_path / "base.safetensors"), "--text-encoder",
                            str(tmp_path / "clip.safetensors"), "--out", str(tmp_path / "taken.safetensors")])
    [line] = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and line.startswith("python -m ldm.assemble: error: ") and "Is a directory" in line, line


def test_assemble_with_the_last_layer_conditions_on_the_states_contrastive_training_shaped(tmp_path, capsys):
    model = tiny_clip(4)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    save_clip(model, tmp_path / "clip.safetensors")
    ldm.save_model(ldm.create_model("tiny"), tmp_path / "base.safetensors")
    for layer in ("penultimate", "last"):
        assert assemble_main(["--base", str(tmp_path / "base.safetensors"), "--text-encoder",
                              str(tmp_path / "clip.safetensors"), "--out", str(tmp_path / f"{layer}.safetensors"),
                              "--text-layer", layer]) == 0
    # Only the unconventional choice is recorded (SD2's convention is the penultimate block), and it loads back.
    assert "ldm.text_layers" not in ldm.read_metadata(tmp_path / "penultimate.safetensors")
    assert ldm.read_metadata(tmp_path / "last.safetensors")["ldm.text_layers"] == "last"
    penultimate, last = (ldm.load_model(tmp_path / f"{layer}.safetensors") for layer in ("penultimate", "last"))
    assert (penultimate.preset.text[0].layer, last.preset.text[0].layer) == ("penultimate", "last")
    # With the last block, the end-of-text state of the UNet's context, projected, is the CLIP's text embedding.
    captions = ["a red circle above a blue star", "a green square"]
    tokens = model.tokenizer(captions)
    with torch.no_grad():
        context = last.cond_stage_model.encode_tokens(tokens)
        eos = tokens.argmax(dim=-1)
        projected = context[torch.arange(len(captions)), eos] @ last.cond_stage_model.model.text_projection
        torch.testing.assert_close(projected, model.encode_text(tokens), atol=1e-6, rtol=1e-5)


def test_assemble_refuses_a_quick_gelu_clip_in_one_line(tmp_path, capsys):
    torch.manual_seed(0)
    save_clip(CLIP(CLIPConfig(**TINY)), tmp_path / "openai.safetensors")  # OpenAI's quick_gelu
    ldm.save_model(ldm.create_model("tiny"), tmp_path / "base.safetensors")
    status = assemble_main(["--base", str(tmp_path / "base.safetensors"), "--text-encoder",
                            str(tmp_path / "openai.safetensors"), "--out", str(tmp_path / "out.safetensors")])
    error = capsys.readouterr().err
    assert status == 2 and "quick_gelu" in error and len(error.strip().splitlines()) == 1
    assert not (tmp_path / "out.safetensors").exists()


# ----------------------------------------------------------------------------------------------------------------------
# Zero-shot retrieval


def test_a_tiny_clip_trained_on_renders_tells_colours_apart(tmp_path):
    vocabulary = Vocabulary.restricted(shapes=("circle", "square"), colours=("red", "green", "blue", "yellow"))
    make_dataset(tmp_path / "shapes", 256, seed=0, vocabulary=vocabulary, two_object_fraction=0.0, width=16,
                 height=16)
    result = train(clip_config(tmp_path / "shapes", tmp_path / "run", data_format="imagefolder", batch_size=32,
                               max_steps=80, lr=3e-3, warmup_steps=10, verify_images=False))
    model = load_clip(result.weights)
    accuracy = zero_shot_accuracy(model, n=64, seed=0, vocabulary=vocabulary)
    assert accuracy["colour_chance"] == 0.25
    # Chance is 0.25; 1.0 measured after 150 steps, so 80 leave a wide margin.
    assert accuracy["colour"] > 0.6


def test_clip_eval_reports_a_missing_file_in_one_line(capsys):
    with pytest.raises(SystemExit) as exit_status:
        shapes_main(["clip-eval", "--clip", "missing.safetensors"])
    error = capsys.readouterr().err
    assert exit_status.value.code == 2 and "missing.safetensors" in error and len(error.strip().splitlines()) == 1
