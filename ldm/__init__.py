"""Stable Diffusion models in readable PyTorch whose module tree is the original checkpoint key space.

    model = ldm.create_model("sd15", device="meta")        # architecture only, nothing allocated
    model = ldm.load_model("v1-5-pruned-emaonly.safetensors", dtype=torch.float16)
    ldm.save_model(model, "mine.safetensors")
"""
import math
import os
from dataclasses import replace

import torch

from .attention import AttentionStore, attention_processor, set_attention_processor
from .checkpoint import CheckpointError, cast_tensor, drop_ema, legacy_model_hash, model_hash, read_metadata, \
    read_state_dict, save_state_dict, select_ema
from .model import LatentDiffusion, preset_alphas_cumprod
from .presets import PRESETS, HeadCounts, Preset, detect, get_preset, preset_predicting, text_layers_metadata

__all__ = ["LatentDiffusion", "Preset", "PRESETS", "create_model", "load_model", "save_model", "model_hash",
           "legacy_model_hash", "detect", "get_preset", "CheckpointError", "set_attention_processor",
           "attention_processor", "AttentionStore"]

# Buffers of CompVis's DDPM class that original SD1/SD2 files carry. All are functions of the betas; the model keeps
# ᾱ (`alphas_cumprod`) and the rest are accepted and dropped on load.
DERIVED_SCHEDULE_KEYS = {
    "betas", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
    "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2", "model.logvar", "logvar",
}


def _is_optional_key(key: str) -> bool:
    # transformers' CLIP stores its position arange as a buffer (`embeddings.position_ids`) in some files only.
    return key in DERIVED_SCHEDULE_KEYS or key.endswith("text_model.embeddings.position_ids")


def create_model(name: str, *, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None) -> LatentDiffusion:
    """A randomly initialised model of preset `name` (sd15, sd15-inpaint, sd21, sd21-base, sdxl-base, tiny).

    device="meta" builds the architecture without allocating memory or running initialisers.
    """
    preset = get_preset(name)
    with torch.device(device or "cpu"):
        model = LatentDiffusion(preset)
    if dtype is not None:
        _cast_weights(model, dtype)
    return model.eval()


def _cast_weights(model: LatentDiffusion, dtype: torch.dtype) -> None:
    # The schedule stays float32: ᾱ near t=999 is ~0.005 and sigma = sqrt((1-ᾱ)/ᾱ) would lose digits in fp16, and
    # bfloat16 rounds ᾱ_0 = 0.99915 to 1.0, i.e. sigma_min to 0.
    alphas_cumprod = model.alphas_cumprod.float()
    model.to(dtype)
    model.alphas_cumprod = alphas_cumprod


def load_model(path_or_state_dict: str | os.PathLike | dict, *, device: str | torch.device | None = None,
               dtype: torch.dtype | None = None, prediction: str | None = None, ema: bool = False) -> LatentDiffusion:
    """Load an original-format Stable Diffusion checkpoint (`.safetensors` or `.ckpt`) of any supported family.

    The architecture is read off the tensors (`detect`); loading is strict: a key the architecture lacks, or one it
    needs that the file lacks, raises an error listing them. Weights go straight to `device`/`dtype` with no random
    initialisation. `ema=True` takes the UNet weights from the file's `model_ema.*` copy. `prediction` ("eps" or "v")
    overrides the prediction type, which weights do not reveal: files saved here record it; other SD2 files are probed
    as A1111 does (one small UNet call, see `guess_sd2_prediction`); SD1 and SDXL are eps.
    """
    device = torch.device(device or "cpu")
    source = "the given state dict"
    metadata = None
    if isinstance(path_or_state_dict, dict):
        state_dict = {key: cast_tensor(key, tensor, device, dtype, _SCHEDULE_KEYS)
                      for key, tensor in path_or_state_dict.items()}
    else:
        source = os.fspath(path_or_state_dict)
        state_dict = read_state_dict(source, device=device, dtype=dtype, keep_precision=_SCHEDULE_KEYS)
        metadata = read_metadata(source)
    state_dict = select_ema(state_dict) if ema else drop_ema(state_dict)
    if prediction not in (None, "eps", "v"):
        raise ValueError(f"prediction must be 'eps' or 'v', got {prediction!r}")
    recorded = _recorded_facts(metadata or {}, source)
    recorded_prediction = recorded.pop("prediction", None)
    prediction = prediction or recorded_prediction
    try:
        preset = detect(state_dict, metadata)
    except (ValueError, KeyError, IndexError) as e:  # KeyError/IndexError: a tensor detect reads is absent
        raise CheckpointError(f"{source}: cannot read a Stable Diffusion architecture off its tensors and metadata: {e}") from None
    if prediction is not None:
        preset = preset_predicting(preset, prediction)
    # A VAE trained here from scratch has its own latent scale, and a model trained here its own image size (the
    # default for generation), both recorded by save_model.
    preset = replace(preset, **recorded)

    file_alphas = state_dict.get("alphas_cumprod")
    state_dict = {k: v for k, v in state_dict.items() if not _is_optional_key(k) and k != "alphas_cumprod"}
    try:
        with torch.device("meta"):
            model = LatentDiffusion(preset)
    except (ValueError, AssertionError, RuntimeError) as e:  # e.g. head counts in the metadata that do not divide
        raise CheckpointError(f"{source}: the {preset.name} architecture its tensors and metadata describe cannot "
                              f"be built: {e}") from None
    expected = {k: v.shape for k, v in model.state_dict().items() if k != "alphas_cumprod"}
    missing, unexpected = sorted(expected.keys() - state_dict.keys()), sorted(state_dict.keys() - expected.keys())
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not match the detected {preset.name} architecture: "
            f"{len(missing)} missing key(s) {_preview(missing)}, {len(unexpected)} unexpected key(s) "
            f"{_preview(unexpected)}. If this is a partial file (VAE or UNet only, LoRA, embedding), load it "
            "with the matching tool instead of load_model.")
    mismatched = [k for k, shape in expected.items() if state_dict[k].shape != shape]
    if mismatched:
        key = mismatched[0]
        raise CheckpointError(
            f"{source}: tensor {key} has shape {list(state_dict[key].shape)} but the detected {preset.name} "
            f"architecture needs {list(expected[key])} ({len(mismatched)} mis-shaped tensor(s)); the file is damaged "
            "or mixes weights of different models")
    state_dict["alphas_cumprod"] = _schedule(preset, file_alphas)
    model.load_state_dict(state_dict, strict=True, assign=True)
    model.eval()
    if preset.family == "sd2" and prediction is None:
        # No recorded prediction: A1111's probe decides, and the preset follows it, so an SD2-base file becomes
        # sd21-base (eps, 512 px) rather than sd21 with a patched prediction (still 768 px, re-saved as "sd21").
        model.preset = replace(preset_predicting(preset, guess_sd2_prediction(model)), **recorded)
    return model


def _recorded_facts(metadata: dict[str, str], source: str) -> dict:
    """The preset fields save_model records in the metadata (prediction, scale_factor, resolution), checked, as
    keyword arguments for `dataclasses.replace`; a malformed value is a CheckpointError naming the file and key."""
    facts = {}
    if "ldm.prediction" in metadata:
        facts["prediction"] = metadata["ldm.prediction"]
        if facts["prediction"] not in ("eps", "v"):
            raise _metadata_error(source, metadata, "ldm.prediction", "must be 'eps' or 'v'")
    if "ldm.scale_factor" in metadata:
        try:
            facts["scale_factor"] = float(metadata["ldm.scale_factor"])
        except ValueError:
            raise _metadata_error(source, metadata, "ldm.scale_factor", "is not a number") from None
        if not math.isfinite(facts["scale_factor"]) or facts["scale_factor"] <= 0:
            raise _metadata_error(source, metadata, "ldm.scale_factor", "must be a positive finite number")
    if "ldm.resolution" in metadata:
        try:
            facts["resolution"] = int(metadata["ldm.resolution"])
        except ValueError:
            raise _metadata_error(source, metadata, "ldm.resolution", "is not an integer") from None
        if not 8 <= facts["resolution"] <= MAX_RESOLUTION or facts["resolution"] % 8:
            raise _metadata_error(source, metadata, "ldm.resolution",
                                  f"must be a multiple of 8 between 8 and {MAX_RESOLUTION} pixels")
    return facts


# Far above any released model's training size (SDXL: 1024); a larger value is corruption, not a model.
MAX_RESOLUTION = 16384


def _metadata_error(source: str, metadata: dict[str, str], key: str, problem: str) -> CheckpointError:
    return CheckpointError(f"{source}: metadata {key}={metadata[key]!r:.40} {problem}; remove the key or re-save the "
                           "file with save_model")


# The noise schedule is read at its stored precision whatever `dtype` the weights get (see _cast_weights).
_SCHEDULE_KEYS = frozenset({"alphas_cumprod"})


def _schedule(preset: Preset, file_alphas: torch.Tensor | None) -> torch.Tensor:
    """ᾱ for the model: the preset's exact float32 values, unless the file carries a genuinely different schedule."""
    default = preset_alphas_cumprod(preset)
    if file_alphas is None or (file_alphas.shape == default.shape
                               and torch.allclose(file_alphas.float().cpu(), default, rtol=1e-3)):
        return default
    return file_alphas.float().cpu()


def _preview(keys: list[str], n: int = 8) -> str:
    return "[" + ", ".join(keys[:n]) + (", …" if len(keys) > n else "") + "]"


@torch.no_grad()
def guess_sd2_prediction(model: LatentDiffusion) -> str:
    """A1111's probe for SD2 files: a v-model's output at t=999 for a constant 0.5 latent and constant context sits
    far below the input (mean difference < −1), an eps-model's does not."""
    unet = model.unet
    x = torch.full((1, unet.input_blocks[0][0].in_channels, 8, 8), 0.5, device=model.device, dtype=model.dtype)
    context = torch.full((1, 2, model.preset.unet.context_dim), 0.5, device=model.device, dtype=model.dtype)
    out = unet(x, torch.tensor([999.0], device=model.device), context)
    return "v" if (out.float() - x.float()).mean().item() < -1 else "eps"


def save_model(model: LatentDiffusion, path: str | os.PathLike, *, dtype: torch.dtype | None = None,
               name: str | None = None) -> None:
    """Write the model as a `.safetensors` file with original keys, atomically (temp file + rename).

    The metadata records what weights cannot show (attention head layout, prediction type, latent scale factor,
    training resolution, and a text tower's layer when it is not the family's convention), so `load_model` gets the
    exact model back; `name` (as "ldm.name") is the model's name in generation's infotexts when given (a trained
    run's name, whatever the file is called).
    """
    state_dict = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() and k != "alphas_cumprod" else v)
                  .detach().cpu() for k, v in model.state_dict().items()}
    metadata = {**HeadCounts.of(model.preset).to_metadata(), "ldm.prediction": model.preset.prediction,
                "ldm.scale_factor": repr(float(model.scale_factor)), "ldm.resolution": str(model.preset.resolution),
                "ldm.preset": model.preset.name, **text_layers_metadata(model.preset)}
    if name:
        metadata["ldm.name"] = name
    save_state_dict(state_dict, path, metadata=metadata)
