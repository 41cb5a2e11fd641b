"""Typed configurations of the Stable Diffusion families, and `detect`, which reads one off a checkpoint's tensors.

Field names are the original hyper-parameter names (CompVis `UNetModel`, `AutoencoderKL` ddconfig, CLIP/OpenCLIP), so
a reader can hold a preset next to the published YAML configs.
"""
from dataclasses import dataclass, field, replace
from typing import Literal

import torch

from .clip import LAYERS

Family = Literal["sd1", "sd2", "sdxl"]
Prediction = Literal["eps", "v"]


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (4, 2, 1)
    num_heads: int | None = 8
    num_head_channels: int | None = None
    # Per level; 0 where a level has no attention, which is how `detect` reads it back.
    transformer_depth: tuple[int, ...] = (1, 1, 1, 0)
    transformer_depth_middle: int = 1
    context_dim: int = 768
    use_linear_in_transformer: bool = False
    adm_in_channels: int | None = None


@dataclass(frozen=True)
class VAEConfig:
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    in_channels: int = 3
    out_ch: int = 3
    z_channels: int = 4
    embed_dim: int = 4


@dataclass(frozen=True)
class TextEncoderConfig:
    """One text tower. `layout` says which key layout (and activation) it has:

    - "clip": OpenAI CLIP in HF transformers' layout (`transformer.text_model.*`), quick-GELU, pads with EOS.
    - "openclip": OpenCLIP's layout (`model.*`), exact GELU, pads with 0, has `text_projection`.
    `layer` and `final_norm` select the hidden state handed to the UNet: SD1 last + final norm, SD2 penultimate +
    final norm, SDXL penultimate without it; `return_pooled` adds SDXL's pooled, projected EOS vector.
    """
    layout: Literal["clip", "openclip"] = "clip"
    width: int = 768
    layers: int = 12
    heads: int = 12
    vocab_size: int = 49408
    context_length: int = 77
    embed_dim: int | None = None
    layer: Literal["last", "penultimate"] = "last"
    final_norm: bool = True
    return_pooled: bool = False


@dataclass(frozen=True)
class Preset:
    name: str
    family: Family
    unet: UNetConfig
    vae: VAEConfig
    text: tuple[TextEncoderConfig, ...]
    scale_factor: float = 0.18215
    prediction: Prediction = "eps"
    # Discrete DDPM schedule: "scaled linear" betas (linspace of sqrt(beta), squared) over 1000 steps.
    linear_start: float = 0.00085
    linear_end: float = 0.012
    timesteps: int = 1000
    # Default generation size in pixels.
    resolution: int = 512


SD1_TEXT = TextEncoderConfig()
SD2_TEXT = TextEncoderConfig(layout="openclip", width=1024, layers=24, heads=16, embed_dim=1024,
                             layer="penultimate")
SD1_UNET = UNetConfig()
SD2_UNET = UNetConfig(num_heads=None, num_head_channels=64, context_dim=1024, use_linear_in_transformer=True)

PRESETS: dict[str, Preset] = {p.name: p for p in [
    Preset("sd15", "sd1", SD1_UNET, VAEConfig(), (SD1_TEXT,)),
    Preset("sd15-inpaint", "sd1", replace(SD1_UNET, in_channels=9), VAEConfig(), (SD1_TEXT,)),
    Preset("sd21", "sd2", SD2_UNET, VAEConfig(), (SD2_TEXT,), prediction="v", resolution=768),
    Preset("sd21-base", "sd2", SD2_UNET, VAEConfig(), (SD2_TEXT,)),
    Preset("sdxl-base", "sdxl",
           UNetConfig(channel_mult=(1, 2, 4), attention_resolutions=(4, 2), num_heads=None, num_head_channels=64,
                      transformer_depth=(0, 2, 10), transformer_depth_middle=10, context_dim=2048, use_linear_in_transformer=True,
                      adm_in_channels=2816),
           VAEConfig(),
           (TextEncoderConfig(layer="penultimate", final_norm=False),
            TextEncoderConfig(layout="openclip", width=1280, layers=32, heads=20, embed_dim=1280,
                              layer="penultimate", final_norm=False, return_pooled=True)),
           scale_factor=0.13025, resolution=1024),
    # Small enough to run everything in milliseconds on a CPU; the same classes as the real presets.
    Preset("tiny", "sd1",
           UNetConfig(model_channels=32, channel_mult=(1, 2), attention_resolutions=(2,), num_heads=2,
                      transformer_depth=(0, 1), context_dim=64),
           VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1),
           (TextEncoderConfig(width=64, layers=2, heads=2),),
           resolution=64),
]}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}") from None


@dataclass(frozen=True)
class HeadCounts:
    """Attention head layout, which is not visible in weight shapes (only heads × head width is).

    Written into the safetensors metadata by `save_model`; files without it follow the families' conventions:
    SD1's UNet has 8 heads, SD2/SDXL's have 64-channel heads, CLIP text towers have 64-channel heads.
    """
    unet_num_heads: int | None = None
    unet_num_head_channels: int | None = None
    text_heads: tuple[int, ...] = field(default_factory=tuple)

    def to_metadata(self) -> dict[str, str]:
        meta = {"ldm.text_heads": ",".join(map(str, self.text_heads))}
        if self.unet_num_heads is not None:
            meta["ldm.unet_num_heads"] = str(self.unet_num_heads)
        if self.unet_num_head_channels is not None:
            meta["ldm.unet_num_head_channels"] = str(self.unet_num_head_channels)
        return meta

    @classmethod
    def from_metadata(cls, meta: dict[str, str] | None) -> "HeadCounts | None":
        if not meta or "ldm.text_heads" not in meta:
            return None
        def positive_int(key: str, text: str) -> int:
            if not (text.strip().isascii() and text.strip().isdigit()) or int(text) < 1:
                raise ValueError(f"metadata {key}={meta[key]!r:.40} must hold positive integers")
            return int(text)

        def opt_int(key):
            return positive_int(key, meta[key]) if key in meta else None
        return cls(opt_int("ldm.unet_num_heads"), opt_int("ldm.unet_num_head_channels"),
                   tuple(positive_int("ldm.text_heads", h) for h in meta["ldm.text_heads"].split(",") if h))

    @classmethod
    def of(cls, preset: Preset) -> "HeadCounts":
        return cls(preset.unet.num_heads, preset.unet.num_head_channels, tuple(t.heads for t in preset.text))


UNET = "model.diffusion_model."
VAE = "first_stage_model."
TEXT_PREFIXES = {"sd1": ("cond_stage_model.",), "sd2": ("cond_stage_model.",),
                 "sdxl": ("conditioner.embedders.0.", "conditioner.embedders.1.")}
# The preset whose conventions (text layers, head layout) a family's files follow when their metadata is silent.
FAMILY_PRESETS = {"sd1": "sd15", "sd2": "sd21", "sdxl": "sdxl-base"}


def _count(state_dict, prefix: str) -> int:
    """Number of distinct integer children `prefix<N>.` among the keys."""
    return len({k[len(prefix):].split(".")[0] for k in state_dict if k.startswith(prefix)})


def _detect_unet(sd, heads: HeadCounts | None) -> UNetConfig:
    return UNetConfig(**detect_encoder(sd, UNET, heads), out_channels=sd[UNET + "out.2.weight"].shape[0])


def detect_encoder(sd, p: str, heads: HeadCounts | None) -> dict:
    """The UNet-encoder hyper-parameters (UNetConfig's fields but out_channels) of the keys under prefix `p`: a
    UNet's, or a ControlNet's copy of its encoder (ldm.controlnet)."""
    model_channels, in_channels = sd[p + "input_blocks.0.0.weight"].shape[:2]
    n_input_blocks = _count(sd, p + "input_blocks.")
    levels = 1 + sum(f"{p}input_blocks.{i}.0.op.weight" in sd for i in range(n_input_blocks))
    num_res_blocks = (n_input_blocks - 1 - (levels - 1)) // levels
    channel_mult, attention_resolutions, depth = [], [], []
    for level in range(levels):
        first = 1 + level * (num_res_blocks + 1)  # index of the level's first ResBlock in input_blocks
        channel_mult.append(sd[f"{p}input_blocks.{first}.0.out_layers.3.weight"].shape[0] // model_channels)
        transformer = f"{p}input_blocks.{first}.1.transformer_blocks."
        depth.append(_count(sd, transformer))
        if depth[-1]:
            attention_resolutions.append(2 ** level)
    context_keys = [k for k in sd if k.startswith(p) and k.endswith("attn2.to_k.weight")]
    use_linear = sd[f"{p}middle_block.1.proj_in.weight"].ndim == 2
    if heads is not None:
        num_heads, num_head_channels = heads.unet_num_heads, heads.unet_num_head_channels
    else:
        num_heads, num_head_channels = (None, 64) if use_linear else (8, None)
    adm = sd.get(p + "label_emb.0.0.weight")
    return dict(
        in_channels=in_channels, model_channels=model_channels,
        channel_mult=tuple(channel_mult), num_res_blocks=num_res_blocks,
        attention_resolutions=tuple(sorted(attention_resolutions, reverse=True)),
        num_heads=num_heads, num_head_channels=num_head_channels, transformer_depth=tuple(depth),
        transformer_depth_middle=_count(sd, f"{p}middle_block.1.transformer_blocks."),
        context_dim=sd[context_keys[0]].shape[1], use_linear_in_transformer=use_linear,
        adm_in_channels=None if adm is None else adm.shape[1])


def _detect_vae(sd) -> VAEConfig:
    p = VAE
    ch, in_channels = sd[p + "encoder.conv_in.weight"].shape[:2]
    levels = _count(sd, p + "encoder.down.")
    return VAEConfig(
        ch=ch, in_channels=in_channels, out_ch=sd[p + "decoder.conv_out.weight"].shape[0],
        ch_mult=tuple(sd[f"{p}encoder.down.{i}.block.0.conv2.weight"].shape[0] // ch for i in range(levels)),
        num_res_blocks=_count(sd, p + "encoder.down.0.block."),
        z_channels=sd[p + "encoder.conv_out.weight"].shape[0] // 2, embed_dim=sd[p + "quant_conv.weight"].shape[0] // 2)


# Metadata key for text towers that hand the UNet another block's states than their family's convention (a model
# assembled with `python -m ldm.assemble --text-layer last`): one LAYERS entry per tower, comma-separated. Written
# by save_model only then, so files of the conventional families stay as they were.
TEXT_LAYERS_KEY = "ldm.text_layers"


def text_layers_metadata(preset: "Preset") -> dict[str, str]:
    """{TEXT_LAYERS_KEY: ...} when a text tower of `preset` reads another layer than its family's convention."""
    conventional = PRESETS[FAMILY_PRESETS[preset.family]].text
    layers = [t.layer for t in preset.text]
    return {} if layers == [t.layer for t in conventional] else {TEXT_LAYERS_KEY: ",".join(layers)}


def text_layers_from_metadata(metadata: dict[str, str] | None, usages: tuple[TextEncoderConfig, ...]) -> list[str]:
    """The layer each text tower hands the UNet: TEXT_LAYERS_KEY when the metadata has it, else the family's."""
    if not metadata or TEXT_LAYERS_KEY not in metadata:
        return [usage.layer for usage in usages]
    layers = metadata[TEXT_LAYERS_KEY].split(",")
    if len(layers) != len(usages) or any(layer not in LAYERS for layer in layers):
        raise ValueError(f"metadata {TEXT_LAYERS_KEY}={metadata[TEXT_LAYERS_KEY]!r:.40} must name "
                         f"{' or '.join(map(repr, LAYERS))} for each of the model's {len(usages)} text tower(s)")
    return layers


def _detect_text(sd, prefix: str, usage: TextEncoderConfig, heads: int | None) -> TextEncoderConfig:
    """Shapes from the weights; which hidden state is used (`usage`) is the family's convention."""
    if prefix + "transformer.text_model.embeddings.token_embedding.weight" in sd:
        p = prefix + "transformer.text_model."
        vocab_size, width = sd[p + "embeddings.token_embedding.weight"].shape
        return replace(usage, layout="clip", width=width, layers=_count(sd, p + "encoder.layers."),
                       heads=heads or max(1, width // 64), vocab_size=vocab_size,
                       context_length=sd[p + "embeddings.position_embedding.weight"].shape[0], embed_dim=None)
    p = prefix + "model."
    vocab_size, width = sd[p + "token_embedding.weight"].shape
    return replace(usage, layout="openclip", width=width, layers=_count(sd, p + "transformer.resblocks."),
                   heads=heads or max(1, width // 64), vocab_size=vocab_size,
                   context_length=sd[p + "positional_embedding"].shape[0],
                   embed_dim=sd[p + "text_projection"].shape[1])


def detect_family(state_dict) -> Family:
    """Which family a state dict with original SD keys belongs to; the error lists the key prefixes found."""
    has = lambda key: key in state_dict  # noqa: E731
    if not has(UNET + "input_blocks.0.0.weight") or not has(VAE + "encoder.conv_in.weight"):
        raise ValueError("not a Stable Diffusion checkpoint: expected keys under 'model.diffusion_model.' and "
                         f"'first_stage_model.'; found prefixes: {', '.join(key_prefixes(state_dict)) or 'none'}")
    if has("conditioner.embedders.1.model.token_embedding.weight"):
        return "sdxl"
    if has("cond_stage_model.model.token_embedding.weight"):
        return "sd2"
    if has("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"):
        return "sd1"
    raise ValueError("unknown text encoder: expected 'cond_stage_model.transformer.text_model.*' (SD1), "
                     "'cond_stage_model.model.*' (SD2) or 'conditioner.embedders.0/1.*' (SDXL); found prefixes: "
                     + ", ".join(key_prefixes(state_dict)))


def key_prefixes(state_dict, depth: int = 2) -> list[str]:
    return sorted({".".join(k.split(".")[:depth]) for k in state_dict})


def detect(state_dict: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Preset:
    """Read a Preset off a state dict with original keys, like CLIP's `build_model` reads widths off shapes.

    Everything comes from tensor shapes except the head layout (see HeadCounts) and the prediction type, which no
    weight reveals: SD2 files are assumed v-prediction (the 768-v models) unless the caller says otherwise.
    """
    family = detect_family(state_dict)
    heads = HeadCounts.from_metadata(metadata)
    text_heads = heads.text_heads if heads else (None,) * len(TEXT_PREFIXES[family])
    base = PRESETS[FAMILY_PRESETS[family]]
    unet, vae = _detect_unet(state_dict, heads), _detect_vae(state_dict)
    usages = tuple(replace(usage, layer=layer)
                   for usage, layer in zip(base.text, text_layers_from_metadata(metadata, base.text)))
    text = tuple(_detect_text(state_dict, prefix, usage, h)
                 for prefix, usage, h in zip(TEXT_PREFIXES[family], usages, text_heads))
    # A known architecture gets its preset (name, default size, prediction); sd21 and sd21-base share weights'
    # shapes, and the first listed (sd21, v-prediction) wins.
    for preset in PRESETS.values():
        if (preset.family, preset.unet, preset.vae, preset.text) == (family, unet, vae, text):
            return preset
    return replace(base, name=f"{family}-custom", unet=unet, vae=vae, text=text)


def preset_predicting(preset: Preset, prediction: str) -> Preset:
    """The preset of `preset`'s architecture that predicts `prediction`: the named twin when there is one (sd21 ↔
    sd21-base, which share every weight shape), else `preset` with that prediction."""
    if preset.prediction == prediction:
        return preset
    for twin in PRESETS.values():
        if ((twin.family, twin.unet, twin.vae, twin.text, twin.prediction)
                == (preset.family, preset.unet, preset.vae, preset.text, prediction)):
            return twin
    return replace(preset, prediction=prediction)
