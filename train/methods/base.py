"""The hooks every training method fills in; see train.methods for the table that picks one."""
from pathlib import Path

import torch
from torch import nn

import ldm
from ldm.checkpoint import read_state_dict
from sample.conditioning import text_towers
from ..config import ConfigError, TrainConfig
from ..ema import swapped
from ..objective import DiffusionObjective
from ..regularizers import Anchor

# Module paths (UNet) of the cross-attention key and value projections: what train_scope "cross_attention_kv" trains.
CROSS_ATTENTION_KV = ("attn2.to_k", "attn2.to_v")


class Method:
    """One training method: what trains, with which loss, and what file comes out.

    The base class is full fine-tuning of the UNet (and of the text towers with train_text_encoder) with the noise
    prediction loss, saved as a whole model; subclasses override the hooks that differ.
    """

    # Trains the autoencoder on pixels instead of the diffusion model on latents (see train.methods.vae).
    trains_autoencoder = False

    def __init__(self, config: TrainConfig, model):
        self.config, self.model = config, model
        # Set by a method whose conditioning places learnt token vectors (textual inversion).
        self.embedding = None
        model.requires_grad_(False)
        model.unet.gradient_checkpointing = config.gradient_checkpointing
        self.set_trainable()

    # --- configuration and data ---------------------------------------------------------------------------------------

    @staticmethod
    def build_model(config: TrainConfig, device: torch.device) -> nn.Module:
        """The model this method trains, from config.model (a file or preset:NAME) on `device`; the base's is a
        LatentDiffusion (train.trainer.build_model)."""
        from ..trainer import build_model  # imported here: the trainer imports the methods
        return build_model(config, device)

    @classmethod
    def check_config(cls, config: TrainConfig) -> None:
        """Raise ConfigError for settings this method cannot train with (called by TrainConfig.validate)."""

    def empty_captions(self) -> str:
        """What to do with training images whose caption is empty ("keep" or "skip")."""
        return self.config.empty_captions

    def prepare_items(self, items: list) -> None:
        """Adjust the scanned training items in place before prior images are added (e.g. DreamBooth's captions)."""

    def check_items(self, items: list) -> None:
        """Raise ConfigError when the data cannot train this method (e.g. no caption holds the token)."""

    def data_options(self) -> dict:
        """Keyword arguments of train.buckets.TrainingData beyond the items and preprocessing (ControlNet's hints)."""
        return {}

    def model_inputs(self, batch: dict, device: torch.device) -> dict:
        """Inputs of the objective beyond latents, noise, timesteps and conditioning, from a loaded batch."""
        return {}

    # --- what trains --------------------------------------------------------------------------------------------------

    def set_trainable(self) -> None:
        """Turn on requires_grad for the trained weights (everything starts frozen)."""
        if self.config.train_scope == "cross_attention_kv":
            for name, module in self.model.unet.named_modules():
                if name.endswith(CROSS_ATTENTION_KV):
                    module.requires_grad_(True)
        else:
            self.model.unet.requires_grad_(True)
        if self.config.train_text_encoder:
            for tower in text_towers(self.model):
                tower.requires_grad_(True)

    def anchors(self) -> list[Anchor]:
        """The trained weights with their values now (the base's: called before a checkpoint is loaded), for the
        regularizers that pull weights back to the base (train.regularizers)."""
        anchors = []
        for name, parameter in self.model.named_parameters():
            if parameter.requires_grad:
                base = parameter.detach().clone()
                anchors.append(Anchor(name, parameter, lambda p=parameter, b=base: p - b))
        return anchors

    @property
    def text_trained(self) -> bool:
        """Whether gradients flow through the text towers (then captions are encoded with gradients)."""
        return self.config.train_text_encoder

    @property
    def extra(self) -> nn.Module | None:
        """Trained weights outside the model (a LoRA network, embedding vectors), registered in the objective so one
        DistributedDataParallel wrapper sees them."""
        return None

    def use_ema(self, ema) -> None:
        """Receive the engine's EMA (train.ema.EMA, or None without ema_decay) once it exists, for a loss that reads
        it (lcm's target network)."""

    def objective(self, conditioner) -> nn.Module:
        """The loss module: forward(...) -> per-sample loss [B]."""
        return DiffusionObjective(self.model, conditioner, self.extra, self.config.min_snr_gamma, self.text_trained)

    def accumulate(self, trainer, micro_batches) -> tuple[list[float], bool]:
        """Forward and backward of one optimizer step: `micro_batches` yields its gradient_accumulation (local
        batch, global batch size) pairs; leaves the step's gradient in the trained weights and returns the data
        losses and whether all were finite. The base's runs each micro-batch in turn (trainer.micro_step): the
        gradient of a per-sample loss over the whole batch is the sum of its micro-batches' gradients. (A loss
        over pairs within the batch is not; see train.methods.clip.)"""
        results = [trainer.micro_step(batch, size, sync=micro == self.config.gradient_accumulation - 1, micro=micro)
                   for micro, (batch, size) in enumerate(micro_batches)]
        return [loss for loss, _ in results], all(ok for _, ok in results)

    def param_groups(self, trainable: list[tuple[str, nn.Parameter]]) -> list[dict]:
        """AdamW parameter groups: the text towers' weights at lr_text_encoder, the rest at lr, both decayed."""
        config = self.config
        text_ids = {id(p) for tower in text_towers(self.model) for p in tower.parameters()}
        groups = [{"params": [p for _, p in trainable if id(p) not in text_ids], "lr": config.lr},
                  {"params": [p for _, p in trainable if id(p) in text_ids], "lr": config.lr_text_encoder or config.lr}]
        return [{**group, "weight_decay": config.weight_decay} for group in groups if group["params"]]

    # --- the weights file ---------------------------------------------------------------------------------------------

    def file_name(self) -> str:
        return "model.safetensors"

    def save(self, path: Path, step: int, ema_values: dict[str, torch.Tensor] | None = None,
             dtype: torch.dtype | None = None) -> None:
        """Write the weights file, in `dtype` if given. With `ema_values` (objective parameter name -> EMA tensor)
        the file holds the EMA values of every trained weight instead of the raw ones — the weights to generate
        with; the raw ones stay in the last checkpoint folder (written without EMA)."""
        # The objective holds the LatentDiffusion as `model`, so its parameter names are "model." + ours.
        with swapped(self.model, ema_values, prefix="model."):
            ldm.save_model(self.model, path, dtype=dtype, name=self.config.run_name())

    def load(self, path: Path) -> None:
        """Restore the weights written by `save` (raw values), bitwise."""
        self.model.load_state_dict(read_state_dict(path), strict=True)


def need(condition: bool, message: str) -> None:
    """ConfigError(message) unless `condition` holds: the form of every method's check_config."""
    if not condition:
        raise ConfigError(message)


def mismatched_tensors(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> list[str]:
    """Keys of the state dict `found` that keep it from loading strictly where `expected` does: missing or of another
    shape, then extra; empty when the two have one architecture."""
    return ([key for key in expected if key not in found or found[key].shape != expected[key].shape]
            + [key for key in found if key not in expected])
