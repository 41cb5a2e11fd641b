"""Method lcm (latent consistency distillation, train.methods.lcm): its maths against closed forms, the loss falling,
exact resume, config errors, and the LCM-LoRA loading in generation and in diffusers."""
import json

import numpy as np
import pytest
import torch
from torch import nn

import ldm
from ldm.checkpoint import read_state_dict
from ldm.clip_model import load_clip
from metrics.clip import clip_similarities, preprocess
from oracles import diffusers_unet, import_oracle
from random_weights import random_clip_file
from sample import GenerationParams, generate
from sample.lora import applied, load_lora
from train import apply_lora, train
from train.config import ConfigError
from train.export import consolidate
from train.rewards import REWARDS, clip_pixels, clip_reward
from train.methods.lcm import (FAKE_SCORE_FILE, LCM_LOSSES, ConsistencyObjective, DistributionMatchingObjective,
                               boundary_scalings, consistency_distance, ddim_step, skipping_steps, split_prediction)
from train.trainer import Trainer, build_model
from train_support import fast_config, pretrained_file, single_process, torchrun, write_images
from train_support import images, pretrained  # noqa: F401 (module fixtures)


pytestmark = pytest.mark.usefixtures("one_thread")


def lcm_config(images, pretrained, output, **overrides):
    values = dict(model=str(pretrained), architecture={}, method="lcm", lcm_skip=100, lcm_guidance=3.0,
                  ema_decay=0.9, lora_rank=4, lora_alpha=4.0, lr=1e-2)
    return fast_config(images, output, **{**values, **overrides})


# --- the maths --------------------------------------------------------------------------------------------------------

def test_boundary_scalings_closed_form():
    t = torch.tensor([0, 1, 19, 999])
    c_skip, c_out = boundary_scalings(t)
    assert c_skip[0].item() == 1.0 and c_out[0].item() == 0.0  # f(z, 0) = z: the boundary condition
    scaled = 10.0 * t.double()
    torch.testing.assert_close(c_skip.double(), 0.25 / (scaled ** 2 + 0.25), atol=0, rtol=1e-6)
    # c_skip + c_out² = 1 for every t (σ_data² + (λt)² over the same denominator).
    torch.testing.assert_close((c_skip + c_out.square()).double(), torch.ones(4, dtype=torch.float64),
                               atol=1e-6, rtol=0)


def test_skipping_steps_land_on_the_grid_and_stop_at_zero():
    start, end = skipping_steps(torch.tensor([0, 19, 20, 985, 999]), skip=20, train_steps=1000)
    assert start.tolist() == [19, 19, 39, 999, 999] and end.tolist() == [0, 0, 19, 979, 979]
    # k not dividing T: the grid stops at N·k − 1 <= T − 1 (N = 3 points for k = 300).
    start, end = skipping_steps(torch.tensor([0, 333, 334, 999]), skip=300, train_steps=1000)
    assert start.tolist() == [299, 299, 599, 899] and end.tolist() == [0, 0, 299, 599]


def test_v_prediction_splits_into_the_data_and_the_noise():
    generator = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 4, 3, 3, generator=generator), torch.randn(2, 4, 3, 3, generator=generator)
    abar = torch.tensor([0.9, 0.2])[:, None, None, None]
    alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
    x_t, v = alpha * x0 + sigma * eps, alpha * eps - sigma * x0
    for prediction, kind in ((v, "v"), (eps, "eps")):
        got_x0, got_eps = split_prediction(prediction, x_t, alpha, sigma, kind)
        torch.testing.assert_close(got_x0, x0, atol=1e-5, rtol=0)
        torch.testing.assert_close(got_eps, eps, atol=1e-6, rtol=0)


class PointMass(nn.Module):
    """An ε-model that is exact for data concentrated at one point per conditioning: the context's first value is the
    point's (constant) value m, so ε(x_t, t) = (x_t − α_t m) / σ_t."""

    parameterization = "eps"

    def __init__(self):
        super().__init__()
        self.register_buffer("alphas_cumprod", torch.linspace(0.999, 0.01, 1000, dtype=torch.float64).float())

    def apply_model(self, x, t, context, y=None):
        abar = self.alphas_cumprod[t][:, None, None, None]
        point = context[:, :1, :1][:, :, :, None]  # [B, 1, 1, 1]
        return (x - abar.sqrt() * point) / (1 - abar).sqrt()


def point_mass_objective(guidance: float, loss: str = "huber", objective=ConsistencyObjective,
                         extra: nn.Module | None = None) -> ConsistencyObjective:
    model = PointMass()

    def conditioner(captions, *sizes):
        # Caption "m" -> the point m; the empty (unconditional) caption -> the point 0.
        return {"context": torch.tensor([float(c or 0) for c in captions])[:, None, None].expand(-1, 1, 2)}

    config = type("Settings", (), dict(lcm_skip=20, lcm_guidance=guidance, lcm_loss=loss, lcm_huber_c=0.001,
                                       lcm_reward_weight=0.0))
    return objective(model, conditioner, extra, model.apply_model, config, lambda: None)


class ShiftedPointMass(PointMass):
    """A fake score (x, t, context, y) -> ε that is exact for data at the point m + shift."""

    def __init__(self, shift: float):
        super().__init__()
        self.shift = shift

    def forward(self, x, t, context, y=None):
        return self.apply_model(x, t, context + self.shift)


def test_teacher_ddim_step_follows_the_guided_ode_of_an_analytic_denoiser():
    objective = point_mass_objective(guidance=3.0)
    abar = objective.model.alphas_cumprod
    start, end = torch.tensor([399, 99]), torch.tensor([379, 79])
    generator = torch.Generator().manual_seed(1)
    x_t = torch.randn(2, 4, 3, 3, generator=generator)
    cond, uncond = objective.conditioner(["2", "-1"]), objective.conditioner(["", ""])
    got = objective.teacher_step(x_t, start, end, cond, uncond)
    # CFG of two exact point-mass models is the exact model of the point s·m (uncond point 0), so the DDIM step
    # keeps ε fixed and moves the data estimate to that point: x_s = α_s · s·m + σ_s · ε.
    a_t, a_s = abar[start][:, None, None, None], abar[end][:, None, None, None]
    point = 3.0 * torch.tensor([2.0, -1.0])[:, None, None, None]
    eps = (x_t - a_t.sqrt() * point) / (1 - a_t).sqrt()
    torch.testing.assert_close(got, a_s.sqrt() * point + (1 - a_s).sqrt() * eps, atol=1e-5, rtol=0)
    # ddim_step from t to t is the identity.
    torch.testing.assert_close(ddim_step(x_t, eps, a_t, a_t), x_t, atol=1e-6, rtol=0)


def test_consistency_loss_at_the_boundary_is_the_distance_to_the_teacher_step():
    objective = point_mass_objective(guidance=1.0)
    abar = objective.model.alphas_cumprod
    generator = torch.Generator().manual_seed(2)
    latents, noise = torch.randn(2, 4, 3, 3, generator=generator), torch.randn(2, 4, 3, 3, generator=generator)
    # t < k: t_{n+k} = k − 1 = 19, t_n = 0, where the target is ẑ_0 itself (c_skip(0) = 1, c_out(0) = 0).
    loss = objective(latents, noise, torch.tensor([3, 17]), captions=["0.5", "1.5"])
    point = torch.tensor([0.5, 1.5])[:, None, None, None]
    a19, a0 = abar[19], abar[0]
    x19 = a19.sqrt() * latents + (1 - a19).sqrt() * noise
    eps = (x19 - a19.sqrt() * point) / (1 - a19).sqrt()
    target = a0.sqrt() * point + (1 - a0).sqrt() * eps
    c_skip, c_out = boundary_scalings(torch.tensor([19]))
    prediction = c_skip * x19 + c_out * point  # the exact model's x̂_0 is the point
    difference = prediction - target
    expected = ((difference.square() + 1e-6).sqrt() - 1e-3).mean(dim=(1, 2, 3))
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(consistency_distance(prediction, target, "l2", 0.001),
                               difference.square().mean(dim=(1, 2, 3)))


@pytest.mark.parametrize("shift", [0.0, 0.25])
def test_distribution_matching_of_point_masses(shift):
    """Student and teacher exact for points: the student draws m at every input (its x̂_0), the guided teacher's data
    is s·m (CFG of the points m and 0), the fake score's m + shift. DMD's gradient is then the same at every t:
    g = (m + shift − s·m) / |m − s·m|, so the matching loss ½ mean g² is known; a fake that matches the student
    (shift 0) has zero diffusion loss."""
    guidance = 3.0
    objective = point_mass_objective(guidance, objective=DistributionMatchingObjective,
                                     extra=ShiftedPointMass(shift))
    generator = torch.Generator().manual_seed(3)
    noise = torch.randn(4, 4, 3, 3, generator=generator)
    points = torch.tensor([0.5, 1.5, -1.0, 2.0])
    loss = objective(torch.zeros(4, 4, 3, 3), noise, torch.tensor([0, 300, 700, 999]),
                     captions=[str(m) for m in points.tolist()])
    # c_skip(t) ≈ 1e-8 at the student's timesteps (T − 1 and T/2 − 1), so x̂ is the point up to that.
    matching = 0.5 * ((points + shift - guidance * points) / (points - guidance * points).abs()).square()
    assert objective.parts["loss_matching"] == pytest.approx(matching.mean().item(), rel=1e-4)
    if shift == 0.0:
        torch.testing.assert_close(loss, matching, atol=1e-5, rtol=1e-4)
    else:
        # The fake's loss: its ε misses by α (m − (m + shift)) / σ at every t, so it is positive.
        assert objective.parts["loss_fake"] > 1e-3


def test_dmd_inputs_are_what_the_lcm_sampler_gives_the_student():
    """Even samples: pure noise at T − 1; odd samples: the student's own estimate re-noised to T/2 − 1."""
    objective = point_mass_objective(2.0, objective=DistributionMatchingObjective, extra=ShiftedPointMass(0.0))
    abar = objective.model.alphas_cumprod
    noise = torch.randn(4, 4, 3, 3, generator=torch.Generator().manual_seed(4))
    torch.manual_seed(0)
    x, t = objective.student_inputs(noise, objective.conditioner(["1", "2", "3", "4"]))
    assert t.tolist() == [999, 499, 999, 499]
    torch.testing.assert_close(x[0::2], (1 - abar[999]).sqrt() * noise[0::2])
    # x_499 = α m + σ ε' for the point m the student estimates: (x − α m) / σ is fresh unit noise.
    fresh = (x[1::2] - abar[499].sqrt() * torch.tensor([2.0, 4.0])[:, None, None, None]) / (1 - abar[499]).sqrt()
    assert abs(fresh.std().item() - 1) < 0.3 and not torch.allclose(fresh, noise[1::2])


# --- training ---------------------------------------------------------------------------------------------------------

def fixed_evaluations(trainer: Trainer):
    """The objective on the training images (the first epoch's first two batches), four fixed noise and timestep
    draws each, without gradients; yields each call's per-sample loss (the objective's `parts` are then that call's)."""
    generator = torch.Generator().manual_seed(7)
    batches = trainer._batches()
    with torch.no_grad():
        for _ in range(2):
            batch = next(batches)[-1]
            latents = trainer._latents(batch, torch.zeros(len(batch["caption"]), *trainer._latent_shape(batch)))
            for _ in range(4):
                noise = torch.randn(latents.shape, generator=generator)
                timesteps = torch.randint(0, 1000, (len(latents),), generator=generator)
                yield trainer.objective(latents, noise, timesteps, captions=batch["caption"])


def fixed_loss(trainer: Trainer) -> float:
    """The objective's mean loss with fixed draws (fixed_evaluations), against the target network the run has now."""
    return torch.cat(list(fixed_evaluations(trainer))).mean().item()


@pytest.mark.parametrize("student", ["lora", "full"])
def test_consistency_loss_falls(images, pretrained, tmp_path, student):
    # L2: the pseudo-Huber loss with c = 0.001 is almost L1, whose constant-size steps make a 30-step curve noisy.
    config = lcm_config(images, pretrained, tmp_path, lcm_student=student, lcm_loss="l2", max_steps=30, resolution=8,
                        bucket_min_size=8, bucket_max_size=8, lr=3e-3 if student == "lora" else 3e-4)
    trainer = Trainer(config)
    before = fixed_loss(trainer)
    result = trainer.run()
    after = fixed_loss(trainer)
    # Measured: LoRA 1.30 -> 1.05, full 1.30 -> 0.96 (the random base's teacher is far from consistent).
    assert after < 0.85 * before, (before, after)
    assert result.weights.name == ("lora.safetensors" if student == "lora" else "model.safetensors")


@pytest.mark.parametrize("student, objective", [("lora", "consistency"), ("full", "consistency"), ("full", "dmd")])
def test_resume_is_bitwise_identical(images, pretrained, tmp_path, student, objective):
    options = dict(gradient_accumulation=2, lr_scheduler="cosine", warmup_steps=1, caption_dropout=0.3,
                   lcm_student=student, lcm_objective=objective)
    straight = train(lcm_config(images, pretrained, tmp_path / "a", max_steps=4, **options))
    train(lcm_config(images, pretrained, tmp_path / "b", max_steps=2, **options))
    resumed = train(lcm_config(images, pretrained, tmp_path / "b", max_steps=4, resume="latest", **options))
    a, b = read_state_dict(straight.weights), read_state_dict(resumed.weights)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    losses = [[json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
              for run in ("a", "b")]
    assert losses[0] == losses[1] and len(losses[0]) == 4
    if objective == "dmd":  # the fake score is training state, restored from the checkpoint too
        a, b = (read_state_dict(tmp_path / run / FAKE_SCORE_FILE) for run in ("a", "b"))
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def test_dmd_trains_the_fake_score_on_the_students_samples(images, pretrained, tmp_path):
    """The fake score's diffusion loss on fixed student samples falls as it trains at its own learning rate (the
    student's is ~0 here, so that its samples stay put); the student's file is an ordinary model file."""
    config = lcm_config(images, pretrained, tmp_path, lcm_student="full", lcm_objective="dmd", max_steps=40,
                        resolution=8, bucket_min_size=8, bucket_max_size=8, lr=1e-9, lcm_fake_lr=1e-2)
    trainer = Trainer(config)
    objective = trainer.objective
    generator = torch.Generator().manual_seed(5)
    noise = torch.randn(8, *trainer._latent_shape(next(trainer._batches())[-1]), generator=generator)
    cond = objective.conditioner(["a red circle"] * 8)

    def fake_loss():
        torch.manual_seed(6)
        with torch.no_grad():
            x, t = objective.student_inputs(noise, cond)
            return objective.fake_loss(objective.consistency(x, t, cond), cond).mean().item()

    before = fake_loss()
    result = trainer.run()
    after = fake_loss()
    # Measured: 1.151 -> 1.007 (the random base's one-step samples leave much that no denoiser can predict).
    assert after < 0.92 * before, (before, after)
    assert (tmp_path / FAKE_SCORE_FILE).is_file()
    assert isinstance(ldm.load_model(result.weights), ldm.LatentDiffusion)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 40 and all({"loss_matching", "loss_fake"} <= row.keys() for row in rows)


def test_lcm_teacher_is_the_named_file_frozen(images, pretrained, tmp_path):
    """A student started from another file still distils the teacher named by lcm_teacher; a teacher of another
    architecture is a config error."""
    state = read_state_dict(pretrained)
    start = {key: value * 0.5 if key.startswith("model.diffusion_model.") else value for key, value in state.items()}
    ldm.save_model(ldm.load_model(start), tmp_path / "start.safetensors")
    trainer = Trainer(lcm_config(images, tmp_path / "start.safetensors", tmp_path / "run", lcm_student="full",
                                 lcm_teacher=str(pretrained)))
    teacher = trainer.method.teacher.state_dict()
    for key, value in teacher.items():
        torch.testing.assert_close(value, state["model." + key].float(), msg=key)
    assert not any(p.requires_grad for p in trainer.method.teacher.parameters())
    other = build_model(lcm_config(images, "preset:tiny", tmp_path), torch.device("cpu"))
    ldm.save_model(other, tmp_path / "other.safetensors")
    with pytest.raises(ConfigError, match="lcm_teacher=.*other.safetensors' has another UNet architecture"):
        Trainer(lcm_config(images, pretrained, tmp_path / "run2", lcm_teacher=str(tmp_path / "other.safetensors")))


def test_a_new_consistency_distance_is_one_table_entry(images, pretrained, tmp_path, monkeypatch):
    monkeypatch.setitem(LCM_LOSSES, "l1", lambda difference, c: difference.abs())
    lcm_config(images, pretrained, tmp_path, lcm_loss="l1").validate()
    a, b = torch.zeros(1, 1, 2, 2), torch.tensor([1.0, -2.0, 3.0, 0.0]).reshape(1, 1, 2, 2)
    assert consistency_distance(a, b, "l1", 0.001).tolist() == [1.5]


@pytest.mark.parametrize("overrides, message", [
    (dict(lcm_student="half"), "lcm_student='half' is not one of lora, full"),
    (dict(lcm_loss="l1"), "lcm_loss='l1' is not one of huber, l2"),
    (dict(lcm_skip=0), "lcm_skip must be in \\[1, 500\\]"),
    (dict(lcm_guidance=0.5), "lcm_guidance is the teacher's CFG scale and must be >= 1"),
    (dict(lcm_huber_c=0.0), "lcm_huber_c must be > 0"),
    (dict(train_text_encoder=True), "set train_text_encoder = false"),
    (dict(min_snr_gamma=5.0), "set min_snr_gamma = 0"),
    (dict(lcm_reward="aesthetic"), "lcm_reward='aesthetic' is not one of clip \\(or empty: no reward\\)"),
    (dict(lcm_reward="clip", cache_text=True), "set cache_text = false"),
    (dict(lcm_objective="gan"), "lcm_objective='gan' is not one of consistency, dmd"),
    (dict(lcm_objective="dmd"), "lcm_objective = 'dmd' trains a full student .*set lcm_student = 'full'"),
    (dict(lcm_fake_lr=-1.0), "lcm_fake_lr must be >= 0"),
    (dict(lcm_teacher="no-such.safetensors"), "lcm_teacher='no-such.safetensors' is not a file"),
])
def test_config_errors(images, pretrained, tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        lcm_config(images, pretrained, tmp_path, **overrides).validate()


# --- reward-guided distillation (train.rewards) -----------------------------------------------------------------------

def test_clip_pixels_match_clip_preprocessing():
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 32, 32, generator=generator) * 2 - 1
    # At CLIP's own resolution only preprocess's 8-bit quantisation differs (half a level, over the channel's std).
    torch.testing.assert_close(clip_pixels(images, 32), preprocess((images + 1) / 2, 32), atol=0.5 / 255 / 0.26,
                               rtol=0)
    # Resized (16 -> 48, as a 16-pixel decode for a 48-pixel CLIP): torch's bicubic against PIL's, on smooth images.
    smooth = nn.functional.interpolate(torch.rand(2, 3, 4, 4, generator=generator), size=16, mode="bilinear") * 2 - 1
    difference = (clip_pixels(smooth, 48) - preprocess((smooth + 1) / 2, 48)).abs()
    assert difference.mean() < 0.02 and difference.max() < 0.1, (difference.mean(), difference.max())


def test_clip_reward_is_the_clip_score_cosine(images, pretrained, tmp_path):
    random_clip_file(tmp_path / "clip.safetensors")
    config = lcm_config(images, pretrained, tmp_path, lcm_reward="clip",
                        lcm_reward_model=str(tmp_path / "clip.safetensors"))
    reward = clip_reward(config, torch.device("cpu"))
    pictures = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    captions = ["a red circle", "a blue square", ""]
    expected = clip_similarities(load_clip(tmp_path / "clip.safetensors"), list((pictures + 1) / 2), captions) / 100
    torch.testing.assert_close(reward(pictures, captions), expected, atol=2e-3, rtol=0)  # 8-bit quantisation


def brightness_reward(seen: list | None = None):
    """A REWARDS builder whose reward is the decoded image's mean value (recording the images it sees)."""
    def build(config, device):
        def reward(decoded, captions):
            if seen is not None:
                seen.append(decoded.detach())
            return decoded.float().mean(dim=(1, 2, 3))
        return reward
    return build


def test_a_registered_reward_adds_minus_beta_times_its_value(images, pretrained, tmp_path, monkeypatch):
    """A reward is one REWARDS entry; the loss is the consistency loss − β·R(decoded student estimate, caption), and a
    caption emptied by dropout gets no reward."""
    seen = []
    monkeypatch.setitem(REWARDS, "brightness", brightness_reward(seen))
    trainer = Trainer(lcm_config(images, pretrained, tmp_path, lcm_student="full", lcm_reward="brightness",
                                 lcm_reward_weight=0.5, resolution=8, bucket_min_size=8, bucket_max_size=8))
    objective = trainer.objective
    batch = next(trainer._batches())[-1]
    latents = trainer._latents(batch, torch.zeros(len(batch["caption"]), *trainer._latent_shape(batch)))
    generator = torch.Generator().manual_seed(4)
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.randint(0, 1000, (len(latents),), generator=generator)
    captions = [""] + list(batch["caption"][1:])
    with torch.no_grad():
        guided = objective(latents, noise, timesteps, captions=captions)
        parts = dict(objective.parts)
        objective.reward = None
        plain = objective(latents, noise, timesteps, captions=captions)
    decoded = seen[-1]
    assert decoded.shape == (len(latents), 3, 8, 8)
    value = decoded.mean(dim=(1, 2, 3))
    expected = plain - 0.5 * value * torch.tensor([0.0] + [1.0] * (len(latents) - 1))
    torch.testing.assert_close(guided, expected, atol=1e-6, rtol=1e-5)
    assert parts["reward"] == pytest.approx(value[1:].mean().item(), rel=1e-5)
    assert parts["loss_consistency"] == pytest.approx(plain.mean().item(), rel=1e-5)


def fixed_reward(trainer: Trainer) -> float:
    """The objective's mean reward with fixed draws (fixed_evaluations)."""
    return float(np.mean([trainer.objective.parts["reward"] for _ in fixed_evaluations(trainer)]))


@pytest.mark.parametrize("student", ["lora", "full"])
def test_reward_guided_distillation_climbs_the_reward(images, pretrained, tmp_path, monkeypatch, student):
    """The same 20 steps with the reward weighted (β = 100, so that it outweighs the random base's large consistency
    loss) and without it (β = 0): only the first makes the student's decoded estimates brighter."""
    monkeypatch.setitem(REWARDS, "brightness", brightness_reward())
    after = {}
    for weight in (0.0, 100.0):
        trainer = Trainer(lcm_config(images, pretrained, tmp_path / str(weight), lcm_student=student,
                                     lcm_reward="brightness", lcm_reward_weight=weight, max_steps=20, resolution=8,
                                     bucket_min_size=8, bucket_max_size=8, lr=3e-2 if student == "lora" else 3e-3))
        before = fixed_reward(trainer)
        trainer.run()
        after[weight] = fixed_reward(trainer)
    rows = [json.loads(line) for line in (tmp_path / "100.0" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 20 and all({"loss_consistency", "reward"} <= row.keys() for row in rows)
    # Measured (from 0.226): LoRA 0.227 without, 0.258 with; full 0.225 without, 0.349 with.
    assert after[100.0] > after[0.0] + 0.02, (before, after)


def test_a_missing_or_wrong_reward_model_is_a_config_error(images, pretrained, tmp_path):
    config = lcm_config(images, pretrained, tmp_path, lcm_reward="clip",
                        lcm_reward_model=str(tmp_path / "no.safetensors"))
    with pytest.raises(ConfigError, match="lcm_reward = 'clip' reads a CLIP file from lcm_reward_model; "
                                          ".*no.safetensors does not exist"):
        Trainer(config)
    not_a_clip = lcm_config(images, pretrained, tmp_path, lcm_reward="clip", lcm_reward_model=str(pretrained))
    with pytest.raises(ConfigError, match="lcm_reward_model: .*not a CLIP state dict"):
        Trainer(not_a_clip)


def test_a_reward_guided_checkpoint_exports_without_its_reward(images, pretrained, tmp_path, monkeypatch):
    """train.export reads weights only: a checkpoint of a reward-guided run consolidates where the reward (its
    registry entry, its model file) is not available, to the same file as where it is."""
    monkeypatch.setitem(REWARDS, "brightness", brightness_reward())
    train(lcm_config(images, pretrained, tmp_path / "run", lcm_reward="brightness", max_steps=2, save_every=2,
                     resolution=8, bucket_min_size=8, bucket_max_size=8))
    checkpoint = tmp_path / "run" / "checkpoint-2"
    with_reward = read_state_dict(consolidate(checkpoint, tmp_path / "with.safetensors"))
    monkeypatch.delitem(REWARDS, "brightness")
    without = read_state_dict(consolidate(checkpoint, tmp_path / "without.safetensors"))
    assert with_reward.keys() == without.keys() and len(without) > 0
    assert all(torch.equal(with_reward[k], without[k]) for k in without)


# --- the LCM-LoRA in generation and in diffusers ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def lcm_lora(images, pretrained, tmp_path_factory):
    output = tmp_path_factory.mktemp("lcm")
    config = lcm_config(images, pretrained, output, max_steps=3, lora_name="shapes-lcm", lr=5e-2)
    return train(config).weights


def test_lcm_lora_loads_as_a_prompt_tag_in_generate(pretrained, lcm_lora):
    model = ldm.load_model(pretrained).eval()
    # What `<lora:name:1>` runs (sample.lora.applied, the merge) equals the trained network's hooks.
    generator = torch.Generator().manual_seed(5)
    x, t = torch.randn(2, 4, 8, 8, generator=generator), torch.tensor([19, 619])
    with torch.no_grad():
        context = model.encode_prompt(["a red circle", "a blue square"])["context"]
        base = model.apply_model(x, t, context)
        with applied(model, [(load_lora(lcm_lora), 1.0, 1.0)]):
            merged = model.apply_model(x, t, context)
        network = apply_lora(model, lcm_lora, weight=1.0)
        hooked = model.apply_model(x, t, context)
        network.remove()
    torch.testing.assert_close(merged, hooked, atol=1e-5, rtol=1e-5)
    assert (merged - base).abs().max() > 1e-2
    # Through generate with the LCM sampler at CFG 1: the tag changes the image and the infotext names the file.
    params = dict(prompt="a red circle", seed=3, steps=2, width=16, height=16, cfg_scale=1.0, sampler_name="LCM")
    plain = generate(model, GenerationParams(**params), progress=False)
    tagged = generate(model, GenerationParams(**{**params, "prompt": "a red circle <lora:shapes-lcm:1>"}),
                      progress=False, lora_dir=lcm_lora.parent)
    assert not np.array_equal(np.asarray(tagged.images[0]), np.asarray(plain.images[0]))
    assert 'Lora hashes: "shapes-lcm: ' in tagged.infotexts[0] and "Sampler: LCM" in tagged.infotexts[0]


def test_lcm_lora_loads_in_diffusers_with_equal_outputs(pretrained, lcm_lora):
    """diffusers' load_lora_weights on a UNet is StableDiffusionLoraLoaderMixin.lora_state_dict (kohya names ->
    diffusers', with the UNet config for the CompVis block numbering) followed by load_lora_into_unet (peft); both
    are called here on the UNet diffusers' converter builds from the same base."""
    loaders = import_oracle("diffusers.loaders")
    import_oracle("peft")
    model = ldm.load_model(pretrained).eval()
    state = {"model.diffusion_model." + k: v for k, v in model.unet.state_dict().items()}
    unet, converted = diffusers_unet(model.preset.unet, model.preset.vae, state)
    unet.load_state_dict(converted, strict=True)
    unet.eval()
    mixin = loaders.StableDiffusionLoraLoaderMixin
    lora_state, alphas = mixin.lora_state_dict(str(lcm_lora), unet_config=unet.config)
    mixin.load_lora_into_unet(lora_state, alphas, unet)
    apply_lora(model, lcm_lora, weight=1.0)
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(2, 4, 8, 8, generator=generator)
    t = torch.tensor([19, 519])
    with torch.no_grad():
        context = model.encode_prompt(["a red circle", "a blue square"])["context"]
        ours = model.apply_model(x, t, context)
        theirs = unet(x, t, encoder_hidden_states=context).sample
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-4)
    # The adapters matter at this tolerance: the base alone differs.
    unet.disable_adapters()
    with torch.no_grad():
        assert (unet(x, t, encoder_hidden_states=context).sample - ours).abs().max() > 1e-3


@pytest.mark.slow
def test_two_process_ddp_matches_one_process_with_the_doubled_batch(tmp_path):
    """Both students under torchrun (gloo, CPU): the EMA target swap and the teacher run inside DDP's forward."""
    write_images(tmp_path / "images", 4, sizes=((16, 16),))
    model = pretrained_file(tmp_path / "base.safetensors")
    for student in ("lora", "full"):
        # A large Adam epsilon keeps updates proportional to the gradients (see tests/test_train_ddp.py); L2, because
        # pseudo-Huber with c = 0.001 is almost L1, whose gradient sign turns reduction round-off into 1e-5 steps.
        options = dict(model=str(model), architecture={}, method="lcm", lcm_student=student, lcm_skip=100,
                       lcm_loss="l2", lcm_guidance=3.0, max_steps=3, lr=1e-2, adam_epsilon=1e-2, ema_decay=0.5)
        distributed = fast_config(tmp_path / "images", tmp_path / f"ddp-{student}", batch_size=1, **options)
        torchrun(2, distributed, timeout=600)
        single = single_process(fast_config(tmp_path / "images", tmp_path / f"one-{student}", batch_size=2, **options))
        a, b = read_state_dict(tmp_path / f"ddp-{student}" / single.weights.name), read_state_dict(single.weights)
        assert a.keys() == b.keys()
        # Only the order of float reductions differs (all-reduce vs batch).
        for key in a:
            torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5, msg=key)
        losses = [[json.loads(line)["loss"] for line in (tmp_path / f"{run}-{student}" / "metrics.jsonl").read_text()
                   .splitlines()] for run in ("ddp", "one")]
        torch.testing.assert_close(torch.tensor(losses[0]), torch.tensor(losses[1]), atol=1e-6, rtol=1e-5)
