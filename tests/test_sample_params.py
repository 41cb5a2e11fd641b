"""GenerationParams' limits and the checks that depend on the model: the size step and clip-skip range follow from
the preset (closed forms for the released families, and the tiny UNet itself failing exactly where the step says),
every way into the parameters meets the same limits, and prompt nesting is bounded."""
import pytest
import torch
from PIL import Image

import ldm
from ldm.presets import PRESETS
from sample.generate import generate
from sample.models import default_model
from sample.infotext import clean_text, format_infotext
from sample.params import (MAX_BATCH_COUNT, MAX_SEED_RESIZE, MAX_STEPS, GenerationParams, ParamsError,
                           max_clip_skip, size_multiple)
from sample.prompts import MAX_NESTING, PromptError, prompt_schedule


@pytest.mark.parametrize("preset, multiple, clip_skip", [
    ("sd15", 64, 12),  # 8x VAE, 4 UNet levels; 12 CLIP layers from the last
    ("sd21", 64, 23),  # OpenCLIP-H's 24 layers from the penultimate
    ("sdxl-base", 32, 11),  # 3 UNet levels; CLIP-L from its penultimate layer
])
def test_size_step_and_clip_skip_range_of_the_released_families(preset, multiple, clip_skip):
    assert (size_multiple(PRESETS[preset]), max_clip_skip(PRESETS[preset])) == (multiple, clip_skip)


def test_the_unet_runs_exactly_at_the_latent_sizes_the_step_allows():
    torch.manual_seed(0)
    model = ldm.create_model("tiny")
    levels = len(model.preset.unet.channel_mult)
    latent_step = 2 ** (levels - 1)
    context = torch.randn(1, 77, model.preset.unet.context_dim)
    with torch.no_grad():
        out = model.apply_model(torch.randn(1, 4, 2 * latent_step, 3 * latent_step), torch.tensor([10.0]), context)
        assert out.shape[-2:] == (2 * latent_step, 3 * latent_step)
        with pytest.raises(RuntimeError, match="Sizes of tensors must match"):
            model.apply_model(torch.randn(1, 4, 2 * latent_step, 3 * latent_step + 1), torch.tensor([10.0]), context)


def test_validate_for_names_the_nearest_valid_sizes_and_the_encoders_depth():
    sd15 = PRESETS["sd15"]
    GenerationParams(width=576, height=512, clip_skip=12).validate_for(sd15)
    with pytest.raises(ParamsError, match=r"width 520 does not fit this model: its sizes are multiples of 64 "
                                          r"pixels \(the VAE's 8x times the UNet's 8x down-sampling\); "
                                          "nearest valid: 512 or 576"):
        GenerationParams(width=520, height=512).validate_for(sd15)
    with pytest.raises(ParamsError, match=r"hires width \(512 x hr_scale 1.1\) 560 does not fit"):
        GenerationParams(width=512, height=512, enable_hr=True, hr_scale=1.1).validate_for(sd15)
    with pytest.raises(ParamsError, match="clip_skip 13 is beyond this model's text encoder: it allows 1 to 12"):
        GenerationParams(clip_skip=13).validate_for(sd15)


def test_an_infotext_meets_the_same_limits_as_the_fields():
    infotext = format_infotext("a cat", "", {"Steps": MAX_STEPS + 1, "Sampler": "Euler", "Size": "64x64"})
    with pytest.raises(ParamsError, match=f"steps must be between 1 and {MAX_STEPS}, got {MAX_STEPS + 1}"):
        GenerationParams.from_infotext(infotext).validate()
    with pytest.raises(ParamsError, match=f"batch_count must be between 1 and {MAX_BATCH_COUNT}"):
        GenerationParams(batch_count=MAX_BATCH_COUNT + 1).validate()
    with pytest.raises(ParamsError, match="hr_scale must be a number, got inf"):
        GenerationParams(enable_hr=True, hr_scale=float("inf")).validate()
    with pytest.raises(ParamsError, match=f"hr_second_pass_steps must be an integer in \\[0, {MAX_STEPS}\\]"):
        GenerationParams(enable_hr=True, hr_second_pass_steps=10 ** 9).validate()
    with pytest.raises(ParamsError, match=f"seed_resize_from_w / _h must be in \\[0, {MAX_SEED_RESIZE}\\]"):
        GenerationParams(seed_resize_from_w=10 ** 6, seed_resize_from_h=64).validate()


def test_work_counts_pixels_steps_images_and_the_hires_pass():
    assert GenerationParams(width=64, height=32, steps=10, batch_size=2, batch_count=3).work() == 64 * 32 * 10 * 6
    hires = GenerationParams(width=64, height=64, steps=10, enable_hr=True, hr_scale=2, hr_second_pass_steps=5)
    assert hires.work() == 64 * 64 * 10 + 128 * 128 * 5
    img2img = GenerationParams(width=64, height=64, steps=10, init_images=["x.png"], denoising_strength=0.5)
    assert img2img.work() == 64 * 64 * 5  # img2img runs int(strength x steps) of its schedule


def test_prompt_nesting_is_parsed_up_to_the_limit_and_refused_beyond():
    deepest = "(" * MAX_NESTING + "a" + ")" * MAX_NESTING
    assert prompt_schedule(deepest, 10) == [(10, deepest)]
    assert prompt_schedule("[" * (MAX_NESTING - 1) + "a:b:5" + "]" * (MAX_NESTING - 1), 10)[0] == \
        (5, "[" * (MAX_NESTING - 2) + "a" + "]" * (MAX_NESTING - 2))
    for prompt in ("(" * (MAX_NESTING + 1) + "a", "[a:" * 5000, "(" * 5000):
        with pytest.raises(PromptError, match=f"nest more than {MAX_NESTING} deep"):
            prompt_schedule(prompt, 10)


def test_lone_surrogates_become_replacement_characters_that_utf8_can_write():
    cleaned = clean_text("a\ud800b\udcffc")
    assert cleaned == "a\ufffdb\ufffdc" and cleaned.encode("utf-8") == "a\ufffdb\ufffdc".encode("utf-8")
    assert format_infotext("x\udcff", "", {"Steps": 1}) == "x\ufffd\nSteps: 1"


def test_img2img_size_from_the_init_image_rounds_down_to_the_models_step():
    # The default model's step is 16 (a 4x VAE and 3 UNet levels): 44x37 rounded down to 8 (40x32) would not run.
    params = GenerationParams(init_images=[Image.new("RGB", (44, 37), "white")], steps=1, seed=1)
    result = generate(default_model(), params, progress=False)
    assert result.images[0].size == (32, 32) and (result.params.width, result.params.height) == (32, 32)
