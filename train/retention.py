"""The forgetting monitor: how far the model being trained has drifted from the base on what the base already drew.

A fine-tune is measured on its new data by the training loss; what it forgets is not visible there. With
`retention_prompts` set (prompts that stand for what the base knew), the run starts by sampling the *base's own*
generations for those prompts (`retention_images` per prompt, `validation_steps` Euler steps, `validation_cfg`) and
drawing, from a generator seeded by `seed`, `retention_timesteps` (t, ε) pairs per generation. The resulting fixed set
of N triples (x₀, t, ε) is written to OUTPUT/retention.safetensors with the base's predictions and denoising losses on
them, so a resumed run measures on exactly the same triples against the same reference (train.regularizers' ewc and
distillation use the same triples). Every `retention_every` steps:

    retention_loss  = 1/N Σ_i ‖ f_θ(x_t_i, t_i, c_i) − target_i ‖² / D     (the model being trained; eps or v target)
    retention_delta = retention_loss − retention_base_loss                 (0 for an untouched model, > 0 as it drifts)

(x_t and the target as in train.objective, c_i the prompt's conditioning, D the latent's element count.) No data of
the base is needed, and the measure is the one training minimises, so it is domain-free. A warning is logged when
retention_delta exceeds `retention_warn` × retention_base_loss.

When a judge in RETENTION_JUDGES applies to the prompts (the shapes world's: `shapes.judge`), the current model's
images of the prompts (the seed of the base's generations every time) are also judged: `retention_<judge>_accuracy`
(`retention_shapes_accuracy`); a fresh run logs a line at step 0, before training, with the base's values. A judge is a function (images, prompts) -> accuracy in [0, 1], or
None when the prompts are outside its domain; add one to RETENTION_JUDGES to have it used.
"""
import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image

from ldm.checkpoint import read_metadata, read_state_dict, save_state_dict
from .config import ConfigError, TrainConfig
from .objective import noisy_latents
from .sampling import decode_images, preview_latents

log = logging.getLogger("train")
FILE_NAME = "retention.safetensors"
# Triples per forward pass when measuring.
MEASURE_BATCH = 16


def shapes_accuracy(images: list[Image.Image], prompts: list[str]) -> float | None:
    """Fraction of images the shapes judge finds fully correct; None when no prompt is a shapes-world prompt."""
    from shapes.judge import judge
    try:
        _, judged = judge(images, prompts)
    except ValueError:
        return None
    return sum(score.correct for _, score in judged) / len(judged)


RETENTION_JUDGES: dict[str, Callable[[list[Image.Image], list[str]], float | None]] = {"shapes": shapes_accuracy}


def _settings(config: TrainConfig, size: int) -> dict:
    """What the triples depend on: a cached file made with other values is not reused."""
    return {"prompts": list(config.retention_prompts), "images": config.retention_images,
            "timesteps": config.retention_timesteps, "steps": config.validation_steps, "cfg": config.validation_cfg,
            "seed": config.seed, "size": size}


def base_triples(config: TrainConfig, model, conditioner, size: int, output: Path) -> dict[str, torch.Tensor]:
    """The fixed triples of the base's own generations, read from OUTPUT/retention.safetensors or sampled (with the
    model as it is: call before a checkpoint is loaded) and written there. On the model's device:
    {latents, noise [N, C, h, w], timesteps, prompt_index [N], base_prediction [N, C, h, w], base_loss [N]},
    N = len(retention_prompts) × retention_images × retention_timesteps, grouped by generation."""
    path = output / FILE_NAME
    settings = _settings(config, size)
    if path.is_file():
        recorded = json.loads(read_metadata(path).get("retention", "{}"))
        if recorded != settings:
            raise ConfigError(f"{path} holds triples made with other retention settings ({recorded}); restore "
                              "those settings, or delete the file to sample new ones from the base")
        triples = read_state_dict(path)
    else:
        triples = _sample_from_base(config, model, conditioner, size)
        save_state_dict(triples, path, metadata={"retention": json.dumps(settings)})
    return {k: v.to(model.device) for k, v in triples.items()}


@torch.no_grad()
def _sample_from_base(config: TrainConfig, model, conditioner, size: int) -> dict[str, torch.Tensor]:
    prompts = [p for p in config.retention_prompts for _ in range(config.retention_images)]
    indices = torch.arange(len(config.retention_prompts)).repeat_interleave(config.retention_images)
    was_training = model.training
    model.eval()
    generations = preview_latents(model, conditioner, prompts, size, size, steps=config.validation_steps,
                                  cfg_scale=config.validation_cfg, seed=config.seed).float().cpu()  # [P·I, C, h, w]
    generator = torch.Generator().manual_seed(config.seed)
    repeats = config.retention_timesteps
    latents = generations.repeat_interleave(repeats, dim=0)
    triples = {"latents": latents, "noise": torch.randn(latents.shape, generator=generator),
               "timesteps": torch.randint(0, len(model.alphas_cumprod), (len(latents),), generator=generator),
               "prompt_index": indices.repeat_interleave(repeats)}
    on_device = {k: v.to(model.device) for k, v in triples.items()}
    parts = [denoise(model, conditioner, config.retention_prompts, on_device, torch.arange(start, min(
        start + MEASURE_BATCH, len(latents)))) for start in range(0, len(latents), MEASURE_BATCH)]
    prediction = torch.cat([p for p, _ in parts]).float()
    target = torch.cat([t for _, t in parts]).float()
    triples["base_prediction"] = prediction.cpu()
    triples["base_loss"] = (prediction - target).pow(2).mean(dim=(1, 2, 3)).cpu()
    model.train(was_training)
    return triples


def denoise(model, conditioner, prompts: list[str], triples: dict[str, torch.Tensor],
            rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the model's prediction, the eps or v target), both [len(rows), C, h, w], for the triples `rows`; gradients
    flow when enabled."""
    part = {k: v[rows.to(v.device)] for k, v in triples.items()}
    cond = conditioner([prompts[i] for i in part["prompt_index"].tolist()])
    x_t, target = noisy_latents(part["latents"].to(model.dtype), part["noise"].to(model.dtype), part["timesteps"],
                                model.alphas_cumprod, model.parameterization)
    return model.apply_model(x_t, part["timesteps"], cond["context"], cond.get("y")), target


class RetentionMonitor:
    """Measures the model being trained on the base's triples (`base_triples`)."""

    def __init__(self, config: TrainConfig, model, conditioner, size: int, triples: dict[str, torch.Tensor]):
        self.config, self.model, self.conditioner, self.size = config, model, conditioner, size
        self.triples = triples
        self.base_loss = triples["base_loss"].mean().item()
        # One prompt per base generation: what the judge's images are made of.
        self.prompts = [p for p in config.retention_prompts for _ in range(config.retention_images)]

    @torch.no_grad()
    def _losses(self) -> torch.Tensor:
        """Per-triple denoising loss [N] (float32) of the model as it is now."""
        losses = []
        count = len(self.triples["latents"])
        for start in range(0, count, MEASURE_BATCH):
            prediction, target = denoise(self.model, self.conditioner, self.config.retention_prompts, self.triples,
                                         torch.arange(start, min(start + MEASURE_BATCH, count)))
            losses.append((prediction.float() - target.float()).pow(2).mean(dim=(1, 2, 3)))
        return torch.cat(losses)

    def measure(self, step: int) -> dict[str, float]:
        """The monitor's metrics.jsonl fields at `step`; warns when the delta is past the bound."""
        was_training = self.model.training
        self.model.eval()
        try:
            loss = self._losses().mean().item()
            record = {"retention_loss": loss, "retention_base_loss": self.base_loss,
                      "retention_delta": loss - self.base_loss}
            if self.config.retention_judge:
                record.update(self._judged())
        finally:
            self.model.train(was_training)
        bound = self.config.retention_warn * self.base_loss
        if record["retention_delta"] > bound:
            log.warning("step %d: the retention loss rose by %.4g over the base's %.4g (bound %.4g = retention_warn "
                        "%.3g × base): the model is drifting from what the base drew for retention_prompts; lower lr "
                        "or add a regularizer", step, record["retention_delta"], self.base_loss, bound,
                        self.config.retention_warn)
        return record

    @torch.no_grad()
    def _judged(self) -> dict[str, float]:
        """{retention_<judge>: accuracy} of the current model's images of the prompts, drawn with the seed of the
        base's generations (so at step 0 they are the base's own)."""
        config = self.config
        latents = preview_latents(self.model, self.conditioner, self.prompts, self.size, self.size,
                                  steps=config.validation_steps, cfg_scale=config.validation_cfg, seed=config.seed)
        images = decode_images(self.model, latents)
        record = {}
        for name, judge in RETENTION_JUDGES.items():
            accuracy = judge(images, self.prompts)
            if accuracy is not None:
                record[f"retention_{name}_accuracy"] = accuracy
        return record
