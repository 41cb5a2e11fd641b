"""Terms added to the training loss to keep a fine-tune close to its base, without any of the base's training data.

`regularizers = {name = weight, ...}` in the configuration (`--regularizers '{l2_sp = 0.01}'`) picks them from
REGULARIZERS; each adds `penalty(step, micro)` (a scalar) to every micro-batch's loss and is logged in metrics.jsonl as
`penalty_<name>`. They combine with every diffusion method (full, dreambooth, lora) and with each other.

The *anchored weights* are the method's (`Method.anchors`): for full fine-tuning each trained weight θ with its base
value θ*, deviation d = θ − θ*; for LoRA each adapted layer's weight W, deviation d = ΔW = (alpha / rank) · up @ down
(the merged layer minus the base's). Anchors on the base weights let both methods share one penalty.

    l2_sp         (weight α)  α/2 · Σ ‖d‖²                          Li, Grandvalet & Davoine 2018, "Explicit Inductive
                                                                    Bias for Transfer Learning" (L2-SP), eq. 3
    ewc           (weight λ)  λ/2 · Σ_i F_i d_i²                     Kirkpatrick et al. 2017, eq. 3
                  F: the diagonal Fisher at the base, estimated as the mean over the base's triples (train.retention)
                  of the squared gradient of each triple's denoising loss (the empirical Fisher of the Gaussian
                  likelihood the loss is the negative log of, up to a constant factor absorbed in λ); written to
                  OUTPUT/fisher.safetensors and read back by later and resumed runs.
    distillation  (weight w)  w · mean ‖f_θ(x_t, t, c) − f_base(x_t, t, c)‖² / D
                  output-level self-distillation on the base's own generations: each micro-batch draws batch_size of
                  the base's triples (train.retention; the teacher's predictions are stored there, so no second model
                  is kept) by a generator seeded with (seed, step, micro), so a resumed run draws the same ones.

ewc and distillation use the base's generations for `retention_prompts`, which they therefore need. A regularizer of
your own is a Regularizer subclass added to REGULARIZERS; its name then works in the configuration.
"""
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ldm.checkpoint import read_metadata, read_state_dict, save_state_dict
from .config import ConfigError, TrainConfig
from .retention import denoise

FISHER_FILE = "fisher.safetensors"


@dataclass
class Anchor:
    """One anchored weight: `parameter` is the model's weight the Fisher is taken for (the trained one, or a LoRA's
    frozen base layer), `deviation()` its current difference from the base value, with gradients to what trains."""
    name: str
    parameter: torch.nn.Parameter
    deviation: Callable[[], torch.Tensor]


@dataclass
class Context:
    """What a regularizer may use: the run's configuration, model, conditioner (captions -> conditioning), the method's
    anchors, the output folder and (when retention_prompts are set) the base's triples (train.retention)."""
    config: TrainConfig
    model: object
    conditioner: Callable
    anchors: list[Anchor]
    output: Path
    triples: dict[str, torch.Tensor] | None


class Regularizer:
    """A loss term: built once before training (and before a checkpoint is loaded), then `penalty(step, micro)` per
    micro-batch, a scalar tensor with gradients to the trained weights."""
    needs_anchors = False
    needs_triples = False

    def __init__(self, weight: float, context: Context):
        self.weight, self.context = weight, context

    def penalty(self, step: int, micro: int) -> torch.Tensor:
        raise NotImplementedError


def l2_sp_penalty(anchors: list[Anchor], weight: float) -> torch.Tensor:
    """α/2 · Σ ‖d‖² over the anchors' deviations (L2-SP, Li et al. 2018, eq. 3)."""
    return weight / 2 * sum(anchor.deviation().float().pow(2).sum() for anchor in anchors)


def ewc_penalty(anchors: list[Anchor], fisher: dict[str, torch.Tensor], weight: float) -> torch.Tensor:
    """λ/2 · Σ_i F_i d_i² (EWC, Kirkpatrick et al. 2017, eq. 3), F the diagonal Fisher by anchor name."""
    return weight / 2 * sum((fisher[a.name] * a.deviation().float().pow(2)).sum() for a in anchors)


class L2SP(Regularizer):
    needs_anchors = True

    def penalty(self, step: int, micro: int) -> torch.Tensor:
        return l2_sp_penalty(self.context.anchors, self.weight)


class EWC(Regularizer):
    needs_anchors = True
    needs_triples = True

    def __init__(self, weight: float, context: Context):
        super().__init__(weight, context)
        self.fisher = load_or_estimate_fisher(context)

    def penalty(self, step: int, micro: int) -> torch.Tensor:
        return ewc_penalty(self.context.anchors, self.fisher, self.weight)


class Distillation(Regularizer):
    needs_triples = True

    def penalty(self, step: int, micro: int) -> torch.Tensor:
        context = self.context
        triples, config = context.triples, context.config
        generator = torch.Generator().manual_seed(hash_seed(config.seed, step, micro))
        rows = torch.randint(0, len(triples["latents"]), (config.batch_size,), generator=generator)
        prediction, _ = denoise(context.model, context.conditioner, config.retention_prompts, triples, rows)
        teacher = triples["base_prediction"][rows.to(triples["base_prediction"].device)]
        return self.weight * (prediction.float() - teacher.float()).pow(2).mean()


REGULARIZERS: dict[str, type[Regularizer]] = {"l2_sp": L2SP, "ewc": EWC, "distillation": Distillation}


def hash_seed(seed: int, step: int, micro: int) -> int:
    """A generator seed for (seed, step, micro) that no other pair of (step, micro) shares."""
    return (seed * 1_000_003 + step) * 1_009 + micro


def diagonal_fisher(parameters: dict[str, torch.nn.Parameter],
                    sample_losses: list[Callable[[], torch.Tensor]]) -> dict[str, torch.Tensor]:
    """F_i = 1/M Σ_m (∂ℓ_m/∂θ_i)² for each named parameter, ℓ_m the m-th loss (a callable computing one scalar), in
    float32. The parameters' requires_grad and .grad are restored afterwards."""
    flags = {name: p.requires_grad for name, p in parameters.items()}
    grads = {name: p.grad for name, p in parameters.items()}
    fisher = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in parameters.items()}
    try:
        for p in parameters.values():
            p.requires_grad_(True)
        for loss in sample_losses:
            gradients = torch.autograd.grad(loss(), list(parameters.values()), allow_unused=True)
            for (name, _), gradient in zip(parameters.items(), gradients):
                if gradient is not None:
                    fisher[name] += gradient.float().pow(2)
    finally:
        for name, p in parameters.items():
            p.requires_grad_(flags[name])
            p.grad = grads[name]
    return {name: f / len(sample_losses) for name, f in fisher.items()}


def load_or_estimate_fisher(context: Context) -> dict[str, torch.Tensor]:
    """The diagonal Fisher of every anchor at the base, from OUTPUT/fisher.safetensors when it was made for the same
    triples and anchors, else estimated on the base's triples (one backward pass per triple) and written there."""
    path = context.output / FISHER_FILE
    names = [a.name for a in context.anchors]
    settings = json.dumps({"retention": read_metadata(context.output / "retention.safetensors").get("retention"),
                           "anchors": len(names)})
    if path.is_file() and read_metadata(path).get("fisher") == settings:
        fisher = read_state_dict(path)
        if sorted(fisher) == sorted(names):
            return {name: fisher[name].to(context.model.device) for name in names}
    model, triples = context.model, context.triples
    prompts = context.config.retention_prompts

    def triple_loss(row: int) -> Callable[[], torch.Tensor]:
        def loss() -> torch.Tensor:
            prediction, target = denoise(model, context.conditioner, prompts, triples, torch.tensor([row]))
            return (prediction.float() - target.float()).pow(2).mean()
        return loss

    was_training = model.training
    model.eval()
    fisher = diagonal_fisher({a.name: a.parameter for a in context.anchors},
                             [triple_loss(row) for row in range(len(triples["latents"]))])
    model.train(was_training)
    save_state_dict({k: v.cpu().contiguous() for k, v in fisher.items()}, path, metadata={"fisher": settings})
    return fisher


def build_regularizers(config: TrainConfig, context: Context) -> dict[str, Regularizer]:
    """The configured regularizers by name; ConfigError when one cannot serve this run."""
    built = {}
    for name, weight in config.regularizers.items():
        kind = REGULARIZERS[name]
        if kind.needs_anchors and not context.anchors:
            raise ConfigError(f"regularizer {name} anchors trained weights to the base; method {config.method!r} "
                              "trains none that the base has")
        if kind.needs_triples and context.triples is None:
            raise ConfigError(f"regularizer {name} works on the base's generations for retention_prompts: set "
                              "retention_prompts (e.g. --retention-prompts '[\"a red circle\"]')")
        built[name] = kind(float(weight), context)
    return built
