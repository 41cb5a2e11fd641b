"""sample.generate end to end on tiny models: seeds and batches, infotext reproduction, img2img, inpainting (ordinary
and 9-channel models), hires fix, tiling, variation seeds, prompt editing, emphasis, LoRA, embeddings, SDXL."""
import hashlib
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from ldm.model import LatentDiffusion
from ldm.presets import PRESETS, TextEncoderConfig, UNetConfig
from oracles import diffusers_unet
from random_weights import randomize_weights
from sample import GenerationParams, LoadedModel, ParamsError, generate, parse_infotext
from sample.conditioning import PromptEncoder
from sample.embeddings import EmbeddingDatabase
from sample.generate import GenerationError
from sample.lora import LayerIndex, LoraError, load_lora
from sample.models import default_model
from sample.prompts import chunk_prompt, token_count
from sample.rng import ImageNoise, slerp
from sample_helpers import one_thread, random_tiny  # noqa: F401  (autouse fixture)

BASE = dict(prompt="a red circle", negative_prompt="blurry", seed=5, steps=3, width=32, height=32, cfg_scale=5.0)


def run(checkpoint, **overrides):
    return generate(checkpoint, GenerationParams(**{**BASE, **overrides}), progress=False)


def pixels(result, i=0):
    return np.asarray(result.images[i]).astype(np.int16)


@pytest.fixture(scope="module")
def tiny():
    return random_tiny()


@pytest.fixture(scope="module")
def tiny_inpaint():
    preset = replace(PRESETS["tiny"], name="tiny-inpaint", unet=replace(PRESETS["tiny"].unet, in_channels=9))
    torch.manual_seed(0)
    return LoadedModel(randomize_weights(LatentDiffusion(preset).eval(), seed=1), "tiny-inpaint")


@pytest.fixture(scope="module")
def tiny_xl():
    """An SDXL-family model at toy size: two text towers (CLIP-L layout + OpenCLIP with pooled output), vector
    conditioning of pooled (32) + 6 × 256 size embeddings."""
    text = (TextEncoderConfig(width=64, layers=2, heads=2, layer="penultimate", final_norm=False),
            TextEncoderConfig(layout="openclip", width=48, layers=2, heads=2, embed_dim=32, layer="penultimate",
                              final_norm=False, return_pooled=True))
    unet = UNetConfig(model_channels=32, channel_mult=(1, 2), attention_resolutions=(2,), num_heads=None,
                      num_head_channels=16, transformer_depth=(0, 1), context_dim=112,
                      use_linear_in_transformer=True, adm_in_channels=32 + 6 * 256)
    preset = replace(PRESETS["sdxl-base"], name="tiny-xl", unet=unet, vae=PRESETS["tiny"].vae, text=text,
                     resolution=64)
    return LoadedModel(randomize_weights(LatentDiffusion(preset).eval(), seed=2), "tiny-xl")


def remember_weight(store: dict, key: str, attribute: str = "weight"):
    """A forward pre-hook storing the module's weight at its first call (the weight as the job uses it)."""
    def hook(module, args):
        store.setdefault(key, getattr(module, attribute).detach().clone())
    return hook


def first_block_inputs(tower, encode) -> torch.Tensor:
    """The input of the text tower's first transformer block (token + position embeddings) during encode()."""
    blocks = tower.transformer.text_model.encoder.layers if hasattr(tower, "transformer") \
        else tower.model.transformer.resblocks
    seen = []
    handle = blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    try:
        encode()
    finally:
        handle.remove()
    return seen[0]


class UNetCalls:
    """Records the UNet's inputs (x, timesteps, context) at every call while active."""

    def __init__(self, model):
        self.unet, self.calls = model.unet, []

    def __enter__(self):
        def record(module, args, kwargs):
            self.calls.append([a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args])
        self.handle = self.unet.register_forward_pre_hook(record, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


# ----- seeds, batches, reproduction ---------------------------------------------------------------------------------

def test_same_params_and_seed_give_the_same_bytes_and_another_seed_differs(tiny):
    first, second, other = run(tiny), run(tiny), run(tiny, seed=6)
    assert first.images[0].tobytes() == second.images[0].tobytes()
    assert first.infotexts == second.infotexts
    assert np.abs(pixels(first) - pixels(other)).mean() > 1


def test_batch_image_i_uses_seed_plus_i_and_matches_a_single_run(tiny):
    batch = run(tiny, seed=10, batch_count=2, batch_size=2)
    assert batch.seeds == [10, 11, 12, 13]
    assert [parse_infotext(t)["Seed"] for t in batch.infotexts] == ["10", "11", "12", "13"]
    single = run(tiny, seed=13)
    # The same noise and sampler noise per image; only float summation order differs with the batch size.
    assert np.abs(pixels(batch, 3) - pixels(single)).max() <= 2


def test_seed_minus_one_draws_a_seed_that_reproduces_the_image(tiny):
    drawn = run(tiny, seed=-1, subseed=-1)
    seed = drawn.params.seed
    assert 0 <= seed < 4294967294 and drawn.seeds == [seed]
    assert parse_infotext(drawn.infotexts[0])["Seed"] == str(seed)
    assert run(tiny, seed=seed).images[0].tobytes() == drawn.images[0].tobytes()


def test_infotext_reproduces_the_image_bitwise(tiny):
    original = run(tiny, prompt="a (red:1.3) [circle:square:1], white background", negative_prompt="blurry, [ugly]",
                   sampler_name="DPM++ 2M Karras", cfg_scale=5.5, clip_skip=2, subseed=77, subseed_strength=0.25,
                   steps=4)
    infotext = original.infotexts[0]
    fields = parse_infotext(infotext)
    assert (fields["Sampler"], fields["Schedule type"], fields["Clip skip"], fields["Variation seed"]) == \
        ("DPM++ 2M", "Karras", "2", "77")
    again = generate(tiny, infotext, progress=False)
    assert again.images[0].tobytes() == original.images[0].tobytes()
    assert again.infotexts == [infotext]


def test_variation_seed_blends_towards_the_subseed_noise(tiny):
    plain_1, plain_2 = run(tiny, seed=1, sampler_name="Euler"), run(tiny, seed=2, sampler_name="Euler")
    full = run(tiny, seed=1, subseed=2, subseed_strength=1.0, sampler_name="Euler")
    none = run(tiny, seed=1, subseed=2, subseed_strength=0.0, sampler_name="Euler")
    half = run(tiny, seed=1, subseed=2, subseed_strength=0.5, sampler_name="Euler")
    assert np.abs(pixels(full) - pixels(plain_2)).max() <= 1
    assert none.images[0].tobytes() == plain_1.images[0].tobytes()
    assert "Variation seed" not in none.infotexts[0]
    assert np.abs(pixels(half) - pixels(plain_1)).mean() > 1 and np.abs(pixels(half) - pixels(plain_2)).mean() > 1
    # With a variation seed every image of the job keeps the seed and the variation seed advances (A1111).
    batch = run(tiny, seed=1, subseed=2, subseed_strength=0.5, batch_size=2)
    assert batch.seeds == [1, 1] and batch.subseeds == [2, 3]


def test_generation_leaves_pytorchs_global_random_state_alone(tiny):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    default_model()
    run(tiny, sampler_name="DPM++ SDE")  # a Brownian-noise sampler
    run(tiny, init_images=[INIT], sampler_name="Euler a")
    assert torch.equal(torch.rand(3), expected)


def test_noise_is_a1111s_per_seed_draw_with_slerp_and_centred_seed_resize():
    noise = ImageNoise((4, 8, 8), [3, 4]).first()
    assert torch.equal(noise[1], torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(4)))
    a, b = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(3)), noise[1]
    assert torch.allclose(slerp(0.0, a, b), a, atol=1e-6) and torch.allclose(slerp(1.0, a, b), b, atol=1e-6)
    # The seed's 8x8 noise drawn at its own size sits in the middle of a 12x12 latent.
    resized = ImageNoise((4, 12, 12), [3], seed_resize_from=(8, 8)).first()[0]
    assert torch.equal(resized[:, 2:10, 2:10], a)
    # Sampler noise continues the image's generator.
    stream = ImageNoise((4, 8, 8), [3])
    stream.first()
    generator = torch.Generator().manual_seed(3)
    torch.randn(4, 8, 8, generator=generator)
    assert torch.equal(stream.next()[0], torch.randn(4, 8, 8, generator=generator))


# ----- img2img and inpainting ---------------------------------------------------------------------------------------

INIT = Image.new("RGB", (32, 32), (200, 40, 40))
MASK = Image.new("L", (32, 32), 0)
MASK.paste(255, (8, 8, 24, 24))


def test_img2img_runs_strength_times_steps_plus_one_steps(tiny):
    with UNetCalls(tiny.model) as calls:
        result = run(tiny, init_images=[INIT], denoising_strength=0.45, steps=10, sampler_name="Euler")
    assert len(calls.calls) == int(0.45 * 10) + 1
    assert parse_infotext(result.infotexts[0])["Denoising strength"] == "0.45"
    assert result.images[0].size == (32, 32)


def test_img2img_size_defaults_to_the_init_image_rounded_to_8(tiny):
    result = run(tiny, init_images=[Image.new("RGB", (44, 37), "white")], width=None, height=None, steps=2)
    assert result.images[0].size == (40, 32) and result.params.width == 40


def test_inpainting_keeps_the_original_outside_the_mask(tiny):
    result = run(tiny, init_images=[INIT], mask=MASK, mask_blur=0, steps=3)
    out = pixels(result)
    outside = np.asarray(MASK) == 0
    assert (out[outside] == (200, 40, 40)).all()
    assert np.abs(out[~outside] - (200, 40, 40)).mean() > 5
    assert parse_infotext(result.infotexts[0])["Mask blur"] == "0"


def test_only_masked_inpainting_changes_nothing_outside_the_crop(tiny):
    init = Image.new("RGB", (64, 64), (30, 120, 200))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (40, 40, 48, 48))
    result = run(tiny, init_images=[init], mask=mask, mask_blur=0, inpaint_full_res=True,
                 inpaint_full_res_padding=4, inpainting_fill=2)
    out = pixels(result)
    assert out.shape == (64, 64, 3)
    assert (out[:36] == (30, 120, 200)).all() and (out[:, :36] == (30, 120, 200)).all()
    assert np.abs(out[40:48, 40:48] - (30, 120, 200)).mean() > 5
    fields = parse_infotext(result.infotexts[0])
    assert (fields["Inpaint area"], fields["Masked area padding"], fields["Masked content"]) == \
        ("Only masked", "4", "latent noise")


def test_inpainting_model_is_conditioned_on_the_mask_and_the_masked_image(tiny_inpaint):
    def first_call(weight):
        with UNetCalls(tiny_inpaint.model) as calls:
            result = run(tiny_inpaint, init_images=[INIT], mask=MASK, mask_blur=0, inpainting_mask_weight=weight,
                         denoising_strength=1.0, steps=2, sampler_name="Euler")
        return calls.calls[0][0], result

    x_full, result = first_call(1.0)
    x_none, _ = first_call(0.0)
    assert x_full.shape[1] == 9
    expected_mask = torch.zeros(16, 16)
    expected_mask[4:12, 4:12] = 1
    assert torch.equal(x_full[0, 4], expected_mask)  # latent-size mask, one per CFG row
    # Weight 1 blanks the masked area of the conditioning image, weight 0 keeps the whole image: the latents differ.
    assert not torch.allclose(x_full[0, 5:], x_none[0, 5:])
    assert parse_infotext(result.infotexts[0])["Conditional mask weight"] == "1"
    txt2img = run(tiny_inpaint, steps=2)
    assert txt2img.images[0].size == (32, 32)


# ----- hires fix, tiling --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("upscaler", ["Latent", "Lanczos"])
def test_hires_fix_runs_a_second_pass_at_the_upscaled_size(tiny, upscaler):
    with UNetCalls(tiny.model) as calls:
        result = run(tiny, enable_hr=True, hr_scale=2, hr_upscaler=upscaler, hr_second_pass_steps=2,
                     hr_denoising_strength=0.6, sampler_name="Euler")
    sizes = [tuple(call[0].shape[-2:]) for call in calls.calls]
    assert sizes == [(16, 16)] * 3 + [(32, 32)] * 2
    assert result.images[0].size == (64, 64)
    fields = parse_infotext(result.infotexts[0])
    assert (fields["Size-1"], fields["Hires upscale"], fields["Hires steps"], fields["Hires upscaler"],
            fields["Denoising strength"]) == ("32", "2", "2", upscaler, "0.6")


def test_tiling_pads_every_convolution_circularly_during_the_job_only(tiny):
    conv = tiny.model.unet.input_blocks[0][0]
    seen = []
    handle = conv.register_forward_pre_hook(lambda module, args: seen.append(module.padding_mode))
    try:
        tiled = run(tiny, tiling=True)
    finally:
        handle.remove()
    assert set(seen) == {"circular"} and conv.padding_mode == "zeros"
    assert tiny.model.vae.decoder.conv_out.padding_mode == "zeros"
    assert np.abs(pixels(tiled) - pixels(run(tiny))).mean() > 1
    assert parse_infotext(tiled.infotexts[0])["Tiling"] == "True"


# ----- prompts and conditioning -------------------------------------------------------------------------------------

def test_prompt_editing_switches_the_conditioning_after_its_step(tiny):
    encoder = PromptEncoder(tiny.model)
    with UNetCalls(tiny.model) as calls:
        run(tiny, prompt="[a red circle:a blue square:1]", steps=4, sampler_name="Euler")
    first, second = (encoder.encode([t])["context"][0] for t in ("a red circle", "a blue square"))
    conds = [call[2][0] for call in calls.calls]  # row 0 of each CFG batch is the prompt
    # A1111 uses the first prompt while the 0-based step is <= 1.
    assert [torch.equal(c, first) for c in conds] == [True, True, False, False]
    assert all(torch.equal(c, second) for c in conds[2:])


def test_unweighted_prompt_encodes_exactly_as_the_model_does(tiny):
    encoder = PromptEncoder(tiny.model)
    with torch.no_grad():
        expected = tiny.model.encode_prompt(["a red circle"])["context"]
    assert torch.equal(encoder.encode(["a red circle"])["context"], expected)


def test_emphasis_weights_token_outputs_and_restores_the_mean(tiny):
    encoder = PromptEncoder(tiny.model)
    (chunk,), _ = chunk_prompt("a (red:1.5) [circle]", encoder.tokenizer)
    with torch.no_grad():
        z = tiny.model.cond_stage_model.encode_tokens(torch.tensor([chunk.tokens]))
    weights = torch.tensor(chunk.weights)[None, :, None]
    expected = z * weights * (z.mean() / (z * weights).mean())
    torch.testing.assert_close(encoder.encode(["a (red:1.5) [circle]"])["context"], expected, rtol=1e-6, atol=1e-6)


def test_long_prompt_is_encoded_in_chunks_of_77(tiny):
    encoder = PromptEncoder(tiny.model)
    long_prompt = ", ".join(["a red circle"] * 30)
    context = encoder.encode([long_prompt])["context"]
    assert context.shape == (1, 2 * 77, 64)
    result = run(tiny, prompt=long_prompt, steps=2)
    assert result.images[0].size == (32, 32)


def test_sdxl_conditioning_has_size_vector_and_zero_empty_negative(tiny_xl):
    model = tiny_xl.model
    encoder = PromptEncoder(model)
    encoded = encoder.encode(["a red circle"], size=(48, 32))
    with torch.no_grad():
        expected = model.encode_prompt(["a red circle"], original_size=(48, 32), crop_coords_top_left=(0, 0),
                                       target_size=(48, 32))
    torch.testing.assert_close(encoded["context"], expected["context"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(encoded["y"], expected["y"], rtol=1e-6, atol=1e-6)
    negative = encoder.encode([""], size=(48, 32), is_negative=True)
    assert not negative["context"].any() and not negative["y"][:, :32].any()
    result = run(tiny_xl, negative_prompt="", width=32, height=48, steps=2)
    assert result.images[0].size == (32, 48)


# ----- LoRA ---------------------------------------------------------------------------------------------------------

def _lora_file(path, layers: dict[str, tuple], seed=0, alpha=1.0):
    """A kohya file: name -> (weight shape) with random rank-2 down/up."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in layers.items():
        out_features, in_features, *kernel = shape
        state[f"{name}.lora_down.weight"] = torch.randn(2, in_features, *kernel, generator=generator)
        state[f"{name}.lora_up.weight"] = torch.randn(out_features, 2, *([1, 1] if kernel else []),
                                                      generator=generator)
        state[f"{name}.alpha"] = torch.tensor(alpha)
    save_file(state, str(path))
    return state


def test_lora_is_merged_for_the_job_and_the_weights_come_back_unchanged(tiny, tmp_path):
    unet = tiny.model.unet
    attention = unet.input_blocks[4][1].transformer_blocks[0].attn2.to_k
    conv = unet.input_blocks[1][0].in_layers[2]
    q_proj = tiny.model.cond_stage_model.transformer.text_model.encoder.layers[0].self_attn.q_proj
    state = _lora_file(tmp_path / "style.safetensors", {
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k": tuple(attention.weight.shape),
        "lora_unet_down_blocks_0_resnets_0_conv1": tuple(conv.weight.shape),  # diffusers name, LoCon 3x3
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj": tuple(q_proj.weight.shape),
    })
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    seen = {}
    hooks = [m.register_forward_pre_hook(remember_weight(seen, key))
             for key, m in (("attention", attention), ("conv", conv), ("q", q_proj))]
    try:
        result = generate(tiny, GenerationParams(**{**BASE, "prompt": "a red circle <lora:style:0.5:0.7>"}),
                          progress=False, lora_dir=tmp_path)
    finally:
        for hook in hooks:
            hook.remove()
    name = "lora_unet_down_blocks_0_resnets_0_conv1"
    conv_delta = (state[f"{name}.lora_up.weight"].flatten(1) @ state[f"{name}.lora_down.weight"].flatten(1))
    torch.testing.assert_close(seen["conv"], before["model.diffusion_model.input_blocks.1.0.in_layers.2.weight"]
                               + 0.7 * 0.5 * conv_delta.reshape(conv.weight.shape), rtol=1e-5, atol=1e-5)
    name = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    q_delta = state[f"{name}.lora_up.weight"] @ state[f"{name}.lora_down.weight"]
    torch.testing.assert_close(seen["q"], before["cond_stage_model.transformer.text_model.encoder.layers.0.self_attn."
                                                 "q_proj.weight"] + 0.5 * 0.5 * q_delta, rtol=1e-5, atol=1e-5)
    after = tiny.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with open(tmp_path / "style.safetensors", "rb") as file:
        header = int.from_bytes(file.read(8), "little")
        file.seek(8 + header)
        kohya_hash = hashlib.sha256(file.read()).hexdigest()[:12]
    assert parse_infotext(result.infotexts[0])["Lora hashes"] == f"style: {kohya_hash}"
    plain = run(tiny)
    assert np.abs(pixels(result) - pixels(plain)).mean() > 1
    zero = generate(tiny, GenerationParams(**{**BASE, "prompt": "a red circle <lora:style:0>"}), progress=False,
                    lora_dir=tmp_path)
    assert zero.images[0].tobytes() == plain.images[0].tobytes()


def test_unknown_lora_is_a_warning_naming_it_and_the_tag_is_ignored(tiny, tmp_path):
    with pytest.warns(UserWarning, match="LoRA not found: nowhere"):
        result = generate(tiny, GenerationParams(**{**BASE, "prompt": "a red circle <lora:nowhere:1>"}),
                          progress=False, lora_dir=tmp_path)
    assert any("nowhere" in w for w in result.warnings)
    assert result.images[0].tobytes() == run(tiny).images[0].tobytes()


def test_diffusers_lora_names_reach_the_layers_diffusers_converter_maps(tiny):
    """Every layer of diffusers' SD UNet, named as kohya writes SD1 LoRAs, resolves to our module holding the same
    tensor according to diffusers' own checkpoint converter."""
    model = tiny.model
    state = {"model.diffusion_model." + k: v for k, v in model.unet.state_dict().items()}
    _, converted = diffusers_unet(model.preset.unet, model.preset.vae, state)
    index = LayerIndex(model)
    by_storage = {p.data_ptr(): m for m in model.unet.modules() for p in m.parameters(recurse=False)}
    checked = 0
    for key, tensor in converted.items():
        if not key.endswith(".weight") or tensor.ndim < 2:
            continue
        target = index.resolve("lora_unet_" + key[:-len(".weight")].replace(".", "_"))
        assert target is not None, key
        assert target.module is by_storage[tensor.data_ptr()] or torch.equal(target.module.weight, tensor), key
        checked += 1
    assert checked > 40


def test_sdxl_lora_updates_the_packed_openclip_projection_and_clip_l(tiny_xl, tmp_path):
    model = tiny_xl.model
    attention = model.conditioner.embedders[1].model.transformer.resblocks[1].attn
    clip_l = model.conditioner.embedders[0].transformer.text_model.encoder.layers[0].mlp.fc1
    width = attention.in_proj_weight.shape[1]
    _lora_file(tmp_path / "xl.safetensors", {
        "lora_te2_text_model_encoder_layers_1_self_attn_k_proj": (width, width),
        "lora_te1_text_model_encoder_layers_0_mlp_fc1": tuple(clip_l.weight.shape)})
    original = attention.in_proj_weight.detach().clone()
    seen = {}
    handle = attention.register_forward_pre_hook(remember_weight(seen, "w", "in_proj_weight"))
    try:
        generate(tiny_xl, GenerationParams(**{**BASE, "prompt": "a <lora:xl:1>"}), progress=False, lora_dir=tmp_path)
    finally:
        handle.remove()
    changed = (seen["w"] != original).any(dim=1)
    assert changed[width:2 * width].all() and not changed[:width].any() and not changed[2 * width:].any()
    assert torch.equal(attention.in_proj_weight, original)


def test_lora_file_of_another_adapter_type_is_refused(tmp_path):
    save_file({"lora_unet_x.hada_w1_a": torch.zeros(2, 2)}, str(tmp_path / "loha.safetensors"))
    with pytest.raises(ValueError, match="LoHa"):
        load_lora(tmp_path / "loha.safetensors")


# ----- embeddings ---------------------------------------------------------------------------------------------------

def test_embedding_vectors_replace_its_name_in_the_prompt(tiny, tmp_path):
    vectors = torch.randn(2, 64, generator=torch.Generator().manual_seed(3))
    torch.save({"string_to_param": {"*": vectors}, "name": "shiny", "step": 100}, tmp_path / "shinything.pt")
    database = EmbeddingDatabase.from_directory(tmp_path).compatible_with([64])
    tokenizer = database.tokenizer
    assert token_count("a shinything circle", tokenizer=tokenizer, embeddings=database) == (4, 75)
    text_model = tiny.model.cond_stage_model.transformer.text_model
    inputs = first_block_inputs(tiny.model.cond_stage_model, lambda: PromptEncoder(tiny.model, database).encode(
        ["a shinything circle"]))
    placed = inputs[0, 2:4] - text_model.embeddings.position_embedding.weight[2:4]  # after BOS and "a"
    torch.testing.assert_close(placed, vectors, rtol=0, atol=1e-6)
    result = generate(tiny, GenerationParams(**{**BASE, "prompt": "a shinything circle"}), progress=False,
                      embeddings=str(tmp_path))
    file_hash = hashlib.sha256((tmp_path / "shinything.pt").read_bytes()).hexdigest()[:12]
    assert parse_infotext(result.infotexts[0])["TI hashes"] == f"shinything: {file_hash}"


def test_sdxl_embedding_gives_each_tower_its_own_vectors(tiny_xl, tmp_path):
    vectors = {"clip_l": torch.randn(1, 64), "clip_g": torch.randn(1, 48)}
    save_file(vectors, str(tmp_path / "xlemb.safetensors"))
    save_file({"emb_params": torch.randn(1, 768)}, str(tmp_path / "sd1emb.safetensors"))
    database = EmbeddingDatabase.from_directory(tmp_path).compatible_with([64, 48])
    assert sorted(database.embeddings) == ["xlemb"] and database.skipped == ["sd1emb"]
    towers = tiny_xl.model.conditioner.embedders
    encode = lambda: PromptEncoder(tiny_xl.model, database).encode(["xlemb"], size=(32, 32))  # noqa: E731
    clip_l = first_block_inputs(towers[0], encode)[0, 1] - \
        towers[0].transformer.text_model.embeddings.position_embedding.weight[1]
    clip_g = first_block_inputs(towers[1], encode)[0, 1] - towers[1].model.positional_embedding[1]
    torch.testing.assert_close(clip_l, vectors["clip_l"][0], rtol=0, atol=1e-6)
    torch.testing.assert_close(clip_g, vectors["clip_g"][0], rtol=0, atol=1e-6)


def _bundled_lora(folder, name: str, word: str, vectors: torch.Tensor, tiny) -> None:
    """A LoRA file on one cross-attention layer that bundles the embedding `word` (A1111's bundle_emb keys)."""
    attention = tiny.model.unet.input_blocks[4][1].transformer_blocks[0].attn2.to_k
    folder.mkdir(exist_ok=True)
    state = _lora_file(folder / f"{name}.safetensors",
                       {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k": tuple(attention.weight.shape)})
    save_file({**state, f"bundle_emb.{word}.emb_params": vectors}, str(folder / f"{name}.safetensors"))


def test_embedding_bundled_in_a_lora_draws_what_the_same_vectors_from_the_embeddings_folder_draw(tiny, tmp_path):
    vectors = torch.randn(2, 64, generator=torch.Generator().manual_seed(4))
    _bundled_lora(tmp_path / "bundled", "concept", "shinything", vectors, tiny)
    assert [e.name for e in load_lora(tmp_path / "bundled" / "concept.safetensors").embeddings] == ["shinything"]
    # The same adapters without the bundle, and the vectors as their own embedding file.
    (tmp_path / "plain").mkdir()
    (tmp_path / "embeddings").mkdir()
    state = load_file(str(tmp_path / "bundled" / "concept.safetensors"))
    save_file({k: v for k, v in state.items() if not k.startswith("bundle_emb.")},
              str(tmp_path / "plain" / "concept.safetensors"))
    save_file({"emb_params": vectors}, str(tmp_path / "embeddings" / "shinything.safetensors"))
    prompt = "a shinything circle <lora:concept:1>"
    bundled = generate(tiny, GenerationParams(**{**BASE, "prompt": prompt}), progress=False,
                       lora_dir=tmp_path / "bundled")
    separate = generate(tiny, GenerationParams(**{**BASE, "prompt": prompt}), progress=False,
                        lora_dir=tmp_path / "plain", embeddings=str(tmp_path / "embeddings"))
    assert bundled.images[0].tobytes() == separate.images[0].tobytes()
    # Without the LoRA the word is an ordinary word again.
    alone = generate(tiny, GenerationParams(**{**BASE, "prompt": "a shinything circle"}), progress=False,
                     lora_dir=tmp_path / "bundled")
    assert alone.images[0].tobytes() != bundled.images[0].tobytes()


def test_an_embeddings_folder_entry_wins_over_a_bundled_one_of_the_same_name(tiny, tmp_path):
    _bundled_lora(tmp_path / "loras", "concept", "shinything", torch.randn(1, 64), tiny)
    (tmp_path / "embeddings").mkdir()
    save_file({"emb_params": torch.randn(1, 64)}, str(tmp_path / "embeddings" / "shinything.safetensors"))
    state = load_file(str(tmp_path / "loras" / "concept.safetensors"))
    (tmp_path / "plain").mkdir()
    save_file({k: v for k, v in state.items() if not k.startswith("bundle_emb.")},
              str(tmp_path / "plain" / "concept.safetensors"))
    prompt = "a shinything circle <lora:concept:1>"
    with pytest.warns(UserWarning, match="bundled in LoRA concept skipped"):
        both = generate(tiny, GenerationParams(**{**BASE, "prompt": prompt}), progress=False,
                        lora_dir=tmp_path / "loras", embeddings=str(tmp_path / "embeddings"))
    folder = generate(tiny, GenerationParams(**{**BASE, "prompt": prompt}), progress=False,
                      lora_dir=tmp_path / "plain", embeddings=str(tmp_path / "embeddings"))
    assert both.images[0].tobytes() == folder.images[0].tobytes()


@pytest.mark.parametrize("key", ["bundle_emb.shinything", "bundle_emb..emb_params"])
def test_a_malformed_bundled_embedding_key_is_refused_naming_it(tmp_path, key):
    save_file({key: torch.zeros(1, 64)}, str(tmp_path / "odd.safetensors"))
    with pytest.raises(LoraError, match="bundled embedding key"):
        load_lora(tmp_path / "odd.safetensors")


# ----- VAE override, samplers' options, prediction type -------------------------------------------------------------

def test_vae_file_replaces_the_checkpoints_vae_for_the_job_only(tiny, tmp_path):
    other = randomize_weights(LatentDiffusion(tiny.model.preset).first_stage_model, seed=9)
    state = {k: v.clone() for k, v in other.state_dict().items()}
    state["loss.logvar"] = torch.zeros(())  # training-only keys in VAE files are ignored
    save_file(state, str(tmp_path / "other-vae.safetensors"))
    own_vae = tiny.model.first_stage_model
    result = run(tiny, vae=str(tmp_path / "other-vae.safetensors"))
    assert tiny.model.first_stage_model is own_vae
    fields = parse_infotext(result.infotexts[0])
    file_hash = hashlib.sha256((tmp_path / "other-vae.safetensors").read_bytes()).hexdigest()[:10]
    assert (fields["VAE"], fields["VAE hash"]) == ("other-vae.safetensors", file_hash)
    swapped = LoadedModel(tiny.model, tiny.name)
    try:
        tiny.model.first_stage_model = other
        expected = run(swapped)
    finally:
        tiny.model.first_stage_model = own_vae
    assert result.images[0].tobytes() == expected.images[0].tobytes()


def test_eta_is_recorded_under_a1111s_key_only_when_not_the_default(tiny):
    assert "Eta" not in run(tiny, eta=1.0).infotexts[0]
    assert parse_infotext(run(tiny, eta=0.5).infotexts[0])["Eta"] == "0.5"
    assert parse_infotext(run(tiny, sampler_name="DDIM", eta=0.3).infotexts[0])["Eta DDIM"] == "0.3"
    assert run(tiny, eta=0.0).images[0].tobytes() == run(tiny, sampler_name="Euler").images[0].tobytes()


def test_gpu_rng_source_on_a_cpu_only_machine_draws_the_cpu_numbers(tiny):
    gpu, cpu = run(tiny, rng="GPU"), run(tiny, rng="CPU")
    assert gpu.images[0].tobytes() == cpu.images[0].tobytes()
    assert "RNG:" not in gpu.infotexts[0] and "RNG: CPU" in cpu.infotexts[0]


def test_v_prediction_models_are_sampled_through_the_v_denoiser(tiny, monkeypatch):
    eps = run(tiny, sampler_name="Euler")
    monkeypatch.setattr(tiny.model, "preset", replace(tiny.model.preset, prediction="v"))
    v = run(tiny, sampler_name="Euler")
    assert np.abs(pixels(v) - pixels(eps)).mean() > 1


# ----- failures -----------------------------------------------------------------------------------------------------

def test_nan_from_the_unet_is_reported_with_its_likely_cause(tiny):
    handle = tiny.model.unet.register_forward_hook(lambda module, args, out: out * float("nan"))
    try:
        with pytest.raises(GenerationError, match="NaN/inf latents.*float32"):
            run(tiny)
    finally:
        handle.remove()


def test_restore_faces_without_weights_fails_clearly(tiny):
    with pytest.raises(ParamsError, match="Restore faces needs face-restoration weights"):
        run(tiny, restore_faces=True)


@pytest.mark.parametrize("overrides, message", [
    (dict(steps=0), "steps must be an integer >= 1"),
    (dict(width=30), "width must be a positive multiple of 8"),
    (dict(sampler_name="Euler z"), "unknown sampler 'Euler z'; valid: Euler a, Euler,"),
    (dict(scheduler="Wavy"), "unknown schedule type 'Wavy'; valid: Automatic,"),
    (dict(cfg_scale="7"), "cfg_scale must be a number"),
    (dict(denoising_strength=1.5), "denoising_strength must be in"),
    (dict(mask=MASK), "a mask needs an init image"),
    (dict(vae="/no/such/vae.safetensors"), "VAE file not found"),
    (dict(seed=2 ** 40), "seed must be -1"),
])
def test_bad_parameters_are_rejected_with_the_reason(tiny, overrides, message):
    with pytest.raises(ParamsError, match=message.replace("(", r"\(")):
        run(tiny, **overrides)


def test_untrained_model_with_zero_mean_text_outputs_generates_finite_images(tmp_path):
    """A freshly created model (LayerNorm bias 0, so every text output averages exactly 0) once made the emphasis
    rescale divide 0 by 0 for an empty negative prompt and the whole image NaN."""
    import ldm
    from sample import load_checkpoint
    torch.manual_seed(0)
    ldm.save_model(ldm.create_model("tiny"), tmp_path / "fresh.safetensors")
    result = generate(load_checkpoint(tmp_path / "fresh.safetensors"),
                      GenerationParams(prompt="a red circle", seed=3, steps=2, width=64, height=64), progress=False)
    assert result.images[0].size == (64, 64)
