"""Textual inversion (Gal et al. 2022): only the new token's vectors train; the file is an A1111 embedding
(see train.embedding)."""
from pathlib import Path

import torch

from ldm.checkpoint import read_state_dict
from ..config import ConfigError, TrainConfig
from ..buckets import TrainingData
from ..ema import swapped
from ..embedding import TextualInversion as Embedding
from .base import Method, need


class TextualInversion(Method):
    @classmethod
    def check_config(cls, config: TrainConfig) -> None:
        need(bool(config.token), "textual inversion needs token: the word that will call the embedding (--token)")
        need(len(config.tokens) == 1, f"textual inversion learns one word (its file's name), token={config.token!r} "
                                      "names several: train one embedding per word, or use method lora (pivotal "
                                      "tuning) for several")
        need(not config.cache_text, "cache_text needs fixed text embeddings: it cannot be combined with "
                                    "textual-inversion, whose vectors train")

    def set_trainable(self) -> None:
        config = self.config
        self.embedding = Embedding(self.model, config.tokens, config.num_vectors, config.initializers)

    def check_items(self, items: list) -> None:
        require_token_in_captions(self.embedding, items, self.config)

    @property
    def text_trained(self) -> bool:
        return True

    @property
    def extra(self) -> Embedding:
        return self.embedding

    def param_groups(self, trainable: list) -> list[dict]:
        # Weight decay would pull the vectors towards zero, away from the token-embedding space they live in.
        return [{"params": [p for _, p in trainable], "lr": self.config.lr, "weight_decay": 0.0}]

    def file_name(self) -> str:
        return f"{self.config.token}.safetensors"

    def save(self, path: Path, step: int, ema_values: dict[str, torch.Tensor] | None = None,
             dtype: torch.dtype | None = None) -> None:
        # The objective holds the embedding as `extra`.
        with swapped(self.embedding, ema_values, prefix="extra."):
            self.embedding.save(path, step, dtype)

    def load(self, path: Path) -> None:
        self.embedding.load_file_state(read_state_dict(path))


def require_token_in_captions(embedding: Embedding, items: list, config: TrainConfig) -> None:
    """ConfigError unless, for each of the embedding's words, some training caption (after caption_template) holds
    it: otherwise that word's vectors would never be used."""
    template = config.preprocessing.caption_template
    found = set()
    for item in items:
        caption = TrainingData.caption_text(item.caption, template, config.token)
        found.update(word.lower() for word in embedding.pattern.findall(caption))
        if len(found) == len(embedding.tokens):
            return
    missing = [word for word in embedding.tokens if word.lower() not in found]
    raise ConfigError(f"no training caption contains the token {' or '.join(map(repr, missing))}, so its vectors "
                      "would never be used; set caption_template, e.g. 'a photo of {token}, {caption}'")
