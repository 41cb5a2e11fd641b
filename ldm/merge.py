"""Checkpoint merger (A1111's "Checkpoint Merger" tab): combines checkpoints key by key in their original key space.

    Weighted sum      A·(1−M) + B·M
    Add difference    A + (B − C)·M      (C is the model B was fine-tuned from: adds B's change to A)
    No interpolation  A                  (re-save: fp16, baked-in VAE)

    merge_checkpoints("a.safetensors", "b.safetensors", mode="Weighted sum", multiplier=0.3, out="ab.safetensors")
    python -m ldm.merge a.safetensors b.safetensors --mode "Weighted sum" --multiplier 0.3 --out ab.safetensors

The inputs are read one tensor at a time and the output is written as each tensor is merged (ldm.checkpoint's
TensorFile / save_streamed), so peak memory stays near the size of one tensor of each input, not one model per input.
The result carries A1111's `sd_merge_recipe` / `sd_merge_models` metadata.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm import tqdm

from . import DERIVED_SCHEDULE_KEYS
from .checkpoint import CheckpointError, TensorFile, legacy_model_hash, model_hash, save_streamed

# Keys of the networks themselves; anything else (schedule buffers, EMA copies) is not merged.
MODEL_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner.")
_EMA_PREFIX = "model_ema."
# The UNet's input convolution: 4 latent channels, 9 in inpainting models (+ mask + masked-image latent).
_LATENT_CHANNELS, _INPAINT_CHANNELS = 4, 9


class MergeError(ValueError):
    """The checkpoints cannot be merged as asked; the message names the key and what to change."""


@dataclass(frozen=True)
class MergeMethod:
    """One interpolation method: `models` is how many checkpoints it reads (A; A, B; or A, B, C) and
    `combine(a, b, c, m)` one key's result from float32 tensors of the same shape (c None for two models; unused
    for one model, whose result is A)."""
    models: int
    combine: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, float], torch.Tensor] | None = None


# A1111's methods under its names (also accepted lower-case, or with - or _ for spaces). Extend with
# register_merge_method (e.g. in a web UI --extension file); the command and POST /sdapi/v1/merge accept it.
MERGE_METHODS: dict[str, MergeMethod] = {
    "No interpolation": MergeMethod(1),
    "Weighted sum": MergeMethod(2, lambda a, b, c, m: a * (1 - m) + b * m),
    "Add difference": MergeMethod(3, lambda a, b, c, m: a + (b - c) * m),
}


def register_merge_method(name: str, models: int, combine) -> None:
    """Adds an interpolation method, e.g. register_merge_method("Sigmoid", 2, lambda a, b, c, m: ...)."""
    if name in MERGE_METHODS:
        raise ValueError(f"merge method {name!r} exists; choose another name")
    if models not in (2, 3):
        raise ValueError(f"a merge method combines 2 or 3 models, got {models}")
    MERGE_METHODS[name] = MergeMethod(models, combine)


@dataclass(frozen=True)
class MergeResult:
    path: str
    sha256: str
    model_hash: str  # what an image made with the result carries as "Model hash: …" (first 10 hex of sha256)
    recipe: dict  # the sd_merge_recipe written into the file
    is_inpainting: bool


def resolve_mode(name: str) -> str:
    for mode in MERGE_METHODS:
        if name.lower() in (mode.lower(), mode.lower().replace(" ", "-"), mode.lower().replace(" ", "_")):
            return mode
    raise MergeError(f"unknown merge mode {name!r}; valid: {', '.join(MERGE_METHODS)}")


def merged_name(mode: str, multiplier: float, a: str, b: str | None = None, c: str | None = None) -> str:
    """A1111's default name for a merge of models named a, b, c: "0.7(a) + 0.3(b)", "a + 0.3(b - c)" or "a"."""
    m = round(multiplier, 2)
    if mode == "Weighted sum":
        return f"{round(1 - multiplier, 2)}({a}) + {m}({b})"
    if c is not None:
        return f"{a} + {m}({b} - {c})" if mode == "Add difference" else f"{a} {mode} {m}({b}, {c})"
    return a if b is None else f"{a} {mode} {m}({b})"


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _network_keys(file: TensorFile) -> list[str]:
    return [key for key in file.keys() if key.startswith(MODEL_PREFIXES) and key not in DERIVED_SCHEDULE_KEYS
            and file.dtype(key).is_floating_point]


def _check_same_architecture(first: TensorFile, second: TensorFile, first_name: str, second_name: str,
                             allow_inpainting: bool) -> bool:
    """Raises MergeError at the first key that `second` lacks, has extra, or shapes differently; returns whether
    `first` is an inpainting model merged with a normal one (the one difference allowed, when allow_inpainting)."""
    inpainting = False
    for key in _network_keys(first):
        if key not in second:
            raise MergeError(f"{first_name} and {second_name} are different architectures: {second_name} "
                             f"({second.path}) has no {key!r}, which {first_name} has")
        a, b = first.shape(key), second.shape(key)
        if a == b:
            continue
        input_conv = len(a) == 4 and len(b) == 4 and a[:1] + a[2:] == b[:1] + b[2:]
        if allow_inpainting and input_conv and (a[1], b[1]) == (_INPAINT_CHANNELS, _LATENT_CHANNELS):
            inpainting = True
            continue
        hint = ""
        if allow_inpainting and input_conv and (a[1], b[1]) == (_LATENT_CHANNELS, _INPAINT_CHANNELS):
            hint = "; to merge an inpainting model with a normal one, make the inpainting model A"
        raise MergeError(f"{first_name} and {second_name} are different architectures: {key!r} is {list(a)} in "
                         f"{first_name} but {list(b)} in {second_name}{hint}")
    extra = next((key for key in _network_keys(second) if key not in first), None)
    if extra:
        raise MergeError(f"{first_name} and {second_name} are different architectures: {second_name} "
                         f"({second.path}) has {extra!r}, which {first_name} lacks")
    return inpainting


def _vae_layout(vae: TensorFile, a: TensorFile) -> dict[str, str]:
    """A's first_stage_model.* key -> the VAE file's key that replaces it. A VAE file holds bare `encoder.*` keys
    (A1111's VAE folder) or a whole checkpoint's `first_stage_model.*` ones."""
    mapping = {}
    for key in vae.keys():
        target = key if key.startswith("first_stage_model.") else "first_stage_model." + key
        if target not in a or not vae.dtype(key).is_floating_point:
            continue
        if vae.shape(key) != a.shape(target):
            raise MergeError(f"the VAE {vae.path} does not fit A: {key!r} is {list(vae.shape(key))}, A's "
                             f"{target!r} is {list(a.shape(target))}")
        mapping[target] = key
    if not mapping:
        raise MergeError(f"{vae.path} has no VAE weights for A (expected encoder.*/decoder.* keys)")
    return mapping


def merge_checkpoints(a: str, b: str | None = None, c: str | None = None, *, out: str,
                      mode: str = "Weighted sum", multiplier: float = 0.3, fp16: bool = False,
                      vae: str | None = None, progress=None) -> MergeResult:
    """Merges checkpoint files `a`, `b` (and `c` for Add difference) into the .safetensors file `out` (written
    atomically: a failed merge leaves no half file), in the original key names, and returns what was written.

    Network weights (UNet, VAE, text encoders) are merged; A's other tensors (schedule buffers, position ids) are
    copied; EMA weights (model_ema.*) are left out, since an EMA of A alone is not the merge's. An inpainting A with
    a normal B (and C) is merged over the first 4 input channels of its 9-channel input convolution, as A1111 does.
    `vae` replaces A's first_stage_model.* with a VAE file's weights after merging. `fp16` saves floating tensors as
    float16. `progress(done, total)` is called after each tensor.
    """
    mode = resolve_mode(mode)
    if isinstance(multiplier, bool) or not isinstance(multiplier, (int, float)) or multiplier != multiplier:
        raise MergeError(f"multiplier must be a number, got {multiplier!r}")
    needs = ("B", "C")[:MERGE_METHODS[mode].models - 1]
    given = {"B": b, "C": c}
    missing = [name for name in needs if not given[name]]
    if missing:
        raise MergeError(f"{mode} needs model {' and '.join(missing)} (A, B{', C' if 'C' in needs else ''})")
    paths = {"A": a, **{name: given[name] for name in needs}, **({"VAE": vae} if vae else {})}
    for name, path in paths.items():
        if not os.path.isfile(path):
            raise FileNotFoundError(f"model {name}: file not found: {path}")
    if os.path.abspath(out) in {os.path.abspath(path) for path in paths.values()}:
        raise MergeError(f"the output {out} is one of the inputs; choose a new file name")
    if not out.endswith(".safetensors"):
        raise MergeError(f"the output must be a .safetensors file, got {out}")

    with contextlib.ExitStack() as stack:  # every opened file is closed, also when a later one fails to open
        files = {name: stack.enter_context(TensorFile(path)) for name, path in paths.items()}
        return _merge(files, out, mode, float(multiplier), fp16, progress)


def _merge(files: dict[str, TensorFile], out: str, mode: str, multiplier: float, fp16: bool,
           progress) -> MergeResult:
    a, b, c = files["A"], files.get("B"), files.get("C")
    inpainting = False
    if b is not None:
        inpainting = _check_same_architecture(a, b, "A", "B", allow_inpainting=True)
    if c is not None:
        _check_same_architecture(b, c, "B", "C", allow_inpainting=False)
    vae_keys = _vae_layout(files["VAE"], a) if "VAE" in files else {}

    merged = set(_network_keys(a)) if b is not None else set()
    keys = [key for key in a.keys() if not key.startswith(_EMA_PREFIX)]

    def output_dtype(key: str) -> torch.dtype:
        dtype = a.dtype(key)
        return torch.float16 if fp16 and dtype.is_floating_point else dtype

    layout = {key: torch.empty(a.shape(key), dtype=output_dtype(key), device="meta") for key in keys}
    done = 0

    def tensor_for(key: str) -> torch.Tensor:
        nonlocal done
        if key in vae_keys:
            tensor = files["VAE"].read(vae_keys[key])
        elif key in merged:
            tensor = _merge_tensor(a.read(key), b.read(key), c.read(key) if c is not None else None, mode,
                                   multiplier)
        else:
            tensor = a.read(key)
        done += 1
        if progress:
            progress(done, len(keys))
        return tensor.to(layout[key].dtype)

    recipe = {
        "type": "webui",  # A1111's mark for its built-in merger, which this one follows
        "primary_model_hash": _file_sha256(a.path),
        "secondary_model_hash": _file_sha256(b.path) if b is not None else None,
        "tertiary_model_hash": _file_sha256(c.path) if c is not None else None,
        "interp_method": mode, "multiplier": multiplier, "save_as_half": fp16,
        "custom_name": os.path.splitext(os.path.basename(out))[0], "config_source": 0,
        "bake_in_vae": os.path.basename(files["VAE"].path) if "VAE" in files else "None",
        "discard_weights": "", "is_inpainting": inpainting, "is_instruct_pix2pix": False,
    }
    models = {}
    for name, file in files.items():
        if name == "VAE":
            continue
        sha256 = recipe[{"A": "primary", "B": "secondary", "C": "tertiary"}[name] + "_model_hash"]
        models[sha256] = {"name": os.path.basename(file.path), "legacy_hash": legacy_model_hash(file.path),
                          "sd_merge_recipe": file.metadata.get("sd_merge_recipe")}
    # A's own facts (ldm.* prediction, resolution, head layout) describe the result, whose architecture is A's.
    metadata = {key: value for key, value in a.metadata.items()
                if key not in ("ldm.name", "sd_merge_recipe", "sd_merge_models")}
    metadata.update({"format": "pt", "sd_merge_recipe": json.dumps(recipe), "sd_merge_models": json.dumps(models)})
    save_streamed(layout, tensor_for, out, metadata)
    sha256 = _file_sha256(out)
    return MergeResult(path=out, sha256=sha256, model_hash=model_hash(out), recipe=recipe, is_inpainting=inpainting)


def _merge_tensor(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor | None, mode: str,
                  multiplier: float) -> torch.Tensor:
    """One key's merge in (at least) float32; an inpainting A's input conv [O, 9, k, k] merges its first 4 input
    channels with B's [O, 4, k, k] and keeps the mask and masked-image channels."""
    compute = torch.promote_types(a.dtype, torch.float32)
    result = a.to(compute)
    target = result[:, :_LATENT_CHANNELS] if a.shape != b.shape else result
    c = c.to(compute) if c is not None else None
    target.copy_(MERGE_METHODS[mode].combine(target, b.to(compute), c, multiplier))
    return result


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (exit status 2), not the whole usage text; the ldm commands'
    parser (ldm.merge, ldm.assemble)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(
        prog="python -m ldm.merge",
        description="Checkpoint Merger: merge Stable Diffusion checkpoints into a new .safetensors file.")
    parser.add_argument("a", metavar="A", help="primary model (the result has its architecture)")
    parser.add_argument("b", metavar="B", nargs="?", help="secondary model")
    parser.add_argument("c", metavar="C", nargs="?", help="tertiary model (Add difference: B's base model)")
    parser.add_argument("--mode", default="Weighted sum",
                        help="Interpolation Method: 'Weighted sum' A*(1-M)+B*M (default), 'Add difference' "
                             "A+(B-C)*M, or 'No interpolation' (copy A); more with ldm.merge.register_merge_method")
    parser.add_argument("--multiplier", type=float, default=0.3, help="Multiplier (M) (default 0.3)")
    parser.add_argument("--fp16", action="store_true", help="Save as float16")
    parser.add_argument("--bake-vae", metavar="VAE", help="Bake in VAE: a VAE file whose weights replace A's")
    parser.add_argument("--out", required=True, metavar="FILE.safetensors", help="the merged model's file")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    bars = []  # the bar starts with the first merged tensor, so a refused merge prints only its error

    def progress(done: int, total: int) -> None:
        if not bars:
            bars.append(tqdm(desc="Merging", unit="tensor", total=total, file=sys.stderr))
        bars[0].update(done - bars[0].n)

    try:
        result = merge_checkpoints(args.a, args.b, args.c, out=args.out, mode=args.mode,
                                   multiplier=args.multiplier, fp16=args.fp16, vae=args.bake_vae, progress=progress)
    except (MergeError, CheckpointError, FileNotFoundError) as error:
        # One line, no traceback: each of these messages says what to change.
        for bar in bars:
            bar.close()
        print(f"{parser.prog}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    for bar in bars:
        bar.close()
    print(f"{result.path} [{result.model_hash}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
