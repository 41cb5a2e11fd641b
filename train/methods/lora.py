"""LoRA / LoCon: low-rank adapters on the frozen model's layers, saved in kohya's format (see train.lora).

With `token` set it is pivotal tuning (as kohya's and cloneofsimo's LoRA trainers call it): the word (or each of
several comma-separated words) also gets learnt token vectors, as in textual inversion, trained jointly with the
adapters. The vectors ride in the LoRA file under A1111's bundled-embedding keys `bundle_emb.<word>.<key>`, one entry
per word, so the LoRA and its words load together. Prompts
without the word keep the base's text encoding exactly (when the text encoder has no adapters), which is what keeps a
new concept from spreading into the old ones (docs/RESULTS.md, the heart experiment).
"""
from pathlib import Path

import torch
from torch import nn

from ldm.checkpoint import read_state_dict
from sample.lora import BUNDLE_PREFIX, UNET_PREFIX, layer_name
from ..config import TrainConfig
from ..ema import swapped
from ..embedding import TextualInversion as Embedding
from ..lora import LoRANetwork, target_layers
from ..regularizers import Anchor
from .base import CROSS_ATTENTION_KV, Method, need
from .textual_inversion import require_token_in_captions


class LoRA(Method):
    @classmethod
    def check_config(cls, config: TrainConfig) -> None:
        if config.token:
            need(not config.cache_text, "cache_text needs fixed text embeddings: it cannot be combined with a lora "
                                        "token (pivotal tuning), whose vectors train")
            need(config.distributed != "fsdp", "pivotal tuning (lora with token) trains token vectors FSDP does not "
                                               "shard: use distributed = 'ddp' or drop token")

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
        if config.token:
            self.embedding = Embedding(self.model, config.tokens, config.num_vectors, config.initializers)
            # One module for the objective, so DDP and the EMA see both: parameters "network.*" and "embedding.*".
            self.trained = nn.ModuleDict({"network": self.network, "embedding": self.embedding})
        else:
            self.trained = self.network

    def check_items(self, items: list) -> None:
        if self.embedding is not None:
            require_token_in_captions(self.embedding, items, self.config)

    def anchors(self) -> list[Anchor]:
        """Each adapted layer's base weight, its deviation the adapter's ΔW (the merged weight minus the base's)."""
        return [Anchor(name, self.layers[name].weight, adapter.delta_weight)
                for name, adapter in self.network.adapters.items()]

    @property
    def text_trained(self) -> bool:
        return self.config.train_text_encoder or self.embedding is not None

    @property
    def extra(self) -> nn.Module:
        return self.trained

    def param_groups(self, trainable: list) -> list[dict]:
        if self.embedding is None:
            return super().param_groups(trainable)
        config = self.config
        vectors = {id(p) for p in self.embedding.parameters()}
        groups = super().param_groups([(n, p) for n, p in trainable if id(p) not in vectors])
        # No weight decay on the vectors: it would pull them towards zero, away from the token-embedding space.
        return groups + [{"params": [p for _, p in trainable if id(p) in vectors],
                          "lr": config.lr_embedding or config.lr, "weight_decay": 0.0}]

    def file_name(self) -> str:
        return f"{self.config.lora_name}.safetensors"

    def _prefix(self, part: str) -> str:
        # The objective holds `trained` as `extra`.
        return "extra." if self.embedding is None else f"extra.{part}."

    def save(self, path: Path, step: int, ema_values: dict[str, torch.Tensor] | None = None,
             dtype: torch.dtype | None = None) -> None:
        bundled = {}
        if self.embedding is not None:
            with swapped(self.embedding, ema_values, prefix=self._prefix("embedding")):
                # Copies: the parameters get their raw values back when the swap ends.
                bundled = {f"{BUNDLE_PREFIX}{word}.{key}": value.clone()
                           for word in self.embedding.tokens for key, value in self.embedding.file_state(word).items()}
        with swapped(self.network, ema_values, prefix=self._prefix("network")):
            self.network.save(path, dtype, extra_metadata={"ss_steps": str(step)}, extra_tensors=bundled)

    def load(self, path: Path) -> None:
        state = read_state_dict(path)
        if self.embedding is not None:
            for word in self.embedding.tokens:
                bundle = f"{BUNDLE_PREFIX}{word}."
                self.embedding.load_file_state({key[len(bundle):]: value for key, value in state.items()
                                                if key.startswith(bundle)}, word)
        self.network.load_kohya_state_dict({key: value for key, value in state.items()
                                            if not key.startswith(BUNDLE_PREFIX)})
