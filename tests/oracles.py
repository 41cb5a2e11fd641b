"""Test-only access to the reference implementations ("oracles"), and bridges to diffusers' single-file converters and
models.

Every test that needs an oracle, or another package of the test extras, gets it through import_oracle / find_oracle
here, never a bare `pytest.importorskip`: a missing package skips the test on a developer's machine, but fails it when
LDM_REQUIRE_ORACLES=1 (as .ci/run sets), so CI cannot pass by silently skipping every parity test.

The diffusers bridges build the *original* LDM config dict that diffusers' `create_*_diffusers_config_from_ldm` read,
so the oracle derives its architecture from the same hyper-parameters as our presets, independently of our code.
"""
import importlib
import importlib.util
import os
import sys
from dataclasses import asdict
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import NoReturn

import pytest
import torch

from ldm.presets import UNetConfig, VAEConfig

REQUIRE_ORACLES = "LDM_REQUIRE_ORACLES"
INSTALL_HINT = "pip install -e '.[test,webui]' && pip install --no-deps -r tests/oracles-no-deps.txt"


def missing_oracle(name: str, problem: str = "is not installed") -> NoReturn:
    """Skip the calling test (or module) because package `name` is missing, or fail it under LDM_REQUIRE_ORACLES=1."""
    message = f"{name} {problem}; install the test dependencies: {INSTALL_HINT}"
    if os.environ.get(REQUIRE_ORACLES) == "1":
        pytest.fail(f"{message} ({REQUIRE_ORACLES}=1 makes a missing oracle a failure, not a skip)", pytrace=False)
    pytest.skip(message, allow_module_level=True)


def import_oracle(name: str) -> ModuleType:
    """The module `name` (e.g. "transformers", "diffusers.loaders.single_file_utils"), or a skip / failure (see
    missing_oracle) when it cannot be imported."""
    try:
        return importlib.import_module(name)
    except ImportError as error:
        missing_oracle(name, f"cannot be imported ({error})")


def find_oracle(name: str) -> ModuleSpec:
    """The import spec of package `name` without importing it, for oracles whose package __init__ cannot be imported
    here (it needs torchvision) and whose single files the tests load themselves; a skip / failure when missing."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        missing_oracle(name)
    return spec


def spandrel_architecture(family: str) -> ModuleType:
    """spandrel's `spandrel.architectures.<family>` module (e.g. "ESRGAN", "Compact", "SwinIR"), loaded without
    spandrel's package __init__: that __init__ builds the registry of every architecture, and its LaMa entry imports
    torchvision, which the test environment does not have. An empty package module standing in for `spandrel` (with
    the real package path, so the architecture's relative imports resolve to spandrel's own files) skips only that
    registry; nothing else of spandrel is replaced. It stays in sys.modules for this test process only."""
    spec = find_oracle("spandrel")
    if "spandrel" not in sys.modules:
        package = ModuleType("spandrel")
        package.__path__ = list(spec.submodule_search_locations)
        package.__spec__ = spec
        sys.modules["spandrel"] = package
    return importlib.import_module(f"spandrel.architectures.{family}")


def original_config(unet: UNetConfig, vae: VAEConfig) -> dict:
    """The `model.params` tree of an LDM/SGM YAML config for these hyper-parameters."""
    unet_params = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(unet).items()
                   if v is not None and k != "transformer_depth_middle"}
    # SD1/SD2 YAMLs give one int depth for every attention level and the middle; SGM gives a per-level list whose
    # last entry is also the middle's. Write what the original would have written.
    attention_depths = {d for d in unet.transformer_depth if d}
    if attention_depths == {unet.transformer_depth_middle}:
        unet_params["transformer_depth"] = unet.transformer_depth_middle
    elif unet.transformer_depth[-1] != unet.transformer_depth_middle:
        raise ValueError("no original config expresses this transformer_depth / transformer_depth_middle pair")
    if unet.adm_in_channels is not None:
        unet_params["num_classes"] = "sequential"
    vae_params = {"ch": vae.ch, "ch_mult": list(vae.ch_mult), "num_res_blocks": vae.num_res_blocks,
                  "in_channels": vae.in_channels, "out_ch": vae.out_ch, "z_channels": vae.z_channels,
                  "double_z": True}
    return {"model": {"params": {"unet_config": {"params": unet_params},
                                 "first_stage_config": {"params": {"embed_dim": vae.embed_dim,
                                                                   "ddconfig": vae_params}}}}}


def diffusers_unet(unet: UNetConfig, vae: VAEConfig, state_dict: dict) -> tuple[torch.nn.Module, dict]:
    """(diffusers' UNet2DConditionModel, converted weights) for a state dict with `model.diffusion_model.*` keys."""
    diffusers, sfu = import_oracle("diffusers"), import_oracle("diffusers.loaders.single_file_utils")
    config = sfu.create_unet_diffusers_config_from_ldm(original_config(unet, vae), state_dict, image_size=256)
    converted = sfu.convert_ldm_unet_checkpoint(state_dict, config)
    device = next(iter(state_dict.values())).device
    with torch.device(device):
        model = diffusers.UNet2DConditionModel(**config)
    return model, converted


def diffusers_vae(unet: UNetConfig, vae: VAEConfig, state_dict: dict) -> tuple[torch.nn.Module, dict]:
    """(diffusers' AutoencoderKL, converted weights) for a state dict with `first_stage_model.*` keys."""
    diffusers, sfu = import_oracle("diffusers"), import_oracle("diffusers.loaders.single_file_utils")
    config = sfu.create_vae_diffusers_config_from_ldm(original_config(unet, vae), state_dict, image_size=256)
    converted = sfu.convert_ldm_vae_checkpoint(state_dict, config)
    device = next(iter(state_dict.values())).device
    with torch.device(device):
        model = diffusers.AutoencoderKL(**config)
    return model, converted


def diffusers_controlnet(unet: UNetConfig, vae: VAEConfig, state_dict: dict,
                         hint_channels: int = 3) -> tuple[torch.nn.Module, dict]:
    """(diffusers' ControlNetModel, converted weights) for a ControlNet state dict in lllyasviel's layout (keys with or
    without `control_model.`). diffusers' converter leaves SDXL's `label_emb` out; its own key table
    (DIFFUSERS_TO_LDM_MAPPING["controlnet"]["addition_embed_type"]) maps it."""
    diffusers, sfu = import_oracle("diffusers"), import_oracle("diffusers.loaders.single_file_utils")
    original = original_config(unet, vae)
    # create_controlnet_diffusers_config_from_ldm (diffusers 0.42) calls create_unet_diffusers_config_from_ldm without
    # its `checkpoint` argument and raises TypeError; this is the same selection of the UNet config's fields.
    unet_config = sfu.create_unet_diffusers_config_from_ldm(original, state_dict, image_size=256)
    config = {"conditioning_channels": hint_channels,
              **{key: unet_config[key] for key in (
                  "in_channels", "down_block_types", "block_out_channels", "layers_per_block", "cross_attention_dim",
                  "attention_head_dim", "use_linear_projection", "class_embed_type", "addition_embed_type",
                  "addition_time_embed_dim", "projection_class_embeddings_input_dim",
                  "transformer_layers_per_block")}}
    converted = sfu.convert_controlnet_checkpoint(state_dict, config)
    if unet.adm_in_channels is not None:
        plain = {k.removeprefix(sfu.LDM_CONTROLNET_KEY): v for k, v in state_dict.items()}
        for theirs, ours in sfu.DIFFUSERS_TO_LDM_MAPPING["controlnet"]["addition_embed_type"].items():
            converted[theirs] = plain[ours]
    device = next(iter(state_dict.values())).device
    with torch.device(device):
        model = diffusers.ControlNetModel(**config)
    return model, converted
