"""On-disk caches of tensors computed once per run (VAE latents, text embeddings), keyed by a fingerprint of
everything they depend on."""
import hashlib
import os
from pathlib import Path

import torch

from .data import Item

def fingerprint(*parts) -> str:
    """A short hash of everything a cache depends on (weights, sizes, settings, file identities)."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.Tensor):
            digest.update(f"{part.dtype}{tuple(part.shape)}".encode())
            digest.update(part.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(part, dict):
            for key in sorted(part):
                digest.update(key.encode())
                digest.update(fingerprint(part[key]).encode())
        else:
            digest.update(repr(part).encode())
    return digest.hexdigest()[:20]


def file_identity(item: Item) -> tuple:
    stat = os.stat(item.path)
    return item.key, item.member, stat.st_size, stat.st_mtime_ns


class TensorCache:
    """A folder of safetensors shards mapping string keys to tensors, named by the fingerprint of what it depends on:
    any change (model weights, resolution, buckets, files) gives a new folder, so a stale cache is never read.

    Shards are written atomically by `ldm.checkpoint.save_state_dict`; a shard interrupted mid-write is simply absent.
    """

    SHARD_ITEMS = 256

    def __init__(self, root: str | os.PathLike, kind: str, fingerprint_: str):
        self.directory = Path(root) / f"{kind}-{fingerprint_}"
        self._index: dict[str, Path] = {}
        self._open: dict[Path, object] = {}
        if self.directory.is_dir():
            from safetensors import safe_open
            for shard in sorted(self.directory.glob("shard-*.safetensors")):
                with safe_open(str(shard), "pt") as f:
                    for key in f.keys():
                        self._index[key] = shard

    def __contains__(self, key: str) -> bool:
        return key in self._index

    def get(self, key: str) -> torch.Tensor:
        from safetensors import safe_open
        shard = self._index[key]
        if shard not in self._open:
            self._open[shard] = safe_open(str(shard), "pt")
        return self._open[shard].get_tensor(key)

    def write(self, tensors: dict[str, torch.Tensor]) -> None:
        """Add tensors in new shards of at most SHARD_ITEMS keys."""
        from ldm.checkpoint import save_state_dict
        self.directory.mkdir(parents=True, exist_ok=True)
        keys = sorted(tensors)
        first = len(list(self.directory.glob("shard-*.safetensors")))
        for n, start in enumerate(range(0, len(keys), self.SHARD_ITEMS)):
            shard = self.directory / f"shard-{first + n:05d}.safetensors"
            chunk = {k: tensors[k].detach().cpu().contiguous() for k in keys[start:start + self.SHARD_ITEMS]}
            save_state_dict(chunk, shard)
            for key in chunk:
                self._index[key] = shard
