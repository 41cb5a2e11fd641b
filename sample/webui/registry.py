"""What the server can offer: checkpoints, VAEs and LoRAs found in folders (and the package's built-in LoRAs), listed
as A1111's API lists them.

Names come only from these listings. A request names an entry ("v1-5.safetensors [6ce0161689]", "v1-5", or its
hash) and gets the file the scan found; a request never supplies a path, so `../` in a name cannot reach outside the
folders. A1111's layout: checkpoints anywhere under the models folder; VAEs in its `VAE/` subfolder or named
`*.vae.safetensors` / `*.vae.pt` / `*.vae.ckpt` next to the checkpoints.
"""
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from sample.lora import lora_files

CHECKPOINT_EXTENSIONS = (".safetensors", ".ckpt")
VAE_EXTENSIONS = (".safetensors", ".pt", ".ckpt")
VAE_FOLDER = "VAE"


class NotFound(LookupError):
    """A name that no listing holds; the message lists what exists."""


@dataclass(frozen=True)
class CheckpointFile:
    """One model file, or the built-in default model (`filename` None; its sha256 is its file's, if it has one)."""
    name: str  # path relative to the models folder, with extension (A1111's `name`)
    filename: str | None
    sha256: str | None

    @property
    def shorthash(self) -> str | None:
        # A1111's model hash: the first 10 hex digits of the file's sha256 (ldm.model_hash).
        return self.sha256[:10] if self.sha256 else None

    @property
    def model_name(self) -> str:
        # A1111: the name without extension, path separators replaced so it can be a single label.
        return os.path.splitext(self.name)[0].replace("/", "_").replace("\\", "_")

    @property
    def title(self) -> str:
        return f"{self.name} [{self.shorthash}]" if self.shorthash else self.name

    def aliases(self) -> set[str]:
        names = {self.title, self.name, self.model_name, os.path.splitext(self.name)[0]}
        if self.sha256:
            names |= {self.sha256, self.shorthash}
        return names

    def api_dict(self) -> dict:
        return {"title": self.title, "model_name": self.model_name, "hash": self.shorthash, "sha256": self.sha256,
                "filename": self.filename, "config": None}


@dataclass(frozen=True)
class NamedFile:
    """A VAE or LoRA: its name (file name without extension) and path."""
    name: str
    filename: str


class _HashCache:
    """sha256 of files, recomputed only when a file's size or modification time changes (hashing a 2 GB
    checkpoint takes seconds; a rescan should not)."""

    def __init__(self):
        self._known: dict[str, tuple[int, int, str]] = {}

    def sha256(self, path: str) -> str:
        stat = os.stat(path)
        cached = self._known.get(path)
        if cached and cached[:2] == (stat.st_size, stat.st_mtime_ns):
            return cached[2]
        digest = hashlib.sha256()
        with open(path, "rb") as file:
            while chunk := file.read(1 << 20):
                digest.update(chunk)
        self._known[path] = (stat.st_size, stat.st_mtime_ns, digest.hexdigest())
        return digest.hexdigest()


def _is_vae_file(path: Path, root: Path) -> bool:
    relative = path.relative_to(root)
    return relative.parts[0] == VAE_FOLDER or any(path.name.lower().endswith(".vae" + ext) for ext in VAE_EXTENSIONS)


def _files_under(folder: str | None, extensions: tuple[str, ...]) -> list[Path]:
    if not folder or not os.path.isdir(folder):
        return []
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix.lower() in extensions)


class Registry:
    """The checkpoints, VAEs and LoRAs of the server's folders. `refresh()` rescans (A1111's refresh buttons).

    `default` is the checkpoint used when nothing else is chosen: the file given with --model, or else the built-in
    default model (an entry without a file, listed first).
    """

    def __init__(self, models_dir: str | None = None, lora_dir: str | None = None, model_path: str | None = None,
                 upscalers_dir: str | None = None):
        self.models_dir = models_dir
        self.lora_dir = lora_dir
        # Upscaler models are listed by sample.upscalers, which rescans the folder on every listing.
        self.upscalers_dir = upscalers_dir
        self.model_path = os.path.abspath(model_path) if model_path else None
        # The built-in default model's entry; its real name is known once it is loaded (name_builtin).
        self.builtin = CheckpointFile("default", None, None)
        self._hashes = _HashCache()
        self.checkpoints: list[CheckpointFile] = []
        self.vaes: list[NamedFile] = []
        self.loras: list[NamedFile] = []
        self.refresh()

    def refresh(self) -> None:
        checkpoints, vaes = [], []
        if self.models_dir:
            root = Path(self.models_dir)
            for path in _files_under(self.models_dir, CHECKPOINT_EXTENSIONS + VAE_EXTENSIONS):
                if _is_vae_file(path, root):
                    vaes.append(NamedFile(path.name, str(path)))
                elif path.suffix.lower() in CHECKPOINT_EXTENSIONS:
                    checkpoints.append(self._checkpoint(path.relative_to(root).as_posix(), str(path)))
        if self.model_path and all(c.filename != self.model_path for c in checkpoints):
            checkpoints.insert(0, self._checkpoint(os.path.basename(self.model_path), self.model_path))
        if not self.model_path:
            checkpoints.insert(0, self.builtin)
        self.checkpoints = checkpoints
        self.vaes = vaes
        self.loras = [NamedFile(name, path) for name, path in lora_files(self.lora_dir)]

    def name_builtin(self, name: str, path: str | None = None) -> CheckpointFile:
        """Give the built-in default model's entry the name (and, when it comes from a file, the hash) that its
        infotexts carry. Returns the renamed entry."""
        self.builtin = CheckpointFile(name, None, self._hashes.sha256(path) if path else None)
        if not self.model_path:
            self.checkpoints[0] = self.builtin
        return self.builtin

    def _checkpoint(self, name: str, path: str) -> CheckpointFile:
        return CheckpointFile(name, os.path.abspath(path), self._hashes.sha256(path))

    @property
    def default(self) -> CheckpointFile:
        if self.model_path:
            return next(c for c in self.checkpoints if c.filename == self.model_path)
        return self.checkpoints[0]

    def checkpoint(self, name: str) -> CheckpointFile:
        """The checkpoint a name refers to: its title, relative name, model_name, sha256 or short hash."""
        for checkpoint in self.checkpoints:
            if name in checkpoint.aliases():
                return checkpoint
        raise NotFound(f"model {name!r} not found; available: {', '.join(c.title for c in self.checkpoints)} "
                       "(POST /sdapi/v1/refresh-checkpoints after adding files)")

    def preset_checkpoint(self, model: str) -> CheckpointFile | None:
        """The entry of a generation preset's model (sample.models.GenerationPreset.model: "default" is the built-in
        model, else a file), or None when this server does not offer it (e.g. "default" under --model)."""
        if model == "default":
            return self.builtin if self.builtin in self.checkpoints else None
        return next((c for c in self.checkpoints if c.filename == os.path.abspath(model)), None)

    def vae(self, name: str) -> NamedFile | None:
        """None for "Automatic"/"None" (the checkpoint's own VAE), else the VAE file of that name."""
        if name in ("Automatic", "None", ""):
            return None
        for vae in self.vaes:
            if name in (vae.name, os.path.basename(vae.filename)):
                return vae
        raise NotFound(f"VAE {name!r} not found; available: Automatic, {', '.join(v.name for v in self.vaes)}")
