"""The public API: create_model / load_model / save_model / detect on files made here."""
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

import ldm
from ldm.checkpoint import _ema_key
from ldm.presets import PRESETS, detect
from random_weights import randomize_weights


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return randomize_weights(ldm.create_model("tiny"))


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def test_save_load_round_trip_is_bitwise_with_same_hash(tiny, tmp_path):
    path = tmp_path / "tiny.safetensors"
    ldm.save_model(tiny, path)
    loaded = ldm.load_model(path)
    assert loaded.preset == tiny.preset  # head layout restored from metadata, the rest from shapes
    assert_same_weights(tiny, loaded)
    again = tmp_path / "again.safetensors"
    ldm.save_model(loaded, again)
    assert ldm.model_hash(path) == ldm.model_hash(again)
    assert len(ldm.model_hash(path)) == 10


def test_loaded_model_computes_what_the_saved_one_did(tiny, tmp_path):
    path = tmp_path / "tiny.safetensors"
    ldm.save_model(tiny, path)
    loaded = ldm.load_model(path)
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500.0])
    with torch.no_grad():
        cond = tiny.encode_prompt(["a red circle"])
        torch.testing.assert_close(loaded.encode_prompt(["a red circle"])["context"], cond["context"],
                                   atol=0, rtol=0)
        torch.testing.assert_close(loaded.apply_model(x, t, **cond), tiny.apply_model(x, t, **cond), atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_load_to_dtype_keeps_schedule_in_fp32(tiny, tmp_path, dtype):
    """bfloat16 would round ᾱ_0 = 0.99915 to 1.0 (sigma_min 0, NaN timesteps in sampling): the schedule is read at
    its stored precision from a file and from a state dict alike."""
    path = tmp_path / "tiny.safetensors"
    ldm.save_model(tiny, path)
    for source in (path, tiny.state_dict()):
        half = ldm.load_model(source, dtype=dtype)
        assert half.dtype == dtype and half.vae.dtype == dtype
        assert half.alphas_cumprod.dtype == torch.float32
        torch.testing.assert_close(half.alphas_cumprod, tiny.alphas_cumprod, atol=0, rtol=0)


def test_create_on_meta_allocates_nothing_for_every_preset():
    for name in PRESETS:
        model = ldm.create_model(name, device="meta")
        assert all(t.is_meta for t in model.state_dict().values())
        assert model.preset.name == name


@pytest.mark.parametrize("name", ["sd15", "sd15-inpaint", "sd21", "sdxl-base"])
def test_detect_reads_each_full_size_preset_off_its_shapes(name):
    state = ldm.create_model(name, device="meta").state_dict()
    assert detect(state) == PRESETS[name]


def test_sd21_base_weights_detect_as_sd21_and_prediction_can_be_overridden():
    state = ldm.create_model("sd21-base", device="meta").state_dict()
    assert detect(state).name == "sd21"


def test_lightning_ckpt_with_ema_and_original_buffers_loads(tiny, tmp_path):
    """A file as CompVis training writes it: {'state_dict': …, 'global_step': …}, EMA copy, DDPM buffers,
    transformers' position_ids."""
    state = {k: v.clone() for k, v in tiny.state_dict().items()}
    ema = {}
    for k, v in state.items():
        if k.startswith("model.diffusion_model."):
            ema[_ema_key(k)] = v + 1
    extra = {"betas": torch.rand(1000), "posterior_variance": torch.rand(1000),
             "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None],
             "model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(10)}
    path = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": {**state, **ema, **extra}, "global_step": 1234, "epoch": 3}, path)

    plain = ldm.load_model(path, prediction="eps")
    # heads are not in the file (no metadata in a .ckpt): the CLIP convention (64-wide heads) gives 1 head here.
    assert plain.preset.text[0].heads == 1 and plain.preset.unet.num_heads == 8
    torch.testing.assert_close(plain.unet.time_embed[0].weight, tiny.unet.time_embed[0].weight, atol=0, rtol=0)
    with_ema = ldm.load_model(path, ema=True)
    torch.testing.assert_close(with_ema.unet.time_embed[0].weight, tiny.unet.time_embed[0].weight + 1,
                               atol=0, rtol=0)
    torch.testing.assert_close(with_ema.vae.quant_conv.weight, tiny.vae.quant_conv.weight, atol=0, rtol=0)


def test_missing_and_unexpected_keys_are_listed(tiny, tmp_path):
    state = {k: v.contiguous() for k, v in tiny.state_dict().items()}
    del state["model.diffusion_model.out.2.bias"]
    state["model.diffusion_model.surprise.weight"] = torch.zeros(1)
    path = tmp_path / "broken.safetensors"
    save_file(state, str(path))
    with pytest.raises(ldm.CheckpointError) as err:
        ldm.load_model(path)
    message = str(err.value)
    assert "broken.safetensors" in message
    assert "model.diffusion_model.out.2.bias" in message and "model.diffusion_model.surprise.weight" in message


def test_unknown_architecture_reports_prefixes(tmp_path):
    path = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down_blocks_0.lora_down.weight": torch.zeros(4, 4)}, str(path))
    with pytest.raises(ldm.CheckpointError, match=r"lora\.safetensors.*lora_unet_down_blocks_0\.lora_down"):
        ldm.load_model(path)


def test_file_schedule_is_kept_when_it_differs(tiny, tmp_path):
    """Zero-terminal-SNR and other fine-tunes ship their own ᾱ; it must survive save/load."""
    custom = tiny.alphas_cumprod.clone()
    custom[-1] = 1e-8
    state = {**tiny.state_dict(), "alphas_cumprod": custom}
    model = ldm.load_model(state)
    torch.testing.assert_close(model.alphas_cumprod, custom, atol=0, rtol=0)
    path = tmp_path / "ztsnr.safetensors"
    ldm.save_model(model, path)
    torch.testing.assert_close(ldm.load_model(path, dtype=torch.bfloat16).alphas_cumprod, custom, atol=0, rtol=0)


def test_sd2_prediction_probe_follows_the_unet_output(monkeypatch):
    """A1111's probe: mean(unet(0.5, t=999) - 0.5) < -1 means v-prediction."""
    from ldm import guess_sd2_prediction
    model = ldm.create_model("tiny")
    monkeypatch.setattr(model.model.diffusion_model, "forward", lambda x, t, c, y=None: x - 2)
    assert guess_sd2_prediction(model) == "v"
    monkeypatch.setattr(model.model.diffusion_model, "forward", lambda x, t, c, y=None: x * 0.9)
    assert guess_sd2_prediction(model) == "eps"


def test_create_model_rejects_unknown_preset():
    with pytest.raises(ValueError, match="sd15.*tiny"):
        ldm.create_model("sd3")


def test_sdxl_conditioning_has_2048_context_and_2816_vector_on_meta():
    model = ldm.create_model("sdxl-base", device="meta")
    tokens = torch.zeros(1, 77, dtype=torch.long, device="meta")
    context, pooled = model.conditioner.encode_tokens(tokens, tokens)
    y = model.conditioner.vector(pooled, (1024, 1024), (0, 0), (1024, 1024))
    assert context.shape == (1, 77, 2048) and y.shape == (1, model.preset.unet.adm_in_channels)


def test_save_in_half_precision_halves_the_file(tiny, tmp_path):
    full, half = tmp_path / "full.safetensors", tmp_path / "half.safetensors"
    ldm.save_model(tiny, full)
    ldm.save_model(tiny, half, dtype=torch.float16)
    loaded = ldm.load_model(half)
    assert loaded.dtype == torch.float16 and loaded.alphas_cumprod.dtype == torch.float32
    assert half.stat().st_size < 0.6 * full.stat().st_size
    assert replace(loaded.preset) == tiny.preset


def test_scale_factor_prediction_and_resolution_survive_save_and_load(tmp_path):
    """A from-scratch VAE has its own latent scale, a v-model its own target, a small model its own image size (the
    default for generation): all are recorded in the file."""
    model = ldm.create_model("tiny")
    model.scale_factor = 0.5
    model.preset = replace(model.preset, prediction="v", resolution=96)
    path = tmp_path / "custom.safetensors"
    ldm.save_model(model, path)
    loaded = ldm.load_model(path)
    assert loaded.scale_factor == 0.5 and loaded.parameterization == "v" and loaded.preset.resolution == 96
    assert ldm.load_model(path, prediction="eps").parameterization == "eps"
