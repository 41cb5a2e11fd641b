"""Latent consistency distillation (Luo et al. 2023, "Latent Consistency Models", Algorithm 1): a student that maps
any point of the teacher's classifier-free-guided probability-flow ODE straight to its origin, for 1–4 step sampling.

One training step, for a latent z_0 with caption c (timesteps are the model's integer DDPM steps, α_t = sqrt(ᾱ_t),
σ_t = sqrt(1 − ᾱ_t)):
  1. t_{n+k} on the skipping grid {k−1, 2k−1, …, T−1}, t_n = max(t_{n+k} − k, 0) (k = lcm_skip; LCM §4.3 "skipping
     time steps"), and z_{t_{n+k}} = α z_0 + σ ε.
  2. The teacher (the frozen base) with CFG, LCM eq. 6 (written with the usual scale s = 1 + the paper's ω):
        ε̃ = ε(z, ∅) + s · (ε(z, c) − ε(z, ∅))
     and one DDIM step from t_{n+k} to t_n (the ODE solver Ψ of Algorithm 1; Song et al. 2021, eq. 12 with η = 0):
        x̂_0 = (z_{t_{n+k}} − σ_{t_{n+k}} ε̃) / α_{t_{n+k}},   ẑ_{t_n} = α_{t_n} x̂_0 + σ_{t_n} ε̃.
  3. The consistency function (LCM eq. 9, Song et al. 2023's boundary-condition parameterisation):
        f(z, t) = c_skip(t) z + c_out(t) x̂_0(z, t),
        c_skip(t) = σ_data² / ((λt)² + σ_data²),  c_out(t) = λt / sqrt((λt)² + σ_data²),  σ_data = 0.5, λ = 10
     so f(z, 0) = z exactly (c_skip(0) = 1, c_out(0) = 0); λ (diffusers' timestep_scaling) makes c_skip negligible
     from t ≈ 1 on, where f is the model's own x_0 estimate.
  4. Loss d(f_θ(z_{t_{n+k}}, t_{n+k}), f_θ⁻(ẑ_{t_n}, t_n)) (Algorithm 1's L(θ, θ⁻)), with the target network θ⁻ the
     engine's EMA of the student (ema_decay; LCM uses μ = 0.95) under stop-gradient, or with ema_decay = 0 the
     student itself under stop-gradient (μ = 0, as diffusers' LCM-LoRA script does). The engine's EMA is used, not a
     second copy, because it is already saved and restored bitwise with every checkpoint and costs no extra memory;
     the price is that the final file then holds the EMA weights, which is what a consistency model samples with.
     d is the pseudo-Huber distance sqrt(‖a − b‖² + c²) − c per element (c = lcm_huber_c; Song & Dhariwal 2023) or L2.
  5. With lcm_reward (reward-guided LCD, Li et al. 2024, eq. 7; train.rewards): − β · R(D(f_θ(z_{t_{n+k}})), c), the
     reward of the student's estimate decoded by the frozen autoencoder, against its caption (β = lcm_reward_weight).

Students: method "lcm" with lcm_student = "lora" trains kohya-format LoRA adapters (an LCM-LoRA: the teacher is the
base with the adapters switched off) and saves `<lora_name>.safetensors`; lcm_student = "full" trains the whole UNet
against a frozen copy of the base and saves an ordinary model file. Both distil one fixed guidance scale
(lcm_guidance): the paper's w-conditioned full student needs a guidance-embedding input the UNet's checkpoint keys do
not have, so it is not offered; sample a distilled model with CFG 1. lcm_teacher names another file as the teacher
(its UNet, frozen), so a student can start from an earlier distillation and still learn from the base.

Distribution matching (lcm_objective = "dmd"; DMD, Yin et al. 2023, eq. 7; DMD2, Yin et al. 2024), for a full student,
best started from a consistency-distilled one: consistency distillation can at most follow the teacher's ODE, and the
ODE draws worse outlines here than the teacher's stochastic sampler (docs/RESULTS.md); DMD instead moves the
student's samples towards the teacher's distribution, whichever sampler reaches it. One step, per sample:
  1. The student's input is what the LCM sampler gives it: pure noise at t = T − 1 (even samples), or (odd samples,
     DMD2's backward simulation) its own stop-gradient one-step estimate re-noised to T/2 − 1, the second of two steps.
     x̂ = f_θ(input) (eq. 9 above).
  2. The fake score s_φ, a copy of the teacher trained beside the student (the objective's `extra`, its own
     learning rate lcm_fake_lr) with the ordinary diffusion loss on the stop-gradient x̂: it models the student's
     distribution.
  3. At t uniform in [0.02 T, 0.98 T], x_t = α x̂ + σ ε, the KL's gradient with respect to x̂ is (DMD eq. 7–8, with the
     data-space normalisation of §4.2): g = (x̂_0^fake(x_t) − x̂_0^real(x_t)) / mean|x̂ − x̂_0^real(x_t)|, real = the
     teacher with CFG lcm_guidance, fake = s_φ without guidance; loss ½‖x̂ − sg(x̂ − g)‖² (mean per element), whose
     gradient with respect to x̂ is g.
  4. The fake score's loss is added: the student's term does not reach φ (the fake runs without gradients there) and
     the fake's term does not reach θ (it sees sg(x̂)), so one backward pass and one optimizer step train both (one
     fake update per student update; DMD2 uses five, at large scale). With lcm_reward the reward term (5. above) is
     added on x̂.
The fake score is training state: it is written beside the weights file (fake-score.safetensors) so a run resumes
exactly; the student's file is an ordinary model file.
"""
import copy
from pathlib import Path

import torch
from torch import nn

import ldm
from ldm.checkpoint import read_state_dict, save_state_dict
from ..config import ConfigError, TrainConfig
from ..ema import swapped
from ..objective import noisy_latents
from ..rewards import REWARDS
from .base import Method, mismatched_tensors, need
from .lora import LoRA

SIGMA_DATA = 0.5
TIMESTEP_SCALING = 10.0
LCM_STUDENTS = ("lora", "full")
LCM_OBJECTIVES = ("consistency", "dmd")
FAKE_SCORE_FILE = "fake-score.safetensors"
# DMD's range of diffusion times for the distribution-matching gradient, as fractions of T (Yin et al. 2023, §4.2).
DMD_TIME_RANGE = (0.02, 0.98)


def pseudo_huber(difference: torch.Tensor, c: float) -> torch.Tensor:
    """sqrt(d² + c²) − c per element (Song & Dhariwal 2023, §3.3): L2 near 0, L1 beyond c."""
    return (difference.square() + c ** 2).sqrt() - c


def squared(difference: torch.Tensor, c: float) -> torch.Tensor:
    return difference.square()


# lcm_loss name -> per-element distance (difference [B, C, h, w], lcm_huber_c) -> [B, C, h, w]. Add an entry to
# train with your own distance without editing this file (check_config accepts every name here).
LCM_LOSSES = {"huber": pseudo_huber, "l2": squared}


def boundary_scalings(timesteps: torch.Tensor, sigma_data: float = SIGMA_DATA,
                      scaling: float = TIMESTEP_SCALING) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_skip, c_out) of LCM eq. 9 at integer timesteps [B] -> two [B] float tensors."""
    scaled = timesteps.double() * scaling
    c_skip = sigma_data ** 2 / (scaled ** 2 + sigma_data ** 2)
    c_out = scaled / (scaled ** 2 + sigma_data ** 2).sqrt()
    return c_skip.float(), c_out.float()


def skipping_steps(timesteps: torch.Tensor, skip: int, train_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(t_{n+k}, t_n) for uniform timesteps [B] in [0, T): grid point n = ⌊t·N / T⌋ of the N = ⌊T / k⌋ points
    {k−1, 2k−1, …, Nk−1} (n = ⌊t / k⌋ when k divides T), and k steps earlier (clamped at 0, the boundary)."""
    points = train_steps // skip
    start = (timesteps * points // train_steps + 1) * skip - 1
    return start, (start - skip).clamp(min=0)


def split_prediction(prediction: torch.Tensor, x_t: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor,
                     parameterization: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x̂_0, ε̂) from the UNet's ε or v prediction at x_t = α x_0 + σ ε (α, σ: [B, 1, 1, 1]; Salimans & Ho 2022
    §4: x_0 = α x_t − σ v, ε = σ x_t + α v)."""
    if parameterization == "v":
        return alpha * x_t - sigma * prediction, sigma * x_t + alpha * prediction
    return (x_t - sigma * prediction) / alpha, prediction


def ddim_step(x_t: torch.Tensor, eps: torch.Tensor, abar_t: torch.Tensor, abar_s: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM from t to s given ε at t (Song et al. 2021, eq. 12, η = 0); abar_*: [B, 1, 1, 1]."""
    x0 = (x_t - (1 - abar_t).sqrt() * eps) / abar_t.sqrt()
    return abar_s.sqrt() * x0 + (1 - abar_s).sqrt() * eps


def consistency_distance(a: torch.Tensor, b: torch.Tensor, loss: str, huber_c: float) -> torch.Tensor:
    """d(a, b) per sample [B] for [B, C, h, w] inputs: the mean over elements of LCM_LOSSES[loss]."""
    return LCM_LOSSES[loss](a.float() - b.float(), huber_c).mean(dim=(1, 2, 3))


def _column(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(like.device, like.dtype)[:, None, None, None]


class ConsistencyObjective(nn.Module):
    """Per-sample consistency distillation loss (see the module docstring) of `model` (the student) against
    `teacher(x, t, context, y) -> ε or v`. `extra` is the trained network outside the model (the LoRA), registered so
    DDP sees it; `target_values()` gives the target network's weights by objective parameter name (None: the
    student's own)."""

    def __init__(self, model, conditioner, extra: nn.Module | None, teacher, config: TrainConfig, target_values,
                 reward=None):
        super().__init__()
        self.model = model
        self.conditioner = conditioner
        self.extra = extra
        self.teacher = teacher
        self.target_values = target_values
        self.skip, self.guidance = config.lcm_skip, config.lcm_guidance
        self.loss, self.huber_c = config.lcm_loss, config.lcm_huber_c
        # RG-LCD's reward (train.rewards), a plain attribute: its frozen weights are no part of the objective's.
        self.reward, self.reward_weight = reward, config.lcm_reward_weight
        # The last forward's terms, batch means (the trainer logs them beside the loss).
        self.parts: dict[str, float] = {}

    def consistency(self, x_t: torch.Tensor, timesteps: torch.Tensor, cond: dict) -> torch.Tensor:
        """f(x_t, t) of LCM eq. 9 with the student's current weights; x_t: [B, C, h, w]."""
        model = self.model
        abar = _column(model.alphas_cumprod.to(x_t.device)[timesteps], x_t)
        prediction = model.apply_model(x_t, timesteps, cond["context"], cond.get("y"))
        x0, _ = split_prediction(prediction, x_t, abar.sqrt(), (1 - abar).sqrt(), model.parameterization)
        c_skip, c_out = boundary_scalings(timesteps)
        return _column(c_skip, x_t) * x_t + _column(c_out, x_t) * x0

    @torch.no_grad()
    def conditions(self, count: int, cond: dict | None, captions: list[str] | None, *sizes) -> tuple[dict, dict]:
        """(cond, uncond): the captions' conditioning (or the cached `cond`) and the empty caption's, for `count`
        samples."""
        if cond is None:
            cond = self.conditioner(captions, *sizes)
        return cond, self.conditioner([""] * count, *sizes)

    @torch.no_grad()
    def guided(self, x_t: torch.Tensor, timesteps: torch.Tensor, cond: dict,
               uncond: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(x̂_0, ε̃), float32 [B, C, h, w]: the teacher's estimates at x_t with CFG lcm_guidance (LCM eq. 6),
        ε̃ = ε(z, ∅) + s · (ε(z, c) − ε(z, ∅)) and x̂_0 likewise (guidance is linear in the prediction)."""
        model = self.model
        both = torch.cat([x_t, x_t])
        y = torch.cat([cond["y"], uncond["y"]]) if cond.get("y") is not None else None
        prediction = self.teacher(both, torch.cat([timesteps, timesteps]),
                                  torch.cat([cond["context"], uncond["context"]]), y)
        abar = _column(model.alphas_cumprod.to(x_t.device)[timesteps], x_t).repeat(2, 1, 1, 1)
        x0, eps = split_prediction(prediction.float(), both.float(), abar.sqrt(), (1 - abar).sqrt(),
                                   model.parameterization)
        (x0_cond, x0_uncond), (eps_cond, eps_uncond) = x0.chunk(2), eps.chunk(2)
        return (x0_uncond + self.guidance * (x0_cond - x0_uncond),
                eps_uncond + self.guidance * (eps_cond - eps_uncond))

    @torch.no_grad()
    def teacher_step(self, x_t: torch.Tensor, start: torch.Tensor, end: torch.Tensor, cond: dict,
                     uncond: dict) -> torch.Tensor:
        """ẑ_{t_n}: the guided teacher's DDIM step from t_{n+k} = start to t_n = end (LCM eq. 6 and Algorithm 1)."""
        model = self.model
        _, guided = self.guided(x_t, start, cond, uncond)
        abar_t = _column(model.alphas_cumprod.to(x_t.device)[start], x_t)
        abar_s = _column(model.alphas_cumprod.to(x_t.device)[end], x_t)
        return ddim_step(x_t.float(), guided, abar_t.float(), abar_s.float()).to(x_t.dtype)

    def forward(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, cond: dict | None = None,
                captions: list[str] | None = None, original_sizes=None, crops=None, target_sizes=None) -> torch.Tensor:
        """latents, noise: [B, C, h, w]; timesteps: [B] uniform in [0, T) (mapped onto the skipping grid); cond or
        captions as in DiffusionObjective -> loss [B]."""
        model = self.model
        cond, uncond = self.conditions(len(latents), cond, captions, original_sizes, crops, target_sizes)
        start, end = skipping_steps(timesteps, self.skip, model.alphas_cumprod.shape[0])
        abar = _column(model.alphas_cumprod.to(latents.device)[start], latents)
        x_start = abar.sqrt() * latents + (1 - abar).sqrt() * noise
        x_end = self.teacher_step(x_start, start, end, cond, uncond)
        # The target first: swapping the EMA weights in and out must not touch weights the student's graph holds.
        with torch.no_grad(), swapped(self, self.target_values(), prefix=""):
            target = self.consistency(x_end, end, cond)
        prediction = self.consistency(x_start, start, cond)
        loss = consistency_distance(prediction, target, self.loss, self.huber_c)
        if self.reward is None:
            return loss
        self.parts = {"loss_consistency": loss.detach().mean().item()}
        return loss - self.reward_term(prediction.to(latents.dtype), captions)

    def reward_term(self, estimate: torch.Tensor, captions: list[str] | None) -> torch.Tensor:
        """β·R(D(estimate), c) per sample [B] (RG-LCD eq. 7), for the student's estimate [B, C, h, w]; a caption
        emptied by caption dropout asks for nothing. Logs the mean reward in `parts`."""
        if captions is None:
            raise ValueError("a reward scores images against their captions: pass captions (train without "
                             "cache_text)")
        reward = self.reward(self.model.decode_latents(estimate), captions)
        asked = torch.tensor([bool(c) for c in captions], device=reward.device, dtype=reward.dtype)
        self.parts["reward"] = (reward.detach() * asked).sum().item() / max(asked.sum().item(), 1)
        return self.reward_weight * reward * asked


class DistributionMatchingObjective(ConsistencyObjective):
    """Per-sample DMD loss of a full student plus its fake score's diffusion loss (see the module docstring, steps
    1–4); `extra` is the fake score (x, t, context, y) -> ε or v, trained by the same optimizer step."""

    def student_inputs(self, noise: torch.Tensor, cond: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(x [B, C, h, w], t [B]): what the LCM sampler feeds the student at one and two steps (step 1 above)."""
        model = self.model
        steps = model.alphas_cumprod.shape[0]
        abar = model.alphas_cumprod.to(noise.device)
        top = torch.full((len(noise),), steps - 1, device=noise.device, dtype=torch.long)
        # The sampler starts from pure noise: x_{T-1} = σ_{T-1} ε, no α z_0 term.
        x = (1 - abar[steps - 1]).sqrt() * noise
        second = torch.arange(len(noise), device=noise.device) % 2 == 1
        if not second.any():
            return x, top
        with torch.no_grad():
            own = self.consistency(x[second], top[second], {k: v[second] for k, v in cond.items() if v is not None})
            middle = steps // 2 - 1
            x = x.clone()
            x[second] = abar[middle].sqrt() * own + (1 - abar[middle]).sqrt() * torch.randn_like(own)
        return x, torch.where(second, torch.full_like(top, middle), top)

    def fake_loss(self, sample: torch.Tensor, cond: dict) -> torch.Tensor:
        """The fake score's diffusion loss [B] on the student's stop-gradient samples [B, C, h, w] (step 2)."""
        model, fake = self.model, self.extra
        timesteps = torch.randint(0, model.alphas_cumprod.shape[0], (len(sample),), device=sample.device)
        x_t, target = noisy_latents(sample, torch.randn_like(sample), timesteps, model.alphas_cumprod,
                                    model.parameterization)
        prediction = fake(x_t, timesteps, cond["context"], cond.get("y"))
        return (prediction.float() - target.float()).square().mean(dim=(1, 2, 3))

    def forward(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, cond: dict | None = None,
                captions: list[str] | None = None, original_sizes=None, crops=None, target_sizes=None) -> torch.Tensor:
        """latents (unused: the student's samples are the data here), noise: [B, C, h, w]; timesteps: [B] uniform in
        [0, T), mapped onto DMD's time range; cond or captions as in DiffusionObjective -> loss [B]."""
        model = self.model
        cond, uncond = self.conditions(len(latents), cond, captions, original_sizes, crops, target_sizes)
        x, start = self.student_inputs(noise, cond)
        estimate = self.consistency(x, start, cond)
        sample = estimate.detach()
        fake_loss = self.fake_loss(sample, cond)
        with torch.no_grad():
            steps = model.alphas_cumprod.shape[0]
            low, high = (round(fraction * steps) for fraction in DMD_TIME_RANGE)
            t = low + timesteps * (high - low + 1) // steps
            abar = _column(model.alphas_cumprod.to(sample.device)[t], sample)
            x_t = abar.sqrt() * sample + (1 - abar).sqrt() * torch.randn_like(sample)
            real, _ = self.guided(x_t, t, cond, uncond)
            prediction = self.extra(x_t, t, cond["context"], cond.get("y")).float()
            fake, _ = split_prediction(prediction, x_t.float(), abar.sqrt(), (1 - abar).sqrt(),
                                       model.parameterization)
            scale = (sample.float() - real).abs().mean(dim=(1, 2, 3), keepdim=True).clamp(min=1e-4)
            gradient = (fake - real) / scale
        matching = 0.5 * (estimate.float() - (sample.float() - gradient)).square().mean(dim=(1, 2, 3))
        self.parts = {"loss_matching": matching.detach().mean().item(), "loss_fake": fake_loss.detach().mean().item()}
        loss = matching + fake_loss
        if self.reward is None:
            return loss
        return loss - self.reward_term(estimate.to(latents.dtype), captions)


class LatentConsistency(LoRA):
    """Method "lcm": an LCM-LoRA (lcm_student = "lora", kohya file) or a full consistency student ("full", model
    file), distilled from the frozen base with guidance lcm_guidance."""

    def __init__(self, config: TrainConfig, model):
        self.ema = None
        super().__init__(config, model)

    @classmethod
    def check_config(cls, config: TrainConfig) -> None:
        need(config.lcm_student in LCM_STUDENTS,
             f"lcm_student={config.lcm_student!r} is not one of {', '.join(LCM_STUDENTS)}")
        need(config.lcm_loss in LCM_LOSSES, f"lcm_loss={config.lcm_loss!r} is not one of {', '.join(LCM_LOSSES)}")
        need(1 <= config.lcm_skip <= 500, f"lcm_skip must be in [1, 500] (DDPM steps per solver step; LCM uses 20), "
                                          f"got {config.lcm_skip}")
        need(config.lcm_guidance >= 1.0, f"lcm_guidance is the teacher's CFG scale and must be >= 1, got "
                                         f"{config.lcm_guidance}")
        need(config.lcm_huber_c > 0, f"lcm_huber_c must be > 0, got {config.lcm_huber_c}")
        need(not config.lcm_reward or config.lcm_reward in REWARDS,
             f"lcm_reward={config.lcm_reward!r} is not one of {', '.join(REWARDS)} (or empty: no reward)")
        need(not config.lcm_reward or not config.cache_text, "a reward scores images against their captions, which "
                                                             "cache_text replaces: set cache_text = false")
        need(not config.train_text_encoder, "lcm distils the UNet; the teacher shares the text encoder, so it must "
                                            "stay frozen: set train_text_encoder = false")
        need(not config.min_snr_gamma, "min_snr_gamma weights the noise-prediction loss; the consistency loss has "
                                       "no such weighting: set min_snr_gamma = 0")
        need(config.lcm_objective in LCM_OBJECTIVES,
             f"lcm_objective={config.lcm_objective!r} is not one of {', '.join(LCM_OBJECTIVES)}")
        need(config.lcm_objective != "dmd" or config.lcm_student == "full",
             "lcm_objective = 'dmd' trains a full student (its fake score is a whole UNet): set lcm_student = 'full'")
        need(config.lcm_fake_lr >= 0, f"lcm_fake_lr must be >= 0 (0: lr), got {config.lcm_fake_lr}")
        need(not config.lcm_teacher or Path(config.lcm_teacher).is_file(),
             f"lcm_teacher={config.lcm_teacher!r} is not a file: give the teacher's model file (or leave it empty to "
             "distil from the model the student starts from)")

    @property
    def full(self) -> bool:
        return self.config.lcm_student == "full"

    @property
    def dmd(self) -> bool:
        return self.config.lcm_objective == "dmd"

    def set_trainable(self) -> None:
        if self.full:
            Method.set_trainable(self)
        else:
            super().set_trainable()
        if self.config.lcm_teacher:
            self.teacher = self._load_teacher(self.config.lcm_teacher)
        elif self.full:
            # The frozen base, copied before a checkpoint is loaded: the teacher stays the base on resume.
            self.teacher = copy.deepcopy(self.model.model).requires_grad_(False)
        else:
            self.teacher = self._base_without_adapters
        # DMD's fake score starts as the teacher (it models the student's samples, which start near the teacher's).
        self.fake_score = copy.deepcopy(self.teacher).requires_grad_(True) if self.dmd else None

    def _load_teacher(self, path: str) -> nn.Module:
        """The UNet (DiffusionWrapper) of the model file `path`, frozen, in the student's device and dtype."""
        student = self.model.model
        try:
            teacher = ldm.load_model(path, device=self.model.device,
                                     dtype=next(student.parameters()).dtype).model.requires_grad_(False)
        except (OSError, ValueError) as error:
            raise ConfigError(f"lcm_teacher: {error}") from None
        mismatched = mismatched_tensors(student.state_dict(), teacher.state_dict())
        need(not mismatched,
             f"lcm_teacher={path!r} has another UNet architecture than {self.config.model!r} ({len(mismatched)} "
             f"missing, extra or mis-shaped tensor(s), e.g. {', '.join(mismatched[:3])}): give a teacher of the same "
             "family")
        return teacher

    def _base_without_adapters(self, x, t, context, y):
        self.network.set_multiplier(0.0)
        try:
            return self.model.apply_model(x, t, context, y)
        finally:
            self.network.set_multiplier(1.0)

    def anchors(self):
        return Method.anchors(self) if self.full else super().anchors()

    @property
    def extra(self):
        if self.dmd:
            return self.fake_score
        return None if self.full else self.network

    def param_groups(self, trainable: list) -> list[dict]:
        if not self.dmd:
            return super().param_groups(trainable)
        fake = {id(p) for p in self.fake_score.parameters()}
        groups = Method.param_groups(self, [(name, p) for name, p in trainable if id(p) not in fake])
        return groups + [{"params": list(self.fake_score.parameters()),
                          "lr": self.config.lcm_fake_lr or self.config.lr, "weight_decay": self.config.weight_decay}]

    def use_ema(self, ema) -> None:
        self.ema = ema

    def _target_values(self) -> dict[str, torch.Tensor] | None:
        """θ⁻: the EMA's values by objective parameter name, or None (the student itself) without ema_decay."""
        return self.ema.shadow if self.ema is not None else None

    def objective(self, conditioner) -> nn.Module:
        # The full student's teacher is a module (moved with the objective, frozen); the LoRA student's is a bound
        # method, a plain attribute outside the objective's parameters.
        reward = REWARDS[self.config.lcm_reward](self.config, self.model.device) if self.config.lcm_reward else None
        objective = DistributionMatchingObjective if self.dmd else ConsistencyObjective
        return objective(self.model, conditioner, self.extra, self.teacher, self.config, self._target_values, reward)

    def file_name(self) -> str:
        return Method.file_name(self) if self.full else super().file_name()

    def save(self, path: Path, step: int, ema_values=None, dtype=None) -> None:
        (Method.save if self.full else LoRA.save)(self, path, step, ema_values, dtype)
        if self.dmd:
            # Training state, not a model to sample: raw float32 values, for an exact resume.
            save_state_dict({key: value.detach().float().cpu().contiguous()
                             for key, value in self.fake_score.state_dict().items()}, path.with_name(FAKE_SCORE_FILE))

    def load(self, path: Path) -> None:
        (Method.load if self.full else LoRA.load)(self, path)
        if self.dmd:
            self.fake_score.load_state_dict(read_state_dict(path.with_name(FAKE_SCORE_FILE)), strict=True)
