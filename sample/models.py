"""Models for generation: a loaded model with the name and hash its infotext records, the embedded default
model, the LoRAs shipped beside it, named generation presets (a model, LoRAs and sampler settings under one name),
and VAE override files."""
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import ldm
from ldm.checkpoint import CheckpointError, read_metadata, read_state_dict
from ldm.model import LatentDiffusion
from ldm.unet import UNetModel
from ldm.vae import AutoencoderKL
from samplers import SAMPLERS, SCHEDULERS

from .prompts import extract_extra_networks

# The embedded default model (docs/SHAPES.md), shipped inside the ldm package, and the files shipped beside it.
DATA_DIR = Path(ldm.__file__).parent / "data"
DEFAULT_MODEL = DATA_DIR / "tiny-shapes.safetensors"


@dataclass(eq=False)
class LoadedModel:
    """A model plus what A1111 writes about it: `name` ("Model: ...", the file name without extension, or the name
    a training run stored in the file's "ldm.name" metadata) and `hash`
    ("Model hash: ...", 10 hex digits of the file's sha256; None for weights not read from a file)."""
    model: LatentDiffusion
    name: str
    hash: str | None = None
    path: str | None = None


def generation_dtype(device: torch.device) -> torch.dtype:
    """The weights' dtype for generation when the user asks for none ("auto" precision): float16 on a GPU, float32
    on the CPU (see load_checkpoint for why not half precision there)."""
    return torch.float16 if device.type == "cuda" else torch.float32


def load_checkpoint(path: str | os.PathLike, device: str | torch.device | None = None,
                    dtype: torch.dtype | None = None) -> LoadedModel:
    """Load a Stable Diffusion checkpoint file (any family) for generation. Without `dtype`, the file's precision is
    kept on a GPU, while on a CPU an fp16/bf16 file is loaded in fp32: PyTorch's CPU kernels are slow or missing in
    half precision (an fp16 shapes model sampled 7.8 s per image against 0.7 s in fp32), which is also why A1111 runs
    `--no-half` on a CPU."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model file not found: {path}")
    if dtype is None and torch.device(device or "cpu").type == "cpu":
        dtype = torch.float32
    model = ldm.load_model(path, device=device, dtype=dtype)
    name = read_metadata(path).get("ldm.name") or Path(path).stem
    return LoadedModel(model, name, ldm.model_hash(path), path)


def default_model(device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> LoadedModel:
    """The model used when none is given: the one place that decides what "the default model" is.

    It is the embedded tiny-shapes model, a Stable Diffusion 1.x-style model in miniature trained from scratch on the
    synthetic shapes domain (train.shapes): 64×64 images of one or two coloured shapes ("a red circle", "a small blue
    square on the left", "a green triangle above a yellow star"). The file is fp16; on a CPU it is loaded in fp32
    unless `dtype` says otherwise (load_checkpoint).
    """
    if not DEFAULT_MODEL.is_file():
        raise FileNotFoundError(f"the embedded default model {DEFAULT_MODEL} is missing; reinstall the package "
                                "(pip install -e .) or give a model file")
    return load_checkpoint(DEFAULT_MODEL, device, dtype)


def untrained_model(device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> LoadedModel:
    """A deliberately bad model, the floor of an evaluation: the default model's VAE and text encoder with its UNet
    as a training run starts it (the architecture's own initialisation, drawn from seed 0; SD's zero-initialised
    output layers make it predict a constant, so every image is the VAE's decoding of the initial noise, whatever
    the prompt). The same seed gives the same weights; torch's global RNG state is left as it was."""
    loaded = default_model(device, dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        fresh = UNetModel(**asdict(loaded.model.preset.unet))
    loaded.model.unet.load_state_dict(fresh.state_dict())
    return LoadedModel(loaded.model, "untrained")


# The bases a model spec may name instead of a file.
BUILTIN_MODELS = {"default": default_model, "untrained": untrained_model}


def load_vae(path: str | os.PathLike, model: LatentDiffusion) -> AutoencoderKL:
    """A VAE file (A1111's "SD VAE": bare `encoder.*`/`decoder.*` keys, or under `first_stage_model.`) as an
    AutoencoderKL with the architecture, device and dtype of `model`'s own. Training-only keys (`loss.*`) are
    dropped."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"VAE file not found: {path}")
    state = read_state_dict(path)
    state = {k.removeprefix("first_stage_model."): v for k, v in state.items() if not k.startswith("loss.")}
    vae = AutoencoderKL(**asdict(model.preset.vae))
    missing, unexpected = vae.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path} is not a VAE for this model: {len(missing)} missing keys "
                              f"(e.g. {missing[:1]}), {len(unexpected)} unexpected keys (e.g. {unexpected[:1]})")
    return vae.to(device=model.device, dtype=model.vae.dtype).eval()


@dataclass(frozen=True)
class ModelSpec:
    """A model named in one string, `BASE[+FILE[:STRENGTH]]...`, so a fine-tune is evaluated without merging by hand:

        outputs/base.safetensors+outputs/heart/heart.safetensors:0.8    the base with a LoRA merged at strength 0.8
        default+heart.safetensors+shiny.pt                              the default model, a LoRA, an embedding

    BASE is a checkpoint file or a name of BUILTIN_MODELS: "default" (the embedded model) or "untrained" (its UNet
    freshly initialised, `untrained_model`). Each FILE after a `+` is a kohya LoRA (merged into the weights, UNet
    and text encoder at STRENGTH, default 1; the embeddings it bundles come with it, unless an embedding FILE of the
    spec has the name) or a textual-inversion embedding (usable in prompts by its file name; takes no strength);
    which one is read off the file's keys. A FILE that is no file but the name of a built-in LoRA (BUILTIN_LORAS) is
    that LoRA: `default+tiny-shapes-lcm`."""
    base: str
    additions: tuple[tuple[str, float | None], ...] = ()

    def files(self) -> list[str]:
        """The files the spec reads, built-in LoRA names resolved to their files."""
        return ([] if self.base in BUILTIN_MODELS else [self.base]) + [_addition_file(path)
                                                                        for path, _ in self.additions]


def _addition_file(path: str) -> str:
    # A file of that name wins over a built-in LoRA, as a user's LoRA folder does in prompts (sample.lora.find_lora).
    return path if os.path.isfile(path) else BUILTIN_LORAS.get(path, path)


def parse_model_spec(text: str) -> ModelSpec:
    """`BASE[+FILE[:STRENGTH]]...` -> ModelSpec; a malformed spec raises ValueError saying what is expected."""
    base, *rest = [part.strip() for part in text.split("+")]
    if not base or not all(rest):
        raise ValueError(f"model spec {text!r}: expected BASE[+FILE[:STRENGTH]]... (e.g. "
                         "model.safetensors+lora.safetensors:0.8), with no empty part")
    additions = []
    for part in rest:
        path, separator, strength = part.rpartition(":")
        if separator:
            try:
                additions.append((path, float(strength)))
                continue
            except ValueError:
                pass  # a colon inside the path
        additions.append((part, None))
    return ModelSpec(base, tuple(additions))


def load_model_spec(spec: str | ModelSpec, device: str | torch.device | None = None,
                    dtype: torch.dtype | None = None):
    """(LoadedModel with the spec's LoRAs merged, EmbeddingDatabase of its embeddings or None). Pass the database
    to `sample.generate(..., embeddings=...)`. The weights equal those of `sample.lora.save_merged` bitwise. The
    loaded model's name lists the LoRAs (base+lora), so images' infotexts say what made them."""
    from .embeddings import EmbeddingDatabase, EmbeddingError, load_embedding
    from .lora import LoraError, load_lora, merge, with_bundled_embeddings

    spec = parse_model_spec(spec) if isinstance(spec, str) else spec
    missing = [path for path in spec.files() if not os.path.isfile(path)]
    if missing:
        raise FileNotFoundError(f"model spec: file not found: {', '.join(missing)}")
    loaded = (BUILTIN_MODELS[spec.base](device, dtype) if spec.base in BUILTIN_MODELS
              else load_checkpoint(spec.base, device, dtype))
    loras, embeddings = [], []
    for name, strength in spec.additions:
        path = _addition_file(name)
        try:
            lora = load_lora(path)
        except LoraError as lora_error:
            if strength is not None:
                raise ValueError(f"model spec: {path} is not a LoRA ({lora_error}); only LoRAs take a :STRENGTH")
            try:
                embeddings.append(load_embedding(path))
            except EmbeddingError as error:
                raise ValueError(f"model spec: {path} is neither a kohya LoRA nor an embedding ({error})") from None
            continue
        loras.append((lora, 1.0 if strength is None else strength, 1.0 if strength is None else strength))
    messages = merge(loaded.model, loras)
    if messages:
        raise ValueError(f"model spec: {messages[0]}")
    if loras:
        loaded.name = "+".join([loaded.name, *[lora.name for lora, _, _ in loras]])
    # An embedding file of the spec wins over one a LoRA bundles under the same name, as the embeddings folder does.
    database, notes = with_bundled_embeddings(EmbeddingDatabase(embeddings) if embeddings else None, loras)
    for note in notes:
        warnings.warn(note, stacklevel=2)
    return loaded, database


# ---------------------------------------------------------------------------------------------------------------------
# Built-in LoRAs and generation presets
# ---------------------------------------------------------------------------------------------------------------------

# LoRAs shipped with the package: name -> file. `<lora:NAME:w>` finds them in every entry point (generate(), the
# commands, the web UI's listing, model specs) after the user's own LoRA folder, where a file of the same name wins
# (sample.lora.lora_files is the one place that orders the two).
BUILTIN_LORAS: dict[str, str] = {}


def register_file(registry: dict[str, str], path: str | os.PathLike, kind: str) -> str:
    """Add a file to a name -> path registry of built-in files (BUILTIN_LORAS, BUILTIN_CONTROLNETS) under its name
    (the file name without extension, as in a model folder); returns the name. A missing file raises
    FileNotFoundError naming `kind`, so nothing is offered that cannot load."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{kind} file not found: {path}")
    registry[path.stem] = str(path)
    return path.stem


def register_lora(path: str | os.PathLike) -> str:
    """Offer a LoRA file by its name wherever built-in LoRAs are found; returns the name."""
    return register_file(BUILTIN_LORAS, path, "LoRA")


@dataclass(frozen=True)
class GenerationPreset:
    """Settings for one look or speed under a name, as the web UI's preset menu and `--preset` apply them: a model
    (a checkpoint file, or "default" for the embedded one), LoRAs added to the prompt as `<lora:NAME:STRENGTH>`
    tags (so the infotext records them and pasting it back reproduces the image), and the sampler settings."""
    name: str
    sampler_name: str
    steps: int
    cfg_scale: float
    scheduler: str = "Automatic"
    model: str = "default"
    loras: tuple[tuple[str, float], ...] = ()

    def lora_tags(self, skip: set[str] = frozenset()) -> str:
        """The `<lora:NAME:STRENGTH>` tags of the preset's LoRAs, except those named in `skip`."""
        return " ".join(f"<lora:{name}:{strength:g}>" for name, strength in self.loras if name not in skip)

    def prompt_with_loras(self, prompt: str) -> str:
        """`prompt` with the preset's LoRA tags appended, except those of LoRAs it names already (a prompt pasted
        back from a preset image's infotext has them)."""
        named = {network.name for network in extract_extra_networks(prompt)[1] if network.kind == "lora"}
        return " ".join(part for part in (prompt, self.lora_tags(named)) if part)

    def api_dict(self) -> dict:
        return {"name": self.name, "model": self.model, "loras": [{"name": n, "strength": s} for n, s in self.loras],
                "prompt_tags": self.lora_tags(), "sampler_name": self.sampler_name, "scheduler": self.scheduler,
                "steps": self.steps, "cfg_scale": self.cfg_scale}


# Presets by name, in the order menus list them.
PRESETS: dict[str, GenerationPreset] = {}


def register_preset(preset: GenerationPreset) -> GenerationPreset:
    """Add a preset (replacing one of the same name). Its model must be "default" or an existing file and its LoRAs
    built-in ones (register_lora), so a preset never depends on a LoRA folder given at run time; otherwise
    FileNotFoundError."""
    if preset.model != "default" and not os.path.isfile(preset.model):
        raise FileNotFoundError(f"preset {preset.name!r}: model file not found: {preset.model}")
    unknown = [name for name, _ in preset.loras if name not in BUILTIN_LORAS]
    if unknown:
        raise FileNotFoundError(f"preset {preset.name!r}: {', '.join(unknown)} not among the built-in LoRAs "
                                f"({', '.join(BUILTIN_LORAS) or 'none'}); register_lora the file first")
    if preset.sampler_name not in SAMPLERS or preset.scheduler not in SCHEDULERS:
        raise ValueError(f"preset {preset.name!r}: unknown sampler {preset.sampler_name!r} or schedule type "
                         f"{preset.scheduler!r}")
    PRESETS[preset.name] = preset
    return preset


# The shipped model's few-step LoRA (docs/RESULTS.md, "Distribution matching": consistency distillation, then
# distribution matching, then extracted as a LoRA), sampled with LCM at 2 steps (1 for the fastest, 4 for the best
# images) and CFG 1: one UNet call per step. Offered only when the package has the file.
SHAPES_LCM_LORA = DATA_DIR / "tiny-shapes-lcm.safetensors"
if SHAPES_LCM_LORA.is_file():
    register_preset(GenerationPreset("tiny-shapes + LCM", "LCM", steps=2, cfg_scale=1.0,
                                     loras=((register_lora(SHAPES_LCM_LORA), 1.0),)))
