"""Several models scored at once with one feature CLIP (`python -m metrics.evaluate --model ...`): the labelled
metrics with bootstrap intervals, the zero-shot IS, Spearman's ρ against the judge, and model specs with a LoRA.

Stand-in generators (as in test_metrics_compare) give models of known quality: "good" draws the scene its shapes
prompt describes, "half" does so for every other prompt, "blank" draws nothing; the real pipeline runs on tiny random
checkpoints for the wiring and the LoRA spec."""
import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

import ldm
import metrics.compare as compare
import metrics.evaluate as evaluate
from metrics.clip import clip_similarities, image_embeddings, text_embeddings, zero_shot_logits
from metrics.distribution import FeatureComparison, classifier_score, inception_score
from metrics.features import read_image
from metrics.ranking import display_name, orientation, rank_agreement, spearman
from oracles import import_oracle
from random_weights import random_clip_file
from sample import load_checkpoint, load_lora, save_merged
from sample_helpers import one_thread, random_tiny  # noqa: F401  (autouse fixture)
from shapes.dataset import make_dataset, sample
from shapes.world import Vocabulary, render
from test_metrics_compare import StandInParams, StandInResult

SCENES = dict(reversed(sample(seed=5, index=i, vocabulary=Vocabulary())) for i in range(8))  # prompt -> scene
LABELLED = ("fd", "kid", "precision", "recall", "density", "coverage", "clip_score", "is_clip_zeroshot")
HEAD_WIDTHS = ["--clip-vision-head-width", "32", "--clip-text-head-width", "16"]


def test_spearman_matches_scipy_with_ties_and_is_undefined_without_spread():
    stats = import_oracle("scipy.stats")
    x, y = [3.0, 1.0, 4.0, 1.0, 5.0], [2.0, 7.0, 1.0, 8.0, 2.0]
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    assert spearman([1, 2], [1, 1]) is None and spearman([1.0], [2.0]) is None


def test_rank_agreement_counts_lower_fd_and_kid_as_better():
    assert [orientation(n) for n in ("fd_shapesCLIP", "kid_x", "fid", "precision_x", "is_clip_zeroshot_x")] == \
        [-1, -1, -1, 1, 1]
    assert display_name("fd_shapesCLIP", "shapesCLIP") == "FD-shapesCLIP"
    assert display_name("is_clip_zeroshot_a", "a") == "IS-zero-shot-a" and display_name("fd_clip", "a") == "fd_clip"
    metrics = {"a": {"fd_x": 1.0, "recall_x": 0.9}, "b": {"fd_x": 5.0, "recall_x": 0.2}, "c": {"fd_x": 9.0,
                                                                                              "recall_x": 0.5}}
    judge = {"a": 0.9, "b": 0.5, "c": 0.1}
    assert rank_agreement(metrics, judge) == pytest.approx({"fd_x": 1.0, "recall_x": 0.5})


def test_zero_shot_inception_score_matches_a_hand_computed_value():
    """Two classes, two images each exactly on one class prompt: cos 1 with its own, 0 with the other; with the
    inverse temperature ln 3, p(y|x) = (3/4, 1/4) and (1/4, 3/4), p(y) = (1/2, 1/2), so
    IS = exp(3/4 ln(3/2) + 1/4 ln(1/2))."""
    class Stub:
        logit_scale = torch.tensor(math.log(math.log(3.0)))  # stored as the log of the scale, as CLIP does

    classes = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    images = torch.tensor([[2.0, 0.0], [0.0, 0.5]])  # lengths do not matter: cosines
    logits = zero_shot_logits(Stub(), images, classes)
    torch.testing.assert_close(torch.softmax(logits, dim=1), torch.tensor([[0.75, 0.25], [0.25, 0.75]]))
    expected = math.exp(0.75 * math.log(1.5) + 0.25 * math.log(0.5))
    assert classifier_score(logits.numpy()) == pytest.approx(expected, rel=1e-6)


@pytest.fixture(scope="module")
def feature_clip(tmp_path_factory):
    """A random CLIP with heads of width 32 (image) and 16 (text), as small trained CLIPs have; read with
    --clip-vision-head-width 32 --clip-text-head-width 16 (HEAD_WIDTHS)."""
    path = tmp_path_factory.mktemp("clip") / "tinyCLIP.safetensors"
    return path, random_clip_file(path, vision_heads=2, text_heads=4)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Held-out renders of the shapes world: the real set."""
    root = tmp_path_factory.mktemp("reference") / "shapes"
    make_dataset(root, 24, seed=9)
    return root


def test_folder_mode_reports_every_labelled_metric_with_intervals(reference, feature_clip, tmp_path, capsys):
    path, model = feature_clip
    fake = tmp_path / "fake"
    fake.mkdir()
    prompts = list(SCENES)
    for i, prompt in enumerate(prompts):
        render(SCENES[prompt]).save(fake / f"{i:03d}.png")
        (fake / f"{i:03d}.txt").write_text(prompt)
    (tmp_path / "classes.txt").write_text("a red circle\na blue square\na green star\n")
    assert evaluate.main(["--real", str(reference), "--fake", str(fake), "--feature-clip", str(path),
                          "--feature-label", "tiny", "--zero-shot-classes", str(tmp_path / "classes.txt"),
                          "--bootstrap", "20", "--report", str(tmp_path / "r.html")] + HEAD_WIDTHS) == 0
    result = json.loads(capsys.readouterr().out)
    assert sorted(result["metrics"]) == sorted(f"{name}_tiny" for name in LABELLED)
    assert result["intervals"].keys() == result["metrics"].keys()
    for name, value in result["metrics"].items():
        low, high = result["intervals"][name]
        assert low <= value <= high, name
    assert 0 <= result["intervals"]["precision_tiny"][0] <= result["intervals"]["precision_tiny"][1] <= 1
    # The numbers are the metric functions' on the CLIP's own outputs.
    images = [read_image(fake / f"{i:03d}.png") for i in range(len(prompts))]
    real = [read_image(p) for p in sorted(reference.glob("*.png"))]
    comparison = FeatureComparison(image_embeddings(model, real).double().numpy(),
                                   image_embeddings(model, images).double().numpy(), 3)
    assert result["metrics"]["fd_tiny"] == pytest.approx(comparison.frechet_distance(), rel=1e-6)
    assert (result["metrics"]["precision_tiny"], result["metrics"]["recall_tiny"]) == comparison.precision_recall()
    assert (result["metrics"]["density_tiny"], result["metrics"]["coverage_tiny"]) == comparison.density_coverage()
    assert result["metrics"]["clip_score_tiny"] == pytest.approx(
        max(clip_similarities(model, images, prompts).mean().item(), 0), abs=1e-4)
    logits = zero_shot_logits(model, image_embeddings(model, images),
                              text_embeddings(model, ["a red circle", "a blue square", "a green star"]))
    assert result["metrics"]["is_clip_zeroshot_tiny"] == pytest.approx(
        inception_score(logits.double().numpy(), 1)[0], rel=1e-5)
    page = (tmp_path / "r.html").read_text()
    assert "FD-tiny" in page and "IS-zero-shot-tiny" in page


def stand_in_generate(model: str, params: StandInParams, embeddings=None) -> StandInResult:
    index = params.seed  # --seed 0: image i has seed i
    draws = model == "good" or (model == "half" and index % 2 == 0)
    image = render(SCENES[params.prompt]) if draws else Image.new("RGB", (64, 64), "white")
    return StandInResult([image], [f"{params.prompt}\nSteps: {params.steps}, Seed: {params.seed}, Model: {model}"])


@pytest.fixture
def stand_ins(monkeypatch, tmp_path):
    monkeypatch.setattr(compare, "generation_pipeline", lambda: (lambda m, p, progress, embeddings:
                                                                 stand_in_generate(m, p), StandInParams))
    monkeypatch.setattr(compare, "load_generator", lambda spec, device: (Path(spec.base).stem, None))
    files = {}
    for name in ("good", "half", "blank"):
        files[name] = tmp_path / f"{name}.safetensors"
        files[name].write_bytes(b"weights")
    (tmp_path / "prompts.txt").write_text("\n".join(SCENES) + "\n")
    return files


def test_models_are_generated_scored_and_ranked_as_the_judge_ranks_them(stand_ins, reference, feature_clip,
                                                                        tmp_path, capsys):
    outdir = tmp_path / "evaluation"
    assert evaluate.main(["--real", str(reference), "--model", f"good={stand_ins['good']}", "--model",
                          f"half={stand_ins['half']}", "--model", f"blank={stand_ins['blank']}", "--prompts",
                          str(tmp_path / "prompts.txt"), "--n", str(len(SCENES)), "--feature-clip",
                          str(feature_clip[0]), "--feature-label", "tiny", "--zero-shot-classes", "shapes",
                          "--bootstrap", "20", "--outdir", str(outdir)] + HEAD_WIDTHS) == 0
    result = json.loads(capsys.readouterr().out)
    models = result["models"]
    assert list(models) == ["good", "half", "blank"] and result["counts"] == {"generated_per_model": 8, "real": 24}
    for label, model in models.items():
        assert sorted(model["metrics"]) == sorted(f"{name}_tiny" for name in LABELLED), label
        assert model["intervals"].keys() == model["metrics"].keys()
        assert sorted(p.name for p in (outdir / label).glob("*.png")) == [f"{i:06d}.png" for i in range(8)]
    overall = [models[label]["adherence"]["shapes overall"] for label in models]
    assert overall[0] > overall[1] > overall[2]
    # The ranking check: recall orders the models as the judge does (blank images cover nothing, half of them half);
    # in a random CLIP's features 8 images separate only the blank model by FD.
    assert result["ranking"]["order"] == ["good", "half", "blank"]
    assert result["ranking"]["spearman"]["recall_tiny"] == pytest.approx(1.0)
    assert models["blank"]["metrics"]["fd_tiny"] > max(models[m]["metrics"]["fd_tiny"] for m in ("good", "half"))
    assert result["ranking"]["spearman"]["fd_tiny"] >= 0.5
    assert set(result["ranking"]["spearman"]) == set(models["good"]["metrics"])
    page = (outdir / "index.html").read_text()
    assert "FD-tiny (lower is better)" in page and "Spearman" in page and "shapes overall" in page
    assert "fid" not in json.dumps(result["models"]).lower().replace("confidence", "")


def test_model_mode_usage_errors_exit_2_with_one_line(stand_ins, reference, feature_clip, capsys):
    base = ["--real", str(reference), "--model", str(stand_ins["good"]), "--model", str(stand_ins["blank"]),
            *HEAD_WIDTHS]
    for extra, message in ((["--feature-clip", str(feature_clip[0]), "--fake", "x"], "either --fake"),
                           ([], "needs --feature-clip"),
                           (["--feature-clip", str(feature_clip[0]), "--metrics", "fid"], "--feature-clip metrics"),
                           (["--feature-clip", str(feature_clip[0]), "--feature-label", "a_b"], "--feature-label"),
                           (["--feature-clip", str(feature_clip[0]), "--n", "3"], "--n must exceed --pr-k"),
                           (["--feature-clip", str(reference / "missing.safetensors")], "file not found"),
                           (["--feature-clip", str(feature_clip[0]), "--zero-shot-classes", "animals"],
                            "neither a class vocabulary")):
        with pytest.raises(SystemExit) as exit_info:
            evaluate.main(base + extra)
        error = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in error and error.count("\n") == 1, (extra, error)


def test_a_lora_spec_in_model_mode_draws_bitwise_what_the_manual_merge_draws(reference, feature_clip, tmp_path,
                                                                            capsys):
    """The real pipeline on a tiny random checkpoint: `base+lora:0.5` and the file save_merged wrote give the same
    PNG bytes and so the same numbers; the untouched base differs."""
    from test_model_specs import ATTENTION_K
    loaded = random_tiny()
    ldm.save_model(loaded.model, tmp_path / "base.safetensors")
    weight = loaded.model.unet.input_blocks[4][1].transformer_blocks[0].attn2.to_k.weight
    generator = torch.Generator().manual_seed(1)
    from safetensors.torch import save_file
    save_file({f"{ATTENTION_K}.lora_down.weight": torch.randn(2, weight.shape[1], generator=generator),
               f"{ATTENTION_K}.lora_up.weight": torch.randn(weight.shape[0], 2, generator=generator) * 3,
               f"{ATTENTION_K}.alpha": torch.tensor(2.0)}, str(tmp_path / "lora.safetensors"))
    base = load_checkpoint(tmp_path / "base.safetensors", dtype=torch.float32)
    save_merged(base.model, [(load_lora(tmp_path / "lora.safetensors"), 0.5, 0.5)], tmp_path / "merged.safetensors")
    outdir = tmp_path / "evaluation"
    assert evaluate.main(["--real", str(reference), "--model", f"manual={tmp_path / 'merged.safetensors'}",
                          "--model", f"spec={tmp_path / 'base.safetensors'}+{tmp_path / 'lora.safetensors'}:0.5",
                          "--model", f"plain={tmp_path / 'base.safetensors'}", "--n", "4", "--steps", "2",
                          "--feature-clip", str(feature_clip[0]), "--bootstrap", "0", "--device", "cpu",
                          "--outdir", str(outdir)] + HEAD_WIDTHS) == 0
    result = json.loads(capsys.readouterr().out)
    for i in range(4):
        manual, spec, plain = (Image.open(outdir / label / f"{i:06d}.png") for label in ("manual", "spec", "plain"))
        assert manual.tobytes() == spec.tobytes()
        assert "Seed: " + str(i) in spec.info["parameters"]
    assert any(Image.open(outdir / "plain" / f"{i:06d}.png").tobytes()
               != Image.open(outdir / "spec" / f"{i:06d}.png").tobytes() for i in range(4))
    assert result["models"]["manual"]["metrics"] == result["models"]["spec"]["metrics"]
    assert result["models"]["spec"]["intervals"] == {} and "fd_tinyCLIP" in result["models"]["spec"]["metrics"]
    assert result["ranking"] is None or set(result["ranking"]["spearman"]) >= {"fd_tinyCLIP"}


def test_untrained_model_is_the_default_model_with_a_fresh_seeded_unet():
    from sample.models import default_model, load_model_spec
    state = torch.random.get_rng_state()
    untrained, _ = load_model_spec("untrained", dtype=torch.float32)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is left as it was
    again, trained = load_model_spec("untrained", dtype=torch.float32)[0], default_model(dtype=torch.float32)
    first, second, shipped = (m.model.state_dict() for m in (untrained, again, trained))
    assert untrained.name == "untrained" and all(torch.equal(first[k], second[k]) for k in first)
    for key in first:
        assert torch.equal(first[key], shipped[key]) != key.startswith("model.diffusion_model."), key


@pytest.mark.slow
def test_the_shipped_model_outranks_the_untrained_one_on_every_labelled_metric(reference, feature_clip, tmp_path,
                                                                                capsys):
    """The real pipeline on the shipped model and `untrained` (its UNet freshly initialised): the judge ranks the
    shipped model first, and so do FD and KID, even in a random CLIP's features (the untrained model's blobs are far
    from every render)."""
    assert evaluate.main(["--real", str(reference), "--model", "shipped=default", "--model", "untrained=untrained",
                          "--n", "8", "--steps", "10", "--cfg-scale", "3", "--feature-clip", str(feature_clip[0]),
                          "--zero-shot-classes", "shapes", "--bootstrap", "20", "--device", "cpu",
                          "--outdir", str(tmp_path / "evaluation")] + HEAD_WIDTHS) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["ranking"]["order"] == ["shipped", "untrained"]
    assert result["ranking"]["spearman"]["fd_tinyCLIP"] == 1.0 and result["ranking"]["spearman"]["kid_tinyCLIP"] == 1.0
