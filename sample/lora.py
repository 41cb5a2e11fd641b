"""kohya-format LoRA files applied for one generation job, as A1111's `<lora:name:weight>` does.

A LoRA (Hu et al. 2021) stores, per adapted layer with weight W [out, in(, k, k)]:

    <layer>.lora_down.weight  [rank, in(, k, k)]     <layer>.lora_up.weight  [out, rank(, 1, 1)]
    <layer>.alpha             scalar (absent: alpha = rank)
    <layer>.lora_mid.weight   [rank, rank, k, k]     (LoCon's CP-decomposed convolutions only)

and the layer becomes W + multiplier · (alpha / rank) · up @ down. Layer names are the module path with `_` for `.`:

    lora_unet_<path>   UNet; CompVis paths (input_blocks_1_1_...) as SDXL LoRAs use, or diffusers paths
                       (down_blocks_0_attentions_0_...) as kohya writes for SD1/SD2, translated here
    lora_te_<path>     SD1/SD2 text encoder, transformers names (text_model_encoder_layers_0_self_attn_q_proj)
    lora_te1_/te2_     SDXL's CLIP-L / OpenCLIP-bigG

A file may also bundle textual-inversion embeddings (pivotal tuning: the new word's vectors trained with the
adapters), under A1111's keys `bundle_emb.<word>.<key of the embedding file>` (`emb_params`, `string_to_param.*`, or
SDXL's `clip_l` / `clip_g`). They come with the LoRA: a prompt naming the LoRA can use the word.

OpenCLIP towers (SD2, SDXL's bigG) keep q, k, v in one packed `in_proj_weight` [3W, W]: a q/k/v LoRA updates its
third of that matrix.

The update is merged into the weights for the duration of the job and undone afterwards (`applied`): the model's
original weight tensors are never written to — each adapted layer gets a new tensor W + ΔW and the original tensor
object is put back at the end, so restoring is exact and cannot drift. Merging (rather than adding up(down(x)) in a
forward hook) keeps sampling as fast as without LoRA: the extra cost is paid once per job, not at every step.
`merge` keeps the update for good and `save_merged` writes a merged checkpoint file, both with the same arithmetic
as `applied`, so a merged file and a LoRA applied at load time give bitwise the same weights.
"""
import contextlib
import functools
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

import ldm
from ldm.checkpoint import read_state_dict

from .embeddings import Embedding, EmbeddingDatabase, EmbeddingError, vectors_from
from .models import BUILTIN_LORAS

LORA_EXTENSIONS = (".safetensors", ".pt", ".ckpt")
# Keys of the textual-inversion embeddings a LoRA file bundles (A1111's name).
BUNDLE_PREFIX = "bundle_emb."
_PARTS = ("lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha")


class LoraError(ValueError):
    """A LoRA file that cannot be read or does not fit the model."""


@dataclass(eq=False)
class Lora:
    """One LoRA file: tensors grouped by layer name, e.g. {"lora_unet_...": {"lora_down.weight": ..., ...}}, and the
    embeddings bundled with it."""
    name: str
    layers: dict[str, dict[str, torch.Tensor]]
    path: str | None = None
    embeddings: tuple[Embedding, ...] = ()

    @functools.cached_property
    def shorthash(self) -> str | None:
        """A1111's "Lora hashes" entry: first 12 hex digits of kohya's hash (sha256 of a .safetensors file's bytes
        after its header; of the whole file for other formats)."""
        if self.path is None:
            return None
        digest = hashlib.sha256()
        with open(self.path, "rb") as file:
            if self.path.lower().endswith(".safetensors"):
                header_length = int.from_bytes(file.read(8), "little")
                file.seek(8 + header_length)
            for block in iter(lambda: file.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()[:12]


def load_lora(path: str | os.PathLike) -> Lora:
    """Read a kohya LoRA file. Keys of other adapter types (LoHa, LoKr, DoRA scales, ...) raise LoraError.

    The last few files read are kept, each until the file changes (inode, size or modification time): every job that names a
    LoRA loads it, and the web UI's live mode runs one job per prompt edit, where reading and hashing the file again
    would add tens of milliseconds to each image. Callers must not modify the returned Lora."""
    path = os.fspath(path)
    try:
        stat = os.stat(path)
    except OSError as error:
        raise LoraError(f"{path}: cannot be read as a LoRA ({error.strerror or error})") from None
    return _read_lora(path, stat.st_ino, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)
def _read_lora(path: str, inode: int, mtime_ns: int, size: int) -> Lora:
    """load_lora's reader. The file's inode, modification time and size are part of the key, so a file changed since
    it was read is read anew."""
    try:
        state = load_file(path) if path.lower().endswith(".safetensors") else read_state_dict(path)
    except Exception as error:  # any reader failure is reported with the file name
        raise LoraError(f"{path}: cannot be read as a LoRA ({error})") from None
    layers: dict[str, dict[str, torch.Tensor]] = {}
    bundled: dict[str, dict] = {}
    unknown = []
    for key, tensor in state.items():
        if key.startswith(BUNDLE_PREFIX):
            word, _, inner = key[len(BUNDLE_PREFIX):].partition(".")
            if not word or not inner:
                raise LoraError(f"{path}: bundled embedding key {key} is not {BUNDLE_PREFIX}<word>.<tensor name>")
            outer, _, sub = inner.partition(".")
            # string_to_param.* is the nested dict of A1111's .pt embeddings, flattened by the bundle's key.
            entry = bundled.setdefault(word, {})
            if outer == "string_to_param" and sub:
                entry.setdefault(outer, {})[sub] = tensor
            else:
                entry[inner] = tensor
            continue
        part = next((p for p in _PARTS if key.endswith("." + p)), None)
        if part is None:
            unknown.append(key)
            continue
        layers.setdefault(key[:-len(part) - 1], {})[part] = tensor
    if unknown:
        raise LoraError(f"{path}: {len(unknown)} keys are not kohya LoRA tensors (e.g. {unknown[0]}); only "
                        "lora_down / lora_up / lora_mid / alpha are supported (LoHa, LoKr, DoRA are not)")
    incomplete = [name for name, parts in layers.items() if not {"lora_down.weight", "lora_up.weight"} <= parts.keys()]
    if incomplete:
        raise LoraError(f"{path}: layer {incomplete[0]} lacks its lora_down or lora_up weight")
    try:
        embeddings = tuple(Embedding(word, vectors_from(data, f"{path} ({BUNDLE_PREFIX}{word})"))
                           for word, data in bundled.items())
    except EmbeddingError as error:
        raise LoraError(str(error)) from None
    return Lora(Path(path).stem, layers, path, embeddings)


def with_bundled_embeddings(database: EmbeddingDatabase | None, loras: list[tuple[Lora, float, float]],
                            tokenizer=None) -> tuple[EmbeddingDatabase | None, list[str]]:
    """(`database` plus the embeddings the `loras` bundle, a note per bundled one left out). As in A1111, a name the
    database already has (the embeddings folder's, or an earlier LoRA's) wins. Without bundled embeddings `database`
    comes back as it is (None stays None); a new database uses `tokenizer` (default: the CLIP tokenizer)."""
    notes = []
    for lora, _, _ in loras:
        if not lora.embeddings:
            continue
        if database is None:
            database = EmbeddingDatabase((), tokenizer)
        added = [e for e in lora.embeddings if e.name not in database.embeddings]
        notes += [f"embedding {e.name} bundled in LoRA {lora.name} skipped: one of that name is already loaded (the "
                  "embeddings folder's or an earlier LoRA's)" for e in lora.embeddings if e.name in database.embeddings]
        if added:
            database = EmbeddingDatabase([*database.embeddings.values(), *added], database.tokenizer)
    return database, notes


def lora_files(directory: str | os.PathLike | None) -> list[tuple[str, str]]:
    """(name, path) of every LoRA a prompt can name, in the order `<lora:name:...>` searches them: the files under
    the user's LoRA folder `directory` (recursively, sorted; None: no folder), then the package's built-in LoRAs
    (sample.models.BUILTIN_LORAS) whose names no user file takes. The one place that decides the search path."""
    found = []
    if directory is not None and os.path.isdir(directory):
        found = [(path.stem, str(path)) for path in sorted(Path(directory).rglob("*"))
                 if path.suffix.lower() in LORA_EXTENSIONS and path.is_file()]
    names = {name for name, _ in found}
    return found + [(name, path) for name, path in BUILTIN_LORAS.items() if name not in names]


def find_lora(directory: str | os.PathLike | None, name: str) -> str | None:
    """The file for `<lora:name:...>`: the first of lora_files(directory) of that name, or None."""
    return next((path for stem, path in lora_files(directory) if stem == name), None)


def lora_delta(parts: dict[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
    """alpha / rank · up @ down (through mid for CP-decomposed convolutions), float32, shaped like the weight."""
    down, up = parts["lora_down.weight"].float(), parts["lora_up.weight"].float()
    rank = down.shape[0]
    alpha = float(parts["alpha"]) if "alpha" in parts else rank
    if "lora_mid.weight" in parts:
        # delta[o, i, kh, kw] = sum_{r, s} up[o, r] mid[r, s, kh, kw] down[s, i]
        delta = torch.einsum("rskl,or,si->oikl", parts["lora_mid.weight"].float(), up.flatten(1), down.flatten(1))
    elif down.ndim == 4 and down.shape[2:] != (1, 1):
        delta = (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])
    else:
        delta = up.flatten(1) @ down.flatten(1)
    if delta.numel() != shape.numel():
        raise LoraError(f"update of shape {tuple(delta.shape)} does not fit a weight of shape {tuple(shape)}")
    return delta.reshape(shape) * (alpha / rank)


# ---------------------------------------------------------------------------------------------------------------------
# Names: kohya layer name -> (module, rows of its weight). train.lora writes with the same three helpers.
# ---------------------------------------------------------------------------------------------------------------------

UNET_PREFIX = "lora_unet_"


def text_tower_prefixes(model) -> dict[str, nn.Module]:
    """kohya's name prefix of each text tower: lora_te_ for SD1/SD2's one, lora_te1_ / lora_te2_ for SDXL's two."""
    if model.is_sdxl:
        return {"lora_te1_": model.conditioner.embedders[0], "lora_te2_": model.conditioner.embedders[1]}
    return {"lora_te_": model.cond_stage_model}


def layer_name(prefix: str, module_path: str) -> str:
    """kohya's layer name: the prefix, then the module path with `_` for `.` (input_blocks.1.1.proj_in ->
    lora_unet_input_blocks_1_1_proj_in)."""
    return prefix + module_path.replace(".", "_")


_RESNET_PARTS = {"norm1": "in_layers_0", "conv1": "in_layers_2", "time_emb_proj": "emb_layers_1",
                 "norm2": "out_layers_0", "conv2": "out_layers_3", "conv_shortcut": "skip_connection"}
_UNET_TOP = {"conv_in": "input_blocks_0_0", "conv_norm_out": "out_0", "conv_out": "out_2",
             "time_embedding_linear_1": "time_embed_0", "time_embedding_linear_2": "time_embed_2",
             "add_embedding_linear_1": "label_emb_0_0", "add_embedding_linear_2": "label_emb_0_2"}


def _diffusers_to_compvis(name: str, blocks_per_level: int) -> list[str]:
    """Candidate CompVis paths (with `_`) for a diffusers UNet path; blocks_per_level = num_res_blocks + 1."""
    if name in _UNET_TOP:
        return [_UNET_TOP[name]]

    def resnet(tail: str) -> str:
        for part, compvis in _RESNET_PARTS.items():
            if tail == part:
                return compvis
        return tail

    if m := re.fullmatch(r"down_blocks_(\d+)_(resnets|attentions)_(\d+)_(.+)", name):
        level, kind, j, tail = int(m[1]), m[2], int(m[3]), m[4]
        index = 1 + level * blocks_per_level + j
        return [f"input_blocks_{index}_0_{resnet(tail)}" if kind == "resnets" else f"input_blocks_{index}_1_{tail}"]
    if m := re.fullmatch(r"down_blocks_(\d+)_downsamplers_0_conv", name):
        return [f"input_blocks_{(int(m[1]) + 1) * blocks_per_level}_0_op"]
    if m := re.fullmatch(r"mid_block_resnets_(\d+)_(.+)", name):
        return [f"middle_block_{2 * int(m[1])}_{resnet(m[2])}"]
    if m := re.fullmatch(r"mid_block_attentions_0_(.+)", name):
        return [f"middle_block_1_{m[1]}"]
    if m := re.fullmatch(r"up_blocks_(\d+)_(resnets|attentions)_(\d+)_(.+)", name):
        level, kind, j, tail = int(m[1]), m[2], int(m[3]), m[4]
        index = level * blocks_per_level + j
        return [f"output_blocks_{index}_0_{resnet(tail)}" if kind == "resnets" else f"output_blocks_{index}_1_{tail}"]
    if m := re.fullmatch(r"up_blocks_(\d+)_upsamplers_0_conv", name):
        index = int(m[1]) * blocks_per_level + blocks_per_level - 1
        # The upsampler follows the ResBlock, and the transformer when the level has one.
        return [f"output_blocks_{index}_2_conv", f"output_blocks_{index}_1_conv"]
    return []


_HF_TO_OPENCLIP = [
    (re.compile(r"text_model_encoder_layers_(\d+)_self_attn_([qkv])_proj"), "model_transformer_resblocks_{}_attn"),
    (re.compile(r"text_model_encoder_layers_(\d+)_self_attn_out_proj"), "model_transformer_resblocks_{}_attn_out_proj"),
    (re.compile(r"text_model_encoder_layers_(\d+)_mlp_fc1"), "model_transformer_resblocks_{}_mlp_c_fc"),
    (re.compile(r"text_model_encoder_layers_(\d+)_mlp_fc2"), "model_transformer_resblocks_{}_mlp_c_proj"),
]


@dataclass
class _Target:
    """The weight a LoRA layer updates: `module.<attribute>`, rows [row_start, row_end) of it (None: all)."""
    module: nn.Module
    attribute: str = "weight"
    rows: tuple[int, int] | None = None


class LayerIndex:
    """Resolves kohya layer names to the model's modules (built once per model)."""

    def __init__(self, model):
        unet = model.unet
        self.blocks_per_level = model.preset.unet.num_res_blocks + 1
        self.unet = {layer_name("", n): m for n, m in unet.named_modules() if n}
        self.towers = {prefix: {layer_name("", n): m for n, m in tower.named_modules() if n}
                       for prefix, tower in text_tower_prefixes(model).items()}

    def resolve(self, name: str) -> _Target | None:
        if name.startswith(UNET_PREFIX):
            rest = name[len(UNET_PREFIX):]
            for candidate in [rest, *_diffusers_to_compvis(rest, self.blocks_per_level)]:
                if candidate in self.unet:
                    return _Target(self.unet[candidate])
            return None
        for prefix, modules in self.towers.items():
            if not name.startswith(prefix):
                continue
            rest = name[len(prefix):]
            if "transformer_" + rest in modules:  # CLIP in the transformers layout
                return _Target(modules["transformer_" + rest])
            if rest in modules:  # already an OpenCLIP path
                return _Target(modules[rest])
            for pattern, template in _HF_TO_OPENCLIP:
                if m := pattern.fullmatch(rest):
                    module = modules.get(template.format(m[1]))
                    if module is None:
                        return None
                    if template.endswith("_attn"):  # q/k/v: a third of the packed in_proj_weight
                        width = module.in_proj_weight.shape[1]
                        third = "qkv".index(m[2])
                        return _Target(module, "in_proj_weight", (third * width, (third + 1) * width))
                    return _Target(module)
        return None


def _deltas(model, loras: list[tuple[Lora, float, float]], index: LayerIndex | None,
            messages: list[str]) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """(parameter, float32 update of its whole weight) per adapted weight; several LoRAs on one weight add up.
    Layers no module matches are reported in `messages`."""
    index = index or LayerIndex(model)
    deltas: dict[tuple[int, str], tuple[nn.Parameter, torch.Tensor]] = {}
    for lora, te_multiplier, unet_multiplier in loras:
        unmatched = []
        for name, parts in lora.layers.items():
            target = index.resolve(name)
            if target is None:
                unmatched.append(name)
                continue
            weight = getattr(target.module, target.attribute)
            rows = slice(*target.rows) if target.rows else slice(None)
            multiplier = unet_multiplier if name.startswith(UNET_PREFIX) else te_multiplier
            try:
                delta = lora_delta(parts, weight[rows].shape) * multiplier
            except LoraError as error:
                raise LoraError(f"LoRA {lora.name!r}, layer {name}: {error}") from None
            key = (id(target.module), target.attribute)
            if key not in deltas:
                deltas[key] = (weight, torch.zeros(weight.shape, dtype=torch.float32, device=weight.device))
            deltas[key][1][rows] += delta.to(weight.device)
        if unmatched:
            messages.append(f"LoRA {lora.name!r}: {len(unmatched)} of {len(lora.layers)} layers match nothing in "
                            f"this model (e.g. {unmatched[0]}); is it made for another model family?")
    return list(deltas.values())


@contextlib.contextmanager
def applied(model, loras: list[tuple[Lora, float, float]], index: LayerIndex | None = None):
    """Merge LoRAs into the model for the duration of the `with` block; yields a list of messages for the user.

    loras: (Lora, text-encoder multiplier, UNet multiplier). Layers no module matches are skipped, with a message.
    Each adapted weight becomes (W.float() + ΔW).to(W.dtype) in a new tensor; on exit the original tensor objects
    are put back, so the model is bitwise what it was (even after an exception inside the block).

        with applied(loaded.model, [(load_lora("heart.safetensors"), 1.0, 1.0)]) as messages:
            images = generate(loaded, params).images
    """
    messages: list[str] = []
    originals = []
    try:
        for parameter, delta in _deltas(model, loras, index, messages):
            originals.append((parameter, parameter.data))
            parameter.data = _merged(parameter, delta)
        yield messages
    finally:
        for parameter, original in originals:
            parameter.data = original


def merge(model, loras: list[tuple[Lora, float, float]]) -> list[str]:
    """Merge LoRAs into the model for good (the weights `applied` uses inside its block); returns its messages."""
    messages: list[str] = []
    for parameter, delta in _deltas(model, loras, None, messages):
        parameter.data = _merged(parameter, delta)
    return messages


def _merged(parameter: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """(W.float() + ΔW).to(W.dtype) as an ordinary tensor even when the caller runs generate under
    torch.inference_mode (as benchmarks and notebooks do): a parameter whose data became an inference tensor changes
    its dispatch keys, which torch.compile guards on, so every compiled function would recompile at the first job
    with a LoRA, once per shape."""
    with torch.inference_mode(False):
        return (parameter.data.float() + delta).to(parameter.dtype)


def save_merged(model, loras: list[tuple[Lora, float, float]], path: str | os.PathLike,
                dtype: torch.dtype | None = None, name: str | None = None) -> None:
    """Write the model with the LoRAs merged as a checkpoint file (`ldm.save_model`: .safetensors, atomically);
    the loaded model itself is left as it was. A LoRA layer that matches nothing raises LoraError: a merged file
    silently missing part of the LoRA would be mistaken for the fine-tune."""
    with applied(model, loras) as messages:
        if messages:
            raise LoraError(f"not written: {messages[0]}")
        ldm.save_model(model, path, dtype=dtype, name=name)
