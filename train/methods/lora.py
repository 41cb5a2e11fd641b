"""LoRA / LoCon: low-rank adapters on the frozen model's layers, saved in kohya's format (see train.lora)."""
from pathlib import Path

import torch

from ldm.checkpoint import read_state_dict
from ..ema import swapped
from ..lora import LoRANetwork, target_layers
from sample.lora import UNET_PREFIX, layer_name
from ..regularizers import Anchor
from .base import CROSS_ATTENTION_KV, Method


class LoRA(Method):
    def set_trainable(self) -> None:
        config = self.config
        layers = target_layers(self.model, conv=config.lora_conv_rank > 0, text_encoder=config.train_text_encoder)
        if config.train_scope == "cross_attention_kv":
            kv = tuple(layer_name("", path) for path in CROSS_ATTENTION_KV)
            layers = {name: layer for name, layer in layers.items()
                      if not name.startswith(UNET_PREFIX) or name.endswith(kv)}
        self.layers = layers
        self.network = LoRANetwork(layers, config.lora_rank, config.lora_alpha, config.lora_conv_rank,
                                   config.lora_conv_alpha)

    def anchors(self) -> list[Anchor]:
        """Each adapted layer's base weight, its deviation the adapter's ΔW (the merged weight minus the base's)."""
        return [Anchor(name, self.layers[name].weight, adapter.delta_weight)
                for name, adapter in self.network.adapters.items()]

    @property
    def extra(self) -> LoRANetwork:
        return self.network

    def file_name(self) -> str:
        return f"{self.config.lora_name}.safetensors"

    def save(self, path: Path, step: int, ema_values: dict[str, torch.Tensor] | None = None,
             dtype: torch.dtype | None = None) -> None:
        # The objective holds the network as `extra`.
        with swapped(self.network, ema_values, prefix="extra."):
            self.network.save(path, dtype, extra_metadata={"ss_steps": str(step)})

    def load(self, path: Path) -> None:
        self.network.load_kohya_state_dict(read_state_dict(path))
