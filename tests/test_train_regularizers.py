"""train.regularizers and the concept-scoped option: the penalties against closed forms (L2-SP; EWC with a
hand-computed Fisher on a 2-parameter model; distillation zero while the student is the teacher), the Fisher saved and
reused, Custom Diffusion's train_scope, and a short run with each regularizer resuming bitwise."""
import json

import pytest
import torch

from ldm.checkpoint import read_state_dict
from train import ConfigError, train
from train import regularizers as regularizers_module
from train.regularizers import Anchor, diagonal_fisher, ewc_penalty, l2_sp_penalty
from train.trainer import Trainer
from train_support import fast_config
from train_support import images, pretrained  # noqa: F401 (module fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")
# The base's triples: two prompts × one generation × two (t, noise) draws, 2 sampling steps.
BASE_GENERATIONS = dict(architecture={}, retention_prompts=["a red circle", "a shape number 3"], retention_images=1,
                        retention_timesteps=2, validation_steps=2, retention_every=100)


def config(images, pretrained, output, **overrides):
    return fast_config(images, output, model=str(pretrained), **{**BASE_GENERATIONS, **overrides})


def test_l2_sp_is_half_the_weighted_squared_distance_to_the_base():
    weight = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    base = torch.tensor([0.0, -1.0, 0.5])
    anchors = [Anchor("w", weight, lambda: weight - base)]
    penalty = l2_sp_penalty(anchors, 0.3)
    assert penalty.item() == pytest.approx(0.3 / 2 * (1.0 + 1.0 + 0.0))
    penalty.backward()
    assert weight.grad.tolist() == pytest.approx([0.3 * 1.0, 0.3 * -1.0, 0.0])  # α (θ − θ*)


def test_ewc_with_the_fisher_of_a_two_parameter_model_computed_by_hand():
    a, b = torch.nn.Parameter(torch.tensor(0.5)), torch.nn.Parameter(torch.tensor(-1.0))
    xs, ys = [1.0, 2.0, -1.0], [0.0, 1.0, 2.0]
    # ℓ_m = (a x_m + b − y_m)²: ∂ℓ/∂a = 2 r x, ∂ℓ/∂b = 2 r with r = a x + b − y = −0.5, −1, −3.5.
    fisher = diagonal_fisher({"a": a, "b": b}, [lambda x=x, y=y: (a * x + b - y) ** 2 for x, y in zip(xs, ys)])
    residuals = [0.5 * x - 1.0 - y for x, y in zip(xs, ys)]
    expected_a = sum((2 * r * x) ** 2 for r, x in zip(residuals, xs)) / 3  # (1 + 16 + 49) / 3 = 22
    expected_b = sum((2 * r) ** 2 for r in residuals) / 3  # (1 + 4 + 49) / 3 = 18
    assert expected_a == 22.0 and fisher["a"].item() == pytest.approx(expected_a, rel=1e-6)
    assert expected_b == 18.0 and fisher["b"].item() == pytest.approx(expected_b, rel=1e-6)
    assert a.grad is None and b.grad is None  # nothing left in .grad for the optimizer
    base_a, base_b = a.detach().clone(), b.detach().clone()
    with torch.no_grad():
        a += 0.1
        b -= 0.2
    anchors = [Anchor("a", a, lambda: a - base_a), Anchor("b", b, lambda: b - base_b)]
    expected = 2.0 / 2 * (22 * 0.1 ** 2 + 18 * 0.2 ** 2)
    assert ewc_penalty(anchors, fisher, 2.0).item() == pytest.approx(expected, rel=1e-6)


def test_distillation_is_zero_while_the_student_is_the_teacher(images, pretrained, tmp_path):
    trainer = Trainer(config(images, pretrained, tmp_path / "full", regularizers={"distillation": 1.0}))
    # The same model on the same inputs, batched differently: equal up to float rounding (predictions are O(1)).
    assert trainer.regularizers["distillation"].penalty(0, 0).item() < 1e-10
    lora = Trainer(config(images, pretrained, tmp_path / "lora", method="lora",
                          regularizers={"distillation": 1.0, "l2_sp": 1.0, "ewc": 1.0}))
    assert lora.regularizers["l2_sp"].penalty(0, 0).item() == 0.0  # up = 0: ΔW = 0
    assert lora.regularizers["ewc"].penalty(0, 0).item() == 0.0
    assert lora.regularizers["distillation"].penalty(0, 0).item() < 1e-10
    with torch.no_grad():
        for parameter in trainer.model.unet.parameters():
            parameter.add_(0.01)
    assert trainer.regularizers["distillation"].penalty(0, 0).item() > 1e-6


def test_l2_sp_on_a_full_fine_tune_measures_the_change_of_the_weights(images, pretrained, tmp_path):
    trainer = Trainer(config(images, pretrained, tmp_path, regularizers={"l2_sp": 2.0}))
    weight = trainer.model.unet.out[2].weight
    with torch.no_grad():
        weight.add_(0.1)
    assert trainer.regularizers["l2_sp"].penalty(0, 0).item() == pytest.approx(2.0 / 2 * 0.01 * weight.numel(),
                                                                               rel=1e-5)


def test_the_fisher_is_saved_and_reused(images, pretrained, tmp_path, monkeypatch):
    train(config(images, pretrained, tmp_path, method="lora", max_steps=2, save_every=1, regularizers={"ewc": 1.0}))
    fisher = read_state_dict(tmp_path / "fisher.safetensors")
    assert fisher and all((f >= 0).all() for f in fisher.values()) and any(f.sum() > 0 for f in fisher.values())

    def must_not_run(*args):
        raise AssertionError("the Fisher was estimated again")
    monkeypatch.setattr(regularizers_module, "diagonal_fisher", must_not_run)
    train(config(images, pretrained, tmp_path, method="lora", max_steps=3, resume="latest",
                 regularizers={"ewc": 1.0}))


@pytest.mark.parametrize("options", [
    dict(method="full", regularizers={"l2_sp": 10.0}),
    dict(method="lora", regularizers={"ewc": 100.0}),
    dict(method="full", regularizers={"distillation": 1.0}),
    dict(method="lora", train_scope="cross_attention_kv", regularizers={"distillation": 1.0, "l2_sp": 1.0}),
], ids=["full-l2sp", "lora-ewc", "full-distillation", "lora-kv-distillation-l2sp"])
def test_a_run_with_each_regularizer_resumes_bitwise(images, pretrained, tmp_path, options):
    straight = train(config(images, pretrained, tmp_path / "a", max_steps=4, lr=1e-2, **options))
    train(config(images, pretrained, tmp_path / "b", max_steps=2, lr=1e-2, **options))
    resumed = train(config(images, pretrained, tmp_path / "b", max_steps=4, lr=1e-2, resume="latest", **options))
    a, b = read_state_dict(straight.weights), read_state_dict(resumed.weights)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    logs = [[{k: v for k, v in json.loads(line).items() if k != "img_per_s"}
             for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()] for run in ("a", "b")]
    # The split run ended once at step 2, where the forgetting monitor takes a last-step reading; otherwise the logs
    # are the same line for line.
    split_reading = [r for r in logs[1] if "retention_delta" in r and r["step"] == 2]
    assert len(split_reading) == 1
    assert logs[0] == [r for r in logs[1] if r is not split_reading[0]]
    steps = [r for r in logs[0] if "loss" in r]
    assert all(f"penalty_{name}" in r for r in steps for name in options["regularizers"])
    assert any(r[f"penalty_{name}"] > 0 for r in steps[1:] for name in options["regularizers"])


def test_cross_attention_kv_scope_trains_only_the_key_and_value_projections(images, pretrained, tmp_path):
    full = Trainer(config(images, pretrained, tmp_path / "full", train_scope="cross_attention_kv"))
    trained = [name for name, p in full.model.named_parameters() if p.requires_grad]
    assert trained and all(".attn2.to_k." in n or ".attn2.to_v." in n for n in trained)
    lora = Trainer(config(images, pretrained, tmp_path / "lora", method="lora", train_scope="cross_attention_kv"))
    names = list(lora.method.network.adapters)
    assert names and all(n.endswith(("attn2_to_k", "attn2_to_v")) for n in names)


@pytest.mark.parametrize("overrides, message", [
    (dict(regularizers={"weight_decay_plus": 1.0}), "unknown weight_decay_plus"),
    (dict(regularizers={"l2_sp": -1.0}), "number >= 0"),
    (dict(regularizers={"ewc": 1.0}, retention_prompts=[]), "set retention_prompts"),
    (dict(regularizers={"l2_sp": 1.0}, method="textual-inversion", token="sks",
          caption_template="{token} {caption}"), "trains none that the base has"),
])
def test_regularizer_settings_that_cannot_work_are_refused(images, pretrained, tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        Trainer(config(images, pretrained, tmp_path, **overrides))
