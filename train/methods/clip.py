"""Contrastive image–text pre-training of a CLIP (Radford et al. 2021): method "clip". The loss, the gather across
ranks and the large-batch step are train.contrastive's; this file fits them into the engine.

The model is ldm.clip_model's CLIP: the text tower is ldm.clip's OpenCLIP text model at the root of the key space and
the image tower a ViT under `visual.`, OpenAI's layout. `model = "preset:NAME"` trains one from scratch with the sizes
of ldm.clip_model.PRESETS[NAME] (`architecture` overrides any CLIPConfig field: `{vision_width = 192}`);
`model = FILE` continues training an OpenAI-layout CLIP file. Images come from the engine's data pipeline at the
CLIP's input resolution (`resolution`, square: bucket = false) and are normalised with OpenAI's per-channel mean and
std; captions are tokenized as open_clip does (padded with 0). `clip_negatives` adds hard negative captions
(train.negatives) to the image-to-text half of the loss. The output, `clip.safetensors`, is written by
ldm.clip_model.save_clip: ldm.clip_model.load_clip reads it whole, and its text tower is an SD2-family text encoder
(ldm.clip.FrozenOpenCLIPEmbedder, `python -m ldm.assemble`).
"""
import math
from dataclasses import fields, replace
from pathlib import Path

import torch
from torch import nn

from ldm.checkpoint import read_state_dict
from ldm.clip_model import CLIP, IMAGE_MEAN, IMAGE_STD, PRESETS, load_clip, save_clip
from ..config import TrainConfig
from ..contrastive import ContrastiveObjective, gradient_cache_step
from ..distributed import gradient_sync
from ..ema import swapped
from ..negatives import negative_captions
from .base import Method, need


def initialise_text_tower(model: CLIP) -> None:
    """OpenAI's initialisation of the text tower trained from scratch (their `initialize_parameters`): small token
    embeddings, and block projections scaled by width^-1/2, the residual branches' outputs further by
    (2 · layers)^-1/2 so the residual stream's variance stays bounded with depth (as GPT-2)."""
    width, layers = model.config.text_width, model.config.text_layers
    nn.init.normal_(model.token_embedding.weight, std=0.02)
    nn.init.normal_(model.positional_embedding, std=0.01)
    attention_std, residual_std, fc_std = width ** -0.5, width ** -0.5 * (2 * layers) ** -0.5, (2 * width) ** -0.5
    for block in model.transformer.resblocks:
        nn.init.normal_(block.attn.in_proj_weight, std=attention_std)
        nn.init.normal_(block.attn.out_proj.weight, std=residual_std)
        nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
        nn.init.normal_(block.mlp.c_proj.weight, std=residual_std)
    nn.init.normal_(model.text_projection, std=width ** -0.5)


class ContrastivePretraining(Method):
    @classmethod
    def check_config(cls, config: TrainConfig) -> None:
        prep = config.preprocessing
        for key in ("cache_latents", "cache_text", "class_data", "retention_prompts", "validation_prompts",
                    "regularizers", "gradient_checkpointing", "train_text_encoder"):
            need(not getattr(config, key), f"method 'clip' trains both towers of a CLIP on image-caption pairs; "
                                           f"{key} belongs to diffusion training: leave it unset")
        need(not prep.bucket, "method 'clip' trains on square images at the CLIP's input resolution: set "
                              "bucket = false (and resolution = the image tower's resolution)")
        need(prep.caption_dropout == 0, "method 'clip' needs every image's caption (an empty one is no pair): set "
                                        "caption_dropout = 0")

    @staticmethod
    def build_model(config: TrainConfig, device: torch.device) -> CLIP:
        if config.model.startswith("preset:"):
            name = config.model[len("preset:"):]
            need(name in PRESETS, f"model={config.model!r}: method 'clip' trains a CLIP; presets are "
                                  f"{', '.join('preset:' + n for n in PRESETS)}")
            known = {f.name for f in fields(PRESETS[name])}
            unknown = sorted(set(config.architecture) - known)
            need(not unknown, f"architecture: unknown key(s) {unknown} for a CLIP; valid: {sorted(known)}")
            clip_config = replace(PRESETS[name], **config.architecture)
            # Seeded so that every rank, and a resumed run, starts from the same random initialisation.
            torch.manual_seed(config.seed)
            with torch.device(device):
                model = CLIP(clip_config)
            initialise_text_tower(model)
        else:
            need(not config.architecture, "architecture overrides apply to a CLIP trained from scratch "
                                          f"(model = 'preset:NAME'), not to the file {config.model}")
            model = load_clip(config.model, device=device, dtype=torch.float32).requires_grad_(True)
        resolution = config.preprocessing.resolution
        need(resolution == model.config.image_resolution and resolution % config.preprocessing.bucket_step == 0,
             f"resolution={resolution}: the CLIP's image tower reads {model.config.image_resolution}×"
             f"{model.config.image_resolution} images; set resolution = {model.config.image_resolution} (a multiple "
             f"of bucket_step={config.preprocessing.bucket_step})")
        return model

    def __init__(self, config: TrainConfig, model: CLIP):
        # Not the base's __init__: a CLIP has no UNet, and every weight of it trains.
        self.config, self.model, self.embedding = config, model, None
        self.set_trainable()

    def set_trainable(self) -> None:
        self.model.requires_grad_(True)

    def empty_captions(self) -> str:
        return "skip"

    @property
    def text_trained(self) -> bool:
        # No text-side weight goes unused in a forward pass (the loss reads the last block at EOS, the projection
        # and logit_scale), so DDP need not look for unused parameters.
        return False

    def _tokens(self, captions: list[str], device: torch.device) -> torch.Tensor:
        """[n, L ≤ 77] tokens, cut after the captions' last EOS: under causal attention the padding after it cannot
        change the EOS state, the only one the loss reads, so the embeddings are exactly those of all 77 positions,
        at a fraction of the cost for short captions."""
        tokens = self.model.tokenizer(captions)
        return tokens[:, :int(tokens.argmax(dim=-1).max()) + 1].to(device)

    def model_inputs(self, batch: dict, device: torch.device, negatives: list[str] = ()) -> dict:
        """{"pixels": [B, 3, R, R] normalised with OpenAI's mean/std, "tokens": [B, L], "negative_tokens": [M, L']
        or None} of a loaded batch (pixels in [-1, 1] from train.buckets) and its hard negative captions."""
        mean = torch.tensor(IMAGE_MEAN, device=device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGE_STD, device=device).view(1, 3, 1, 1)
        pixels = ((batch["pixels"].to(device) + 1) / 2 - mean) / std
        return {"pixels": pixels, "tokens": self._tokens(batch["caption"], device),
                "negative_tokens": self._tokens(list(negatives), device) if negatives else None}

    def objective(self, conditioner) -> nn.Module:
        return ContrastiveObjective(self.model)

    def param_groups(self, trainable: list[tuple[str, nn.Parameter]]) -> list[dict]:
        """Weight decay on matrices only: gains, biases, the class and positional embeddings' vectors and
        logit_scale are exempt (as OpenAI's and open_clip's training)."""
        decayed = [p for _, p in trainable if p.ndim >= 2]
        exempt = [p for _, p in trainable if p.ndim < 2]
        return [{"params": decayed, "lr": self.config.lr, "weight_decay": self.config.weight_decay},
                {"params": exempt, "lr": self.config.lr, "weight_decay": 0.0}]

    def accumulate(self, trainer, micro_batches) -> tuple[list[float], bool]:
        """GradCache over the step's micro-batches (train.contrastive.gradient_cache_step); the loss is the whole
        step's batch's, gathered over ranks."""
        micro_batches = list(micro_batches)
        # The step's hard negatives, each once and none a caption of the step, split by micro-batch: together they
        # are exactly one negative_captions call over the whole step's captions, as one big batch would have them.
        taken = [caption for batch, _ in micro_batches for caption in batch["caption"]]
        inputs = []
        for batch, _ in micro_batches:
            negatives = negative_captions(batch["caption"], self.config.clip_negatives, taken)
            taken += negatives
            inputs.append(self.model_inputs(batch, trainer.device, negatives))
        last = len(inputs) - 1

        def embed(i: int):
            with trainer.autocast():
                return trainer.objective(**inputs[i])

        def train(i: int, loss_of) -> torch.Tensor:
            with gradient_sync(trainer.ddp, i == last):
                with trainer.autocast():
                    loss = loss_of(*trainer.ddp(**inputs[i]))
                trainer.scaler.scale(loss).backward()
            return loss

        loss = gradient_cache_step(embed, train, len(inputs))
        return [loss], math.isfinite(loss)

    def file_name(self) -> str:
        return "clip.safetensors"

    def save(self, path: Path, step: int, ema_values: dict[str, torch.Tensor] | None = None,
             dtype: torch.dtype | None = None) -> None:
        # The objective holds the CLIP as `model`, so its parameter names are "model." + the file's keys.
        with swapped(self.model, ema_values, prefix="model."):
            save_clip(self.model, path, dtype)

    def load(self, path: Path) -> None:
        self.model.load_state_dict(read_state_dict(path), strict=True)
