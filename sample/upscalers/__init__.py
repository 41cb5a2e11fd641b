"""Image upscalers: the built-in resamplers and model files (ESRGAN, Real-ESRGAN, SRVGGNetCompact, SwinIR) found in
an upscalers folder, listed and applied by name as A1111 does.

    infos = list_upscalers("models")          # None, Lanczos, Nearest, your registered ones, then the folder's files
    big = upscale(image, "4x-UltraSharp", 2)   # exactly round(w·2) x round(h·2)

Model files are looked up in the folder itself and in A1111's subfolders `ESRGAN/`, `RealESRGAN/`, `SwinIR/`
(`.pth`, `.pt`, `.safetensors`); they are read through `ldm.checkpoint`'s safe unpickler, never executed. Extend with
`register_upscaler(name, fn)` (any image -> image function) or `register_architecture(...)` (a new file layout).
"""
import copy
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ldm.checkpoint import CheckpointError, read_state_dict, read_torch_data

from .builtin import BUILTIN_UPSCALERS, resize
from .detect import ARCHITECTURES, Architecture, build_model, detect_architecture, register_architecture, \
    unregister_architecture
from .tiles import DEFAULT_OVERLAP, DEFAULT_TILE, run_tiled

__all__ = ["UpscalerInfo", "UpscalerError", "list_upscalers", "upscaler_names", "upscale", "upscale_to", "check_upscaler",
           "load_upscaler", "run_model", "register_upscaler", "unregister_upscaler", "register_architecture",
           "unregister_architecture", "ARCHITECTURES", "Architecture", "detect_architecture", "BUILTIN_UPSCALERS",
           "LATENT_UPSCALERS", "MODEL_FOLDERS", "MODEL_EXTENSIONS"]

MODEL_FOLDERS = ("ESRGAN", "RealESRGAN", "SwinIR")
MODEL_EXTENSIONS = (".pth", ".pt", ".safetensors")
# Hires fix's latent-space modes (sample.generate); they upscale latents, not images, so upscale() refuses them.
LATENT_UPSCALERS = ("Latent", "Latent (nearest)")
# A1111 lists scale 4 for the upscalers without a native factor.
DEFAULT_LISTED_SCALE = 4
# Images smaller than this (per side) are padded for the model and cropped back.
MIN_SIDE = 16
# A model upscaler is applied at most this many times to reach the requested scale (A1111 does the same).
MAX_PASSES = 3


class UpscalerError(ValueError):
    """An unknown upscaler name or a model file that cannot be used; the message says what was found."""


@dataclass(frozen=True)
class UpscalerInfo:
    """One entry of A1111's `/sdapi/v1/upscalers`."""
    name: str
    model_name: str | None  # the family ("ESRGAN", "SwinIR", ...) for model files; None for built-ins
    model_path: str | None
    model_url: str | None
    scale: float | None  # the model's native factor; None when the file's layout is not recognised


@dataclass(frozen=True)
class _Custom:
    function: Callable[[Image.Image, float], Image.Image]
    scale: float


_CUSTOM: dict[str, _Custom] = {}


def register_upscaler(name: str, function: Callable[[Image.Image, float], Image.Image], *,
                      scale: float = DEFAULT_LISTED_SCALE) -> None:
    """Make `function(image, scale) -> image` available as upscaler `name` (listed after the built-ins, usable in
    hires fix and Extras). Its output is resized (Lanczos) to exactly round(w·scale) x round(h·scale) if it is not."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"an upscaler name must be a non-empty string, got {name!r}")
    if not callable(function):
        raise TypeError(f"upscaler {name!r}: function must be callable, got {type(function).__name__}")
    if name in BUILTIN_UPSCALERS or name in LATENT_UPSCALERS or name in _CUSTOM:
        raise ValueError(f"the upscaler name {name!r} is already taken")
    _CUSTOM[name] = _Custom(function, scale)


def unregister_upscaler(name: str) -> None:
    _CUSTOM.pop(name, None)


def _model_files(directory: str | os.PathLike | None) -> list[tuple[str, Path]]:
    """(listed name, path) of every model file: the folder's own files first, then each A1111 subfolder's; a name
    that repeats (same stem in two folders) is listed as folder/stem."""
    if directory is None or not os.path.isdir(directory):
        return []
    root = Path(directory)
    found: list[tuple[str, Path]] = []
    taken: set[str] = set()
    for folder in (root, *(root / name for name in MODEL_FOLDERS)):
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() in MODEL_EXTENSIONS and path.is_file():
                name = path.stem if path.stem not in taken else f"{folder.name}/{path.stem}"
                taken.add(name)
                found.append((name, path))
    return found


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of an upscaler file. BasicSR's .pth files nest them as {"params_ema": {...}} or {"params": ...};
    the EMA weights are the released ones (Real-ESRGAN's inference code prefers them too)."""
    if path.suffix.lower() == ".safetensors":
        return read_state_dict(path)
    data = read_torch_data(path)
    if isinstance(data, dict):
        for wrapper in ("params_ema", "params", "state_dict"):
            if isinstance(data.get(wrapper), dict):
                data = data[wrapper]
                break
    if not isinstance(data, dict) or not any(isinstance(value, torch.Tensor) for value in data.values()):
        raise CheckpointError(f"{path} holds no dict of tensors (found {type(data).__name__})")
    return {key: value for key, value in data.items() if isinstance(value, torch.Tensor)}


@dataclass(frozen=True)
class LoadedUpscaler:
    architecture: Architecture
    model: torch.nn.Module  # fp32, on the CPU
    # (device, dtype) -> the model copied there, made on first use and kept as long as this entry is cached.
    copies: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def scale(self) -> int:
        return int(self.model.scale)


_CACHE: "OrderedDict[tuple, LoadedUpscaler]" = OrderedDict()
_CACHE_SIZE = 2
_CACHE_LOCK = threading.Lock()


def load_upscaler(path: str | os.PathLike) -> LoadedUpscaler:
    """The model in `path`, detected from its keys and loaded strictly (fp32, CPU). The last two files loaded are
    kept, keyed by path, size and modification time. UpscalerError names the file and what was wrong."""
    path = Path(path)
    try:
        stat = path.stat()
    except OSError as error:
        raise UpscalerError(f"cannot read upscaler file {path}: {error.strerror}") from error
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    with _CACHE_LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
    try:
        architecture, model = build_model(_read_weights(path))
    except (CheckpointError, ValueError) as error:
        raise UpscalerError(f"{path.name}: {error}") from error
    loaded = LoadedUpscaler(architecture, model)
    with _CACHE_LOCK:
        _CACHE[key] = loaded
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return loaded


# (path, size, mtime, registered architectures) -> (family, scale), or None for a file that does not load: a listing
# reads each file once, not on every request (the model cache holds only the last two models).
_LISTED: dict[tuple, tuple[str, int] | None] = {}


def _file_info(name: str, path: Path) -> UpscalerInfo:
    try:
        stat = path.stat()
    except OSError:
        return UpscalerInfo(name, None, str(path), None, None)
    key = (str(path), stat.st_size, stat.st_mtime_ns, tuple(a.name for a in ARCHITECTURES))
    if key not in _LISTED:
        try:
            loaded = load_upscaler(path)
            _LISTED[key] = (loaded.architecture.name, loaded.scale)
        except UpscalerError:
            # Listed anyway (A1111 lists every file); using it raises the error that says what is wrong.
            _LISTED[key] = None
    family, scale = _LISTED[key] or (None, None)
    return UpscalerInfo(name, family, str(path), None, scale)


def list_upscalers(directory: str | os.PathLike | None) -> list[UpscalerInfo]:
    """Built-ins (None, Lanczos, Nearest), registered upscalers, then the model files under `directory`."""
    infos = [UpscalerInfo(name, None, None, None, DEFAULT_LISTED_SCALE) for name in BUILTIN_UPSCALERS]
    infos += [UpscalerInfo(name, None, None, None, custom.scale) for name, custom in _CUSTOM.items()]
    return infos + [_file_info(name, path) for name, path in _model_files(directory)]


def upscaler_names(directory: str | os.PathLike | None) -> list[str]:
    """The names list_upscalers gives, without reading any model file."""
    return [*BUILTIN_UPSCALERS, *_CUSTOM, *(name for name, _ in _model_files(directory))]


def target_size(size: tuple[int, int], scale: float) -> tuple[int, int]:
    """(round(w·scale), round(h·scale)), at least 1x1."""
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def _to_tensor(image: Image.Image) -> torch.Tensor:
    # [1, 3, H, W] in [0, 1]
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)[None]


def _to_image(x: torch.Tensor) -> Image.Image:
    pixels = (x[0].float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(pixels)


def run_model(loaded: LoadedUpscaler, image: Image.Image, device: torch.device | str | None = None,
              tile: int = DEFAULT_TILE, overlap: int = DEFAULT_OVERLAP) -> Image.Image:
    """One pass of the model over `image` (RGB), tiled; fp16 on a GPU for architectures that support it."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.float16 if device.type == "cuda" and loaded.architecture.supports_half else torch.float32
    model = loaded.model
    if (device.type, dtype) != ("cpu", torch.float32):
        if (device, dtype) not in loaded.copies:
            loaded.copies[device, dtype] = copy.deepcopy(loaded.model).to(device, dtype)
        model = loaded.copies[device, dtype]
    x = _to_tensor(image).to(device, dtype)
    # Reflect padding (SwinIR's window, Real-ESRGAN's pixel-unshuffle) needs a few pixels on each side: tiny images
    # are extended by edge replication and the result cropped back.
    width, height = image.size
    x = F.pad(x, (0, max(0, MIN_SIDE - width), 0, max(0, MIN_SIDE - height)), mode="replicate")
    out = run_tiled(model, x, loaded.scale, tile, overlap)
    return _to_image(out[..., : height * loaded.scale, : width * loaded.scale])


def check_upscaler(name: str, directory: str | os.PathLike | None = None) -> None:
    """Raise UpscalerError unless `name` can be used: a built-in or registered upscaler, or a model file in
    `directory` that loads (it is then cached for the upscale that follows)."""
    if name in BUILTIN_UPSCALERS or name in _CUSTOM:
        return
    paths = dict(_model_files(directory))
    if name not in paths:
        hint = " (a latent mode: it upscales latents, only in hires fix)" if name in LATENT_UPSCALERS else ""
        raise UpscalerError(f"unknown upscaler {name!r}{hint}; available: {', '.join(upscaler_names(directory))}")
    load_upscaler(paths[name])


def upscale(image: Image.Image, name: str, scale: float, directory: str | os.PathLike | None = None, *,
            device: torch.device | str | None = None) -> Image.Image:
    """`image` upscaled by the upscaler `name` (any name list_upscalers(directory) gives) to exactly
    round(w·scale) x round(h·scale); see upscale_to."""
    if not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise UpscalerError(f"the upscale factor must be a positive number, got {scale!r}")
    return upscale_to(image, name, target_size(image.size, scale), directory, device=device)


def upscale_to(image: Image.Image, name: str, size: tuple[int, int], directory: str | os.PathLike | None = None, *,
               device: torch.device | str | None = None) -> Image.Image:
    """`image` brought to exactly `size` (width, height) by the upscaler `name`.

    Built-ins resize directly. A model upscaler is applied until the image is at least `size` (at most MAX_PASSES
    times, and once when `size` is the image's own size: the x1 restoration models), then resized to `size` with
    Lanczos, as A1111's Upscaler.upscale does."""
    if name in BUILTIN_UPSCALERS:
        return resize(image, size, name)
    if name in _CUSTOM:
        return resize(_CUSTOM[name].function(image, size[0] / image.width), size, "Lanczos")
    check_upscaler(name, directory)
    loaded = load_upscaler(dict(_model_files(directory))[name])
    same_size = image.size == size
    image = image.convert("RGB")
    for done in range(MAX_PASSES):
        if image.width >= size[0] and image.height >= size[1] and (done or not same_size):
            break
        image = run_model(loaded, image, device)
    return resize(image, size, "Lanczos")
