"""Test-only bridges to the reference implementations (diffusers' single-file converters and models).

Everything here builds the *original* LDM config dict that diffusers' `create_*_diffusers_config_from_ldm` read, so the
oracle derives its architecture from the same hyper-parameters as our presets, independently of our code.
"""
from dataclasses import asdict

import torch
from diffusers import AutoencoderKL as DiffusersVAE
from diffusers import UNet2DConditionModel
from diffusers.loaders import single_file_utils as sfu

from ldm.presets import UNetConfig, VAEConfig
from random_weights import randomize_weights as randomize_  # noqa: F401  (the tests' random non-zero weights)


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


def diffusers_unet(unet: UNetConfig, vae: VAEConfig, state_dict: dict) -> tuple[UNet2DConditionModel, dict]:
    """(model, converted weights) for a state dict with `model.diffusion_model.*` keys."""
    config = sfu.create_unet_diffusers_config_from_ldm(original_config(unet, vae), state_dict, image_size=256)
    converted = sfu.convert_ldm_unet_checkpoint(state_dict, config)
    device = next(iter(state_dict.values())).device
    with torch.device(device):
        model = UNet2DConditionModel(**config)
    return model, converted


def diffusers_vae(unet: UNetConfig, vae: VAEConfig, state_dict: dict) -> tuple[DiffusersVAE, dict]:
    """(model, converted weights) for a state dict with `first_stage_model.*` keys."""
    config = sfu.create_vae_diffusers_config_from_ldm(original_config(unet, vae), state_dict, image_size=256)
    converted = sfu.convert_ldm_vae_checkpoint(state_dict, config)
    device = next(iter(state_dict.values())).device
    with torch.device(device):
        model = DiffusersVAE(**config)
    return model, converted
