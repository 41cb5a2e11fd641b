"""Textual-inversion embeddings (Gal et al. 2022) used by name in a prompt, from A1111's embeddings folder.

An embedding is a few learnt vectors in a text encoder's token-embedding space. Where its name appears in a prompt
(matched on tokens, as A1111 does: the name's token sequence, longest names first), those vectors replace the name's
tokens. The name is the file name without extension. Files:

    A1111 .pt            {"string_to_param": {"*": [n, width]}, "name": ..., "step": ...}
    .safetensors / .bin  one tensor, e.g. {"emb_params": [n, width]} (a single vector [width] is one vector)
    SDXL                 {"clip_l": [n, 768], "clip_g": [n, 1280]}

`.pt`/`.bin` files are unpickled with torch's weights-only loader, which runs no code from the file.
"""
import functools
import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from ldm.tokenizer import CLIPTokenizer

EMBEDDING_EXTENSIONS = (".pt", ".bin", ".safetensors")


class EmbeddingError(ValueError):
    """An embedding file that cannot be read or has an unknown layout."""


@dataclass(eq=False)
class Embedding:
    """vectors: one [num_vectors, width] float32 tensor per text tower (SDXL: CLIP-L then OpenCLIP-bigG)."""
    name: str
    vectors: list[torch.Tensor]
    path: str | None = None

    @property
    def num_vectors(self) -> int:
        return self.vectors[0].shape[0]

    @functools.cached_property
    def shorthash(self) -> str | None:
        """A1111's "TI hashes" entry: the first 12 hex digits of the file's sha256."""
        if self.path is None:
            return None
        digest = hashlib.sha256()
        with open(self.path, "rb") as file:
            for block in iter(lambda: file.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()[:12]


def vectors_from(data, path: str) -> list[torch.Tensor]:
    """An embedding file's tensors (one of the layouts of the module docstring) -> one [n, width] float32 tensor per
    text tower; `path` names the file in errors."""
    if not isinstance(data, dict):
        raise EmbeddingError(f"{path}: holds a {type(data).__name__}, not a dict of tensors")
    if "string_to_param" in data:
        params = data["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise EmbeddingError(f"{path}: 'string_to_param' must hold exactly one tensor")
        tensors = [next(iter(params.values()))]
    elif "clip_l" in data and "clip_g" in data:
        tensors = [data["clip_l"], data["clip_g"]]
    else:
        found = [v for v in data.values() if isinstance(v, torch.Tensor)]
        if len(found) != 1:
            raise EmbeddingError(f"{path}: expected one tensor (or 'string_to_param', or 'clip_l' + 'clip_g'), "
                                 f"found keys {sorted(map(str, data))[:8]}")
        tensors = found
    vectors = []
    for tensor in tensors:
        if not isinstance(tensor, torch.Tensor) or tensor.ndim not in (1, 2):
            raise EmbeddingError(f"{path}: embedding vectors must be a [n, width] tensor")
        vectors.append((tensor[None] if tensor.ndim == 1 else tensor).detach().float().cpu())
    if len({v.shape[0] for v in vectors}) != 1:
        raise EmbeddingError(f"{path}: the towers' vector counts differ ({[v.shape[0] for v in vectors]})")
    return vectors


def load_embedding(path: str | os.PathLike) -> Embedding:
    """Read one embedding file; its name is the file name without extension."""
    path = os.fspath(path)
    try:
        if path.lower().endswith(".safetensors"):
            data = load_file(path)
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any reader failure is reported with the file name
        raise EmbeddingError(f"{path}: cannot be read as an embedding ({error})") from None
    return Embedding(Path(path).stem, vectors_from(data, path), path)


class EmbeddingDatabase:
    """The embeddings of a folder (searched recursively), looked up by token sequence.

    `compatible_with(widths)` keeps those whose vectors fit the model's text towers (e.g. [768] for SD1,
    [768, 1280] for SDXL); the others are skipped, as A1111 does, and listed in `skipped`.
    """

    def __init__(self, embeddings: list[Embedding] = (), tokenizer: CLIPTokenizer | None = None):
        self.tokenizer = tokenizer or CLIPTokenizer()
        self.embeddings = {e.name: e for e in embeddings}
        self.skipped: list[str] = []
        # First token id -> [(name's token ids, embedding)], longest first.
        self._by_first_token: dict[int, list[tuple[tuple[int, ...], Embedding]]] = {}
        for embedding in self.embeddings.values():
            ids = tuple(self.tokenizer.encode(embedding.name))
            if ids:
                self._by_first_token.setdefault(ids[0], []).append((ids, embedding))
        for candidates in self._by_first_token.values():
            candidates.sort(key=lambda item: -len(item[0]))

    @classmethod
    def from_directory(cls, directory: str | os.PathLike, tokenizer: CLIPTokenizer | None = None):
        """Load every embedding file under `directory`; unreadable files become warnings."""
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"embeddings folder not found: {directory}")
        embeddings = []
        for path in sorted(Path(directory).rglob("*")):
            if path.suffix.lower() in EMBEDDING_EXTENSIONS and path.is_file():
                try:
                    embeddings.append(load_embedding(path))
                except EmbeddingError as error:
                    warnings.warn(f"embedding skipped: {error}", stacklevel=2)
        return cls(embeddings, tokenizer)

    def compatible_with(self, widths: list[int]) -> "EmbeddingDatabase":
        """The subset whose per-tower widths equal `widths`."""
        fitting = [e for e in self.embeddings.values() if [v.shape[1] for v in e.vectors] == list(widths)]
        subset = EmbeddingDatabase(fitting, self.tokenizer)
        subset.skipped = sorted(set(self.embeddings) - {e.name for e in fitting})
        return subset

    def find(self, ids: list[int], position: int) -> tuple[Embedding, int] | None:
        """The embedding whose name's tokens start at ids[position]: (embedding, number of name tokens), or None."""
        for name_ids, embedding in self._by_first_token.get(ids[position], ()):
            if tuple(ids[position:position + len(name_ids)]) == name_ids:
                return embedding, len(name_ids)
        return None
