"""Shared by the tests of the `sample` package (and `python -m benchmarks.txt2img`): the one-thread fixture, a seeded
random `tiny` model, and diffusers' StableDiffusionPipeline built from one of our SD1-family models."""
import contextlib
import os

import pytest
import torch

import ldm
from ldm.tokenizer import BOS, EOS
from random_weights import randomize_weights
from tokenizer_oracles import hf_clip_tokenizer
from sample.models import LoadedModel


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run on one CPU thread, as `python -m sample.txt2img` runs them: their operations are too small to
    gain from threads, and on a shared machine two threads waiting on each other were 50x slower. The previous
    setting is restored for the modules that follow."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def random_tiny() -> LoadedModel:
    """The `tiny` preset with seeded random weights, every layer non-zero so the prompt changes the image: a model
    whose behaviour owes nothing to training, fast enough for many small jobs (32×32 images are 16×16 latents)."""
    with torch.random.fork_rng(devices=[]):  # building draws PyTorch's default init: keep the caller's RNG state
        model = ldm.create_model("tiny")
    return LoadedModel(randomize_weights(model, seed=0), "tiny-random")


def diffusers_pipeline(model):
    """diffusers' StableDiffusionPipeline (Euler, "linspace" timesteps) with `model`'s weights, converted by
    diffusers' and transformers' own code; no safety checker."""
    import diffusers
    import transformers
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint

    from oracles import diffusers_unet, diffusers_vae
    state = model.state_dict()
    preset = model.preset
    unet, unet_weights = diffusers_unet(preset.unet, preset.vae, {k: v for k, v in state.items()
                                                                  if k.startswith("model.diffusion_model.")})
    unet.load_state_dict(unet_weights, strict=True)
    vae, vae_weights = diffusers_vae(preset.unet, preset.vae, {k: v for k, v in state.items()
                                                               if k.startswith("first_stage_model.")})
    vae.load_state_dict(vae_weights, strict=True)
    vae.register_to_config(scaling_factor=model.scale_factor)
    (text,) = preset.text
    config = transformers.CLIPTextConfig(vocab_size=text.vocab_size, hidden_size=text.width,
                                         intermediate_size=4 * text.width, num_hidden_layers=text.layers,
                                         num_attention_heads=text.heads, max_position_embeddings=text.context_length,
                                         hidden_act="quick_gelu", bos_token_id=BOS, eos_token_id=EOS)
    text_encoder = transformers.CLIPTextModel(config)
    weights = convert_ldm_clip_checkpoint({k: v for k, v in state.items() if k.startswith("cond_stage_model.")})
    if not hasattr(text_encoder, "text_model"):  # recent transformers flattened the wrapper
        weights = {k.removeprefix("text_model."): v for k, v in weights.items()}
    text_encoder.load_state_dict(weights, strict=True)
    scheduler = diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                 num_train_timesteps=1000, timestep_spacing="linspace",
                                                 steps_offset=1)
    pipeline = diffusers.StableDiffusionPipeline(vae=vae.eval(), text_encoder=text_encoder.eval(),
                                                 tokenizer=hf_clip_tokenizer(), unet=unet.eval(), scheduler=scheduler,
                                                 safety_checker=None, feature_extractor=None,
                                                 requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def write_random_lora(path, model, seed: int = 0, scale: float = 0.05) -> str:
    """A kohya LoRA file for `model` (a LatentDiffusion): random rank-2 updates of every cross-attention key
    projection (attn2.to_k) of its UNet, strong enough to change the image. Returns the path."""
    from safetensors.torch import save_file

    from sample.lora import UNET_PREFIX, layer_name
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for module_path, module in model.unet.named_modules():
        if module_path.endswith("attn2.to_k"):
            name = layer_name(UNET_PREFIX, module_path)
            out_features, in_features = module.weight.shape
            state[f"{name}.lora_down.weight"] = scale * torch.randn(2, in_features, generator=generator)
            state[f"{name}.lora_up.weight"] = torch.randn(out_features, 2, generator=generator)
            state[f"{name}.alpha"] = torch.tensor(2.0)
    save_file(state, str(path))
    return str(path)


@contextlib.contextmanager
def registered_preset(folder, model, name: str = "test + LCM", lora_name: str = "test-lcm"):
    """A LoRA for `model` written to `folder`, registered as a built-in LoRA, and a preset using it with the default
    model, LCM, 2 steps, CFG 1 (as "tiny-shapes + LCM"): while the context lasts they are all that the registries of
    sample.models hold, so tests see the same whether or not the package ships its own; yields the preset. The
    registries are restored afterwards."""
    from sample.models import BUILTIN_LORAS, PRESETS, GenerationPreset, register_lora, register_preset
    saved = dict(BUILTIN_LORAS), dict(PRESETS)
    BUILTIN_LORAS.clear()
    PRESETS.clear()
    try:
        lora = register_lora(write_random_lora(os.path.join(folder, f"{lora_name}.safetensors"), model))
        yield register_preset(GenerationPreset(name, "LCM", steps=2, cfg_scale=1.0, loras=((lora, 1.0),)))
    finally:
        for registry, before in zip((BUILTIN_LORAS, PRESETS), saved):
            registry.clear()
            registry.update(before)
