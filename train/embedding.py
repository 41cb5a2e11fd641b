"""Textual inversion (Gal et al. 2022): new token vectors learnt for a word, saved as A1111 embedding files.

A prompt containing the word gets, in place of the word's tokens, `num_vectors` learnt vectors in the text encoder's
token-embedding space (A1111's rule: the embedding's name, matched as a whole word, expands to all of its vectors).
Only these vectors train; the model is frozen.

File format (A1111 loads it by file name, so `<token>.safetensors` is called with the word `<token>`):
    SD1 / SD2:  {"emb_params": [num_vectors, width]}
    SDXL:       {"clip_l": [num_vectors, 768], "clip_g": [num_vectors, 1280]}
with text metadata "name" and "step".
"""
import os
import re

import torch
from torch import nn

from ldm.checkpoint import read_state_dict, save_state_dict
from ldm.model import SDXLConditioner
from ldm.tokenizer import BOS, EOS
from sample.conditioning import text_towers, token_embedding
from .config import token_words_problem


def file_keys(model) -> list[str]:
    return ["clip_l", "clip_g"] if model.is_sdxl else ["emb_params"]


class TextualInversion(nn.Module):
    """The learnt vectors of one or more words (per word, one [num_vectors, width] parameter per text tower) and the
    hooks that place them.

    Several words train side by side in pivotal tuning, when a fine-tune brings more than one new word (a new shape
    and a new colour): each word has its own vectors and its own file entry, so each is called by its own name.
    `initializer` is one text for every word, or a list with one text per word.
    """

    def __init__(self, model, tokens: str | list[str], num_vectors: int = 1, initializer: str | list[str] = "*"):
        super().__init__()
        self.tokens = [tokens] if isinstance(tokens, str) else list(tokens)
        if not self.tokens:
            raise ValueError("an embedding needs at least one word")
        if problem := token_words_problem(self.tokens):
            raise ValueError(f"embedding words {self.tokens}: {problem}")
        initializers = [initializer] * len(self.tokens) if isinstance(initializer, str) else list(initializer)
        if len(initializers) != len(self.tokens):
            raise ValueError(f"{len(initializers)} initializers for {len(self.tokens)} tokens {self.tokens}: give one "
                             "initializer text for all of them, or one per token")
        self.num_vectors = num_vectors
        # Longest word first, so a word that is a prefix of another (e.g. "sks" and "sks-dog") never shadows it.
        alternatives = "|".join(re.escape(token) for token in sorted(self.tokens, key=len, reverse=True))
        self.pattern = re.compile(rf"(?<![\w])({alternatives})(?![\w])", re.IGNORECASE)
        self._index = {word.lower(): i for i, word in enumerate(self.tokens)}
        self.keys = file_keys(model)
        # A plain list: the towers belong to the model; registering them here would list their weights twice.
        self._towers = text_towers(model)
        # vectors[word][tower]: [num_vectors, width].
        self.vectors = nn.ModuleList()
        for init_text in initializers:
            per_tower = nn.ParameterList()
            for tower in self._towers:
                table = token_embedding(tower).weight
                ids = tower.tokenizer.encode(init_text) or [EOS]
                # The initial vectors are the initializer's token embeddings, cycled to num_vectors (A1111's init text).
                init = table.detach()[[ids[i % len(ids)] for i in range(num_vectors)]].float().clone()
                per_tower.append(nn.Parameter(init))
            self.vectors.append(per_tower)
        # tower -> (rows, positions, word index, vector index) of the slots the next token-embedding forward fills.
        self._pending: dict[int, tuple[torch.Tensor, ...]] = {}
        self._hooks = [token_embedding(tower).register_forward_hook(self._hook(i))
                       for i, tower in enumerate(self._towers)]

    @property
    def token(self) -> str:
        """The word, for an embedding of one word (a textual-inversion file)."""
        if len(self.tokens) != 1:
            raise ValueError(f"this embedding holds {len(self.tokens)} words {self.tokens}; name one of them")
        return self.tokens[0]

    def _hook(self, tower_index: int):
        def place_vectors(module, inputs, output):
            # output: [B, N, width]; replace the token embeddings at the placeholder slots by the learnt vectors.
            pending = self._pending.pop(tower_index, None)
            if pending is None:
                return output
            rows, positions, words, vector_index = (t.to(output.device) for t in pending)
            output = output.clone()
            for w, per_tower in enumerate(self.vectors):
                slots = words == w
                output[rows[slots], positions[slots]] = per_tower[tower_index][vector_index[slots]].to(output.dtype)
            return output
        return place_vectors

    def tokenize(self, tower_index: int, texts: list[str]) -> torch.Tensor:
        """Token rows [B, context_length] with `num_vectors` placeholder slots wherever a word occurs; the next
        forward of that tower's token embedding fills the slots."""
        tokenizer = self._towers[tower_index].tokenizer
        length = tokenizer.context_length
        rows = torch.full((len(texts), length), tokenizer.pad_token_id, dtype=torch.long)
        slots: list[tuple[int, int, int, int]] = []  # (row, position, word, vector)
        for b, text in enumerate(texts):
            ids = [BOS]
            # With one capturing group, split alternates text between matches and the matched words.
            pieces = self.pattern.split(text)
            for k, piece in enumerate(pieces):
                if k % 2:
                    word = self._index[piece.lower()]
                    placeholder = (tokenizer.encode(piece) or [0])[0]
                    for j in range(self.num_vectors):
                        if len(ids) < length - 1:  # slots cut off by truncation are simply dropped
                            slots.append((b, len(ids), word, j))
                        ids.append(placeholder)
                else:
                    ids.extend(tokenizer.encode(piece))
            ids = ids[:length - 1] + [EOS]
            rows[b, :len(ids)] = torch.tensor(ids)
        if slots:
            self._pending[tower_index] = tuple(torch.tensor(column) for column in zip(*slots))
        return rows

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    def _word(self, token: str | None) -> int:
        if token is None:
            return self._index[self.token.lower()]
        if token.lower() not in self._index:
            raise ValueError(f"no embedding word {token!r}; this one holds {self.tokens}")
        return self._index[token.lower()]

    def file_state(self, token: str | None = None) -> dict[str, torch.Tensor]:
        """One word's vectors as an A1111 embedding file's tensors (`token` may be omitted for a one-word embedding)."""
        return {key: v.detach().cpu().contiguous() for key, v in zip(self.keys, self.vectors[self._word(token)])}

    def load_file_state(self, state: dict[str, torch.Tensor], token: str | None = None) -> None:
        if set(state) != set(self.keys):
            raise ValueError(f"embedding file has keys {sorted(state)}, this model needs {self.keys}")
        with torch.no_grad():
            for key, vector in zip(self.keys, self.vectors[self._word(token)]):
                if state[key].shape != vector.shape:
                    raise ValueError(f"embedding {key}: shape {list(state[key].shape)} in the file, "
                                     f"{list(vector.shape)} expected")
                vector.copy_(state[key])

    def save(self, path, step: int, dtype: torch.dtype | None = None) -> None:
        """A one-word embedding as an A1111 embedding file."""
        state = {k: v.to(dtype) if dtype is not None else v for k, v in self.file_state().items()}
        save_state_dict(state, path, metadata={"name": self.token, "step": str(step)})


def load_embedding(model, path, token: str | None = None) -> TextualInversion:
    """Attach an A1111 embedding file to `model`; the word is `token`, or the file name without extension."""
    state = read_state_dict(path)
    token = token or os.path.splitext(os.path.basename(path))[0]
    keys = file_keys(model)
    if not set(keys) <= set(state):
        raise ValueError(f"{path}: an embedding for this model needs {keys}; the file has {sorted(state)}")
    state = {k: state[k] if state[k].ndim == 2 else state[k][None] for k in keys}
    embedding = TextualInversion(model, token, num_vectors=state[keys[0]].shape[0])
    embedding.load_file_state(state)
    return embedding


class Conditioner:
    """Captions (and SDXL size conditions) -> the UNet's conditioning, applying a textual inversion if given.

    SD1/SD2: {"context": [B, 77, D]}. SDXL: {"context": [B, 77, 2048], "y": [B, 2816]}, with each sample's own
    original size, crop and target size (SDXL micro-conditioning, Podell et al. 2023 §2.2).
    """

    def __init__(self, model, embedding: TextualInversion | None = None):
        self.model, self.embedding = model, embedding

    def _tokens(self, tower_index: int, tower, texts: list[str]) -> torch.Tensor:
        if self.embedding is not None:
            return self.embedding.tokenize(tower_index, texts)
        return tower.tokenizer(texts)

    def __call__(self, captions: list[str], original_sizes=None, crops=None, target_sizes=None) -> dict:
        model = self.model
        device = model.device
        towers = text_towers(model)
        if not model.is_sdxl:
            return {"context": towers[0].encode_tokens(self._tokens(0, towers[0], captions).to(device))}
        context, pooled = model.conditioner.encode_tokens(self._tokens(0, towers[0], captions).to(device),
                                                          self._tokens(1, towers[1], captions).to(device))
        size = model.preset.resolution
        n = len(captions)
        original_sizes = original_sizes or [(size, size)] * n
        crops = crops or [(0, 0)] * n
        target_sizes = target_sizes or [(size, size)] * n
        y = torch.cat([SDXLConditioner.vector(pooled[i:i + 1], original_sizes[i], crops[i], target_sizes[i])
                       for i in range(n)])
        return {"context": context, "y": y}
