"""UNet and VAE parity with diffusers through the original checkpoint key layout, and full-size layouts on meta.

Our state dict (original CompVis/SGM keys) goes through diffusers' own single-file converters, is loaded *strictly* into
diffusers' UNet2DConditionModel / AutoencoderKL, and both must compute the same function in fp32.
"""
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import ldm
from ldm.checkpoint import read_metadata
from ldm.layers import timestep_embedding
from ldm.model import SDXLConditioner
from ldm.presets import PRESETS, TextEncoderConfig, UNetConfig, VAEConfig, preset_predicting
from ldm.schedule import scaled_linear_alphas_cumprod
from ldm.unet import UNetModel
from ldm.vae import AutoencoderKL
from oracles import diffusers_unet, diffusers_vae
from random_weights import randomize_weights

# fp32 on CPU: the two implementations order reductions differently (fused vs unfused attention, conv algorithms),
# so agreement is to float32 round-off accumulated over ~20 layers, not bit equality.
ATOL, RTOL = 2e-5, 2e-5

TINY_VAE = VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1)
TINY_UNETS = {
    # SD1: conv projections, fixed head count, attention at the first levels only.
    "sd1": UNetConfig(model_channels=32, channel_mult=(1, 2, 2), attention_resolutions=(2, 1), num_heads=2,
                      transformer_depth=(1, 1, 0), context_dim=48),
    # SD1 inpainting: 9 input channels (latent + mask + masked-image latent).
    "sd1-inpaint": UNetConfig(in_channels=9, model_channels=32, channel_mult=(1, 2), attention_resolutions=(1,),
                              num_heads=4, transformer_depth=(1, 0), context_dim=48),
    # SD2: linear projections, fixed head width.
    "sd2": UNetConfig(model_channels=64, channel_mult=(1, 2), attention_resolutions=(2, 1), num_heads=None,
                      num_head_channels=32, transformer_depth=(1, 1), context_dim=40, use_linear_in_transformer=True),
    # SDXL: no attention at level 0, depth 2 below, deeper middle, label_emb for pooled text + 6 size embeddings.
    # diffusers only recognises SDXL's "text_time" embedding for context widths 2048/1280, hence 1280 here.
    "sdxl": UNetConfig(model_channels=32, channel_mult=(1, 2, 2), attention_resolutions=(4, 2), num_heads=None,
                       num_head_channels=16, transformer_depth=(0, 2, 2), transformer_depth_middle=2,
                       context_dim=1280, use_linear_in_transformer=True, adm_in_channels=24 + 6 * 256),
}


def make_unet(config: UNetConfig) -> UNetModel:
    from dataclasses import asdict
    return randomize_weights(UNetModel(**asdict(config)))


def prefixed(module: torch.nn.Module, prefix: str) -> dict:
    return {prefix + k: v for k, v in module.state_dict().items()}


@pytest.mark.parametrize("name", list(TINY_UNETS))
def test_unet_matches_diffusers_through_original_keys(name):
    config = TINY_UNETS[name]
    ours = make_unet(config).eval()
    theirs, converted = diffusers_unet(config, TINY_VAE, prefixed(ours, "model.diffusion_model."))
    theirs.load_state_dict(converted, strict=True)
    assert len(converted) == len(ours.state_dict())  # every one of our tensors maps to exactly one of theirs
    theirs.eval()

    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, config.in_channels, 16, 16, generator=g)
    t = torch.tensor([3.0, 777.0])
    context = torch.randn(2, 11, config.context_dim, generator=g)
    kwargs = {}
    y = None
    if config.adm_in_channels:
        pooled = torch.randn(2, config.adm_in_channels - 6 * 256, generator=g)
        time_ids = torch.tensor([[1024.0, 768.0, 16.0, 0.0, 1024.0, 1024.0]] * 2)
        y = torch.cat([pooled, timestep_embedding(time_ids.flatten(), 256).reshape(2, -1)], dim=-1)
        kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
    with torch.no_grad():
        expected = theirs(x, t, encoder_hidden_states=context, **kwargs).sample
        actual = ours(x, t, context, y)
    assert expected.abs().mean() > 0.1  # a real signal, not a degenerate zero output
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL)


def test_sdxl_vector_matches_diffusers_time_ids_embedding():
    """SDXLConditioner.vector must lay out y exactly as diffusers' text_time embedding does."""
    from diffusers.models.embeddings import Timesteps
    pooled = torch.randn(3, 1280)
    y = SDXLConditioner.vector(pooled, (1024, 768), (16, 32), (1024, 1024))
    time_ids = torch.tensor([1024.0, 768.0, 16.0, 32.0, 1024.0, 1024.0])
    proj = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)
    expected = torch.cat([pooled, proj(time_ids).reshape(1, -1).expand(3, -1)], dim=-1)
    assert y.shape == (3, 2816)
    torch.testing.assert_close(y, expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("vae_config", [TINY_VAE, VAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=2)])
def test_vae_matches_diffusers_through_original_keys(vae_config):
    from dataclasses import asdict
    ours = randomize_weights(AutoencoderKL(**asdict(vae_config))).eval()
    theirs, converted = diffusers_vae(TINY_UNETS["sd1"], vae_config, prefixed(ours, "first_stage_model."))
    theirs.load_state_dict(converted, strict=True)
    assert len(converted) == len(ours.state_dict())
    theirs.eval()
    image = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        ours_post = ours.encode(image, tiled=False)
        theirs_post = theirs.encode(image).latent_dist
        torch.testing.assert_close(ours_post.mean, theirs_post.mean, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(ours_post.std, theirs_post.std, atol=ATOL, rtol=RTOL)
        z = ours_post.mean
        torch.testing.assert_close(ours.decode(z, tiled=False), theirs.decode(z).sample, atol=ATOL, rtol=RTOL)


# Published parameter counts of the released models' parts (UNet, VAE).
FULL_SIZE_COUNTS = {"sd15": (859_520_964, 83_653_863), "sd21": (865_910_724, 83_653_863),
                    "sdxl-base": (2_567_463_684, 83_653_863)}


@pytest.mark.parametrize("name", list(PRESETS))
def test_full_size_layout_equals_diffusers_conversion_on_meta(name):
    """Every preset's UNet and VAE keys and shapes convert one-to-one onto diffusers' models of the same config."""
    preset = PRESETS[name]
    model = ldm.create_model(name, device="meta")
    state = model.state_dict()
    for prefix, build in (("model.diffusion_model.", diffusers_unet), ("first_stage_model.", diffusers_vae)):
        part = {k: v for k, v in state.items() if k.startswith(prefix)}
        theirs, converted = build(preset.unet, preset.vae, part)
        expected = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
        assert {k: tuple(v.shape) for k, v in converted.items()} == expected
        assert len(converted) == len(part)
    if name in FULL_SIZE_COUNTS:
        unet_count, vae_count = FULL_SIZE_COUNTS[name]
        assert sum(p.numel() for p in model.unet.parameters()) == unet_count
        assert sum(p.numel() for p in model.vae.parameters()) == vae_count


def test_unet_rejects_inconsistent_conditioning():
    unet = UNetModel(**{**TINY_UNETS["sd1"].__dict__})
    x, t, context = torch.randn(1, 4, 8, 8), torch.tensor([1.0]), torch.randn(1, 4, 48)
    with pytest.raises(ValueError, match="adm_in_channels"):
        unet(x, t, context, y=torch.randn(1, 10))
    with pytest.raises(ValueError, match="exactly one of num_heads"):
        UNetModel(num_heads=8, num_head_channels=64)


def test_gradient_checkpointing_gives_identical_gradients():
    config = replace(TINY_UNETS["sd1"])
    torch.manual_seed(0)
    unet = make_unet(config).train()
    x, t, context = torch.randn(1, 4, 8, 8), torch.tensor([10.0]), torch.randn(1, 5, 48)

    def grads():
        unet.zero_grad()
        unet(x, t, context).square().mean().backward()
        return [p.grad.clone() for p in unet.parameters()]

    plain = grads()
    unet.gradient_checkpointing = True
    checkpointed = grads()
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_full_size_sd15_unet_and_vae_match_diffusers():
    """The real SD1.5 shapes end to end (860M-parameter UNet at 64×64 latents, 84M VAE), random weights."""
    preset = PRESETS["sd15"]
    model = ldm.create_model("sd15")
    randomize_weights(model.unet)
    randomize_weights(model.vae)
    state = model.state_dict()
    g = torch.Generator().manual_seed(0)
    x, t, context = torch.randn(1, 4, 64, 64, generator=g), torch.tensor([321.0]), torch.randn(1, 77, 768, generator=g)
    unet, converted = diffusers_unet(preset.unet, preset.vae, {k: v for k, v in state.items()
                                                              if k.startswith("model.diffusion_model.")})
    unet.load_state_dict(converted, strict=True)
    with torch.no_grad():
        expected = unet.eval()(x, t, encoder_hidden_states=context).sample
        del unet, converted
        torch.testing.assert_close(model.unet(x, t, context), expected, atol=1e-4, rtol=1e-4)
    vae, converted = diffusers_vae(preset.unet, preset.vae, {k: v for k, v in state.items()
                                                            if k.startswith("first_stage_model.")})
    vae.load_state_dict(converted, strict=True)
    z = torch.randn(1, 4, 32, 32, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(model.vae.decode(z, tiled=False), vae.eval().decode(z).sample, atol=1e-4, rtol=1e-4)


# ----- model facts: prediction type, SD2-base detection, layering ---------------------------------------------------

TINY_SD2_TEXT = TextEncoderConfig(layout="openclip", width=64, layers=2, heads=1, embed_dim=64, layer="penultimate")
# The head layouts detect assumes for files without our metadata: 64-channel heads in the UNet and the text tower.
TINY_SD2_UNET = UNetConfig(model_channels=64, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,),
                           num_heads=None, num_head_channels=64, transformer_depth=(0, 1), context_dim=64,
                           use_linear_in_transformer=True)
# Four levels, so latents are 1/8 of the image as in the real models (TINY_VAE's two levels give 1/2).
TINY_SD2_VAE = VAEConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1)


@pytest.fixture
def tiny_sd2_presets(monkeypatch):
    """sd21 and sd21-base with their names, predictions and resolutions but a tiny SD2 architecture: a full-size
    SD2 file is 5 GB, and which preset a file gets only depends on the preset table."""
    for name in ("sd21", "sd21-base"):
        monkeypatch.setitem(PRESETS, name, replace(PRESETS[name], unet=TINY_SD2_UNET, vae=TINY_SD2_VAE,
                                                   text=(TINY_SD2_TEXT,)))


def save_without_metadata(model, path, final_bias: float) -> None:
    """Saves as other tools do (no ldm.* metadata), with the UNet's last conv set so that A1111's probe sees
    mean(unet(0.5) − 0.5) = final_bias − 0.5: below −1 reads as v-prediction, above as eps."""
    with torch.no_grad():
        model.unet.out[2].weight.zero_()
        model.unet.out[2].bias.fill_(final_bias)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)


def test_eps_sd2_file_without_metadata_becomes_sd21_base_everywhere(tmp_path, tiny_sd2_presets, monkeypatch):
    from sample import generate

    path = tmp_path / "sd2-base.safetensors"
    save_without_metadata(randomize_weights(ldm.create_model("sd21-base")), path, final_bias=0.0)
    model = ldm.load_model(path)
    assert model.preset == PRESETS["sd21-base"]
    assert (model.preset.name, model.preset.resolution, model.parameterization) == ("sd21-base", 512, "eps")
    # Only the size matters here, so decoding (minutes for a 512² image on a shared CPU) is stubbed.
    monkeypatch.setattr(model, "decode_latents", lambda latents: torch.zeros(latents.shape[0], 3,
                                                                             8 * latents.shape[2], 8 * latents.shape[3]))
    result = generate(model, {"prompt": "a red circle", "steps": 1, "seed": 1}, progress=False)
    assert result.images[0].size == (512, 512)  # the default size is the preset's resolution
    resaved = tmp_path / "resaved.safetensors"
    ldm.save_model(model, resaved)
    metadata = read_metadata(resaved)
    assert (metadata["ldm.preset"], metadata["ldm.resolution"], metadata["ldm.prediction"]) == ("sd21-base", "512",
                                                                                                   "eps")
    assert ldm.load_model(resaved).preset == PRESETS["sd21-base"]


def test_v_sd2_file_without_metadata_stays_sd21(tmp_path, tiny_sd2_presets):
    path = tmp_path / "sd2-v.safetensors"
    save_without_metadata(randomize_weights(ldm.create_model("sd21")), path, final_bias=-3.0)
    model = ldm.load_model(path)
    assert model.preset == PRESETS["sd21"] and model.parameterization == "v" and model.preset.resolution == 768
    # An explicit prediction picks the matching preset too, without the probe.
    assert ldm.load_model(path, prediction="eps").preset == PRESETS["sd21-base"]


def test_the_real_sd21_presets_are_each_others_prediction_twins():
    assert preset_predicting(PRESETS["sd21"], "eps") is PRESETS["sd21-base"]
    assert preset_predicting(PRESETS["sd21-base"], "v") is PRESETS["sd21"]
    tiny_v = preset_predicting(PRESETS["tiny"], "v")  # no named twin: the same preset with the other prediction
    assert tiny_v == replace(PRESETS["tiny"], prediction="v")


def test_prediction_type_has_one_home_in_the_preset():
    model = ldm.create_model("tiny")
    assert model.parameterization == model.preset.prediction == "eps"
    model.preset = replace(model.preset, prediction="v")
    assert model.parameterization == "v"
    with pytest.raises(AttributeError):
        model.parameterization = "eps"
    assert model.is_sdxl is False and ldm.create_model("sdxl-base", device="meta").is_sdxl is True


@pytest.mark.parametrize(("package", "forbidden"), [("ldm", ["samplers", "sample", "train", "metrics"]),
                                                    ("samplers", ["ldm", "sample", "train", "metrics"])])
def test_lower_layers_import_nothing_from_the_layers_above(package, forbidden):
    code = f"import sys, {package}; print(sorted({{m.split('.')[0] for m in sys.modules}} & {set(forbidden)!r}))"
    root = Path(__file__).resolve().parents[1]
    imported = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert imported.stdout.strip() == "[]"


def test_the_schedule_is_stable_diffusions_scaled_linear_one():
    # Closed form at both ends: ᾱ_0 = 1 − β_start; the betas are squares of evenly spaced roots.
    alphas_cumprod = scaled_linear_alphas_cumprod()
    assert alphas_cumprod.dtype == torch.float64 and alphas_cumprod.shape == (1000,)
    assert alphas_cumprod[0].item() == pytest.approx(1 - 0.00085, rel=1e-12)
    betas = 1 - alphas_cumprod[1:] / alphas_cumprod[:-1]
    torch.testing.assert_close(betas[-1], torch.tensor(0.012, dtype=torch.float64), rtol=1e-9, atol=0)
    roots = betas.sqrt()
    torch.testing.assert_close(roots.diff(), roots.diff().mean().expand(998), rtol=1e-6, atol=0)
    torch.testing.assert_close(ldm.create_model("tiny").alphas_cumprod, alphas_cumprod.float())
