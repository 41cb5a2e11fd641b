"""Infotext: A1111's format written exactly, A1111's "PNG Info" parse, and the parameters read back from it."""
import pytest

from sample import GenerationParams, format_infotext, parse_infotext
from sample.params import ParamsError

REFERENCE = ("a dog in manipal university jaipur hostel on a rainy day\n"
             "Steps: 20, Sampler: Euler a, CFG scale: 13.5, Seed: 3056755576, Size: 512x512, Model hash: 540e663c24, "
             "Model: aryan_test_mk3")


def test_reference_infotext_parses_as_a1111_does():
    fields = parse_infotext(REFERENCE)
    assert fields == {
        "Prompt": "a dog in manipal university jaipur hostel on a rainy day", "Negative prompt": "",
        "Steps": "20", "Sampler": "Euler a", "CFG scale": "13.5", "Seed": "3056755576", "Size-1": "512",
        "Size-2": "512", "Model hash": "540e663c24", "Model": "aryan_test_mk3",
        # defaults A1111 fills in for keys it omits
        "Clip skip": "1", "RNG": "GPU", "Schedule type": "Automatic"}


def test_reference_infotext_gives_the_generation_parameters():
    params = GenerationParams.from_infotext(REFERENCE)
    assert (params.prompt, params.steps, params.sampler_name, params.scheduler, params.cfg_scale, params.seed,
            params.width, params.height, params.clip_skip, params.rng) == (
        "a dog in manipal university jaipur hostel on a rainy day", 20, "Euler a", "Automatic", 13.5, 3056755576,
        512, 512, 1, "GPU")
    params.validate()


def test_format_writes_a1111s_layout_and_quotes_values_with_separators():
    text = format_infotext("a cat,\n(masterpiece:1.2)", "", {
        "Steps": 20, "Sampler": "Euler a", "Schedule type": "Automatic", "CFG scale": 7.0, "Seed": 1,
        "Size": "512x512", "Model hash": None, "Lora hashes": "style: 0123456789ab, other: ba9876543210",
        "Note": 'say "hi"\nthere'})
    assert text == ('a cat,\n(masterpiece:1.2)\n'
                    'Steps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 1, Size: 512x512, '
                    'Lora hashes: "style: 0123456789ab, other: ba9876543210", Note: "say \\"hi\\"\\nthere"')


def test_negative_prompt_line_appears_only_when_non_empty_and_may_span_lines():
    fields = {"Steps": 4, "Sampler": "Euler", "Seed": 3}
    assert "Negative prompt" not in format_infotext("p", "", fields)
    text = format_infotext("line one\nline two", "bad\nworse", fields)
    assert text == "line one\nline two\nNegative prompt: bad\nworse\nSteps: 4, Sampler: Euler, Seed: 3"
    parsed = parse_infotext(text)
    assert (parsed["Prompt"], parsed["Negative prompt"]) == ("line one\nline two", "bad\nworse")


def test_format_then_parse_round_trips_every_value():
    values = {"Steps": 30, "Sampler": "DPM++ 2M", "Schedule type": "Karras", "CFG scale": 7.5, "Seed": 42,
              "Size": "640x448", "Model hash": "540e663c24", "Model": "a model, v2: final",
              "Denoising strength": 0.35, "Clip skip": 2, "Hires upscale": 1.5, "Hires upscaler": "Latent",
              "TI hashes": "emb: 0123456789ab"}
    parsed = parse_infotext(format_infotext("prompt", "negative", values))
    assert parsed["Model"] == "a model, v2: final"
    assert (parsed["Size-1"], parsed["Size-2"]) == ("640", "448")
    for key in ("Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Model hash", "Denoising strength",
                "Clip skip", "Hires upscale", "Hires upscaler", "TI hashes"):
        assert parsed[key] == str(values[key])


def test_short_last_line_belongs_to_the_prompt():
    # Fewer than three `key: value` pairs: A1111 reads the line as prompt text.
    parsed = parse_infotext("a photo\nstyle: noir, mood: dark")
    assert parsed["Prompt"] == "a photo\nstyle: noir, mood: dark" and "style" not in parsed


def test_hires_and_img2img_fields_map_to_their_parameters():
    hires = GenerationParams.from_infotext(
        "p\nSteps: 10, Sampler: Euler, CFG scale: 5, Seed: 1, Size: 64x64, Denoising strength: 0.6, "
        "Hires upscale: 2, Hires steps: 4, Hires upscaler: Lanczos, RNG: CPU, Tiling: True, Variation seed: 9, "
        "Variation seed strength: 0.2, Seed resize from: 32x48")
    assert (hires.enable_hr, hires.hr_scale, hires.hr_second_pass_steps, hires.hr_upscaler,
            hires.hr_denoising_strength, hires.denoising_strength) == (True, 2.0, 4, "Lanczos", 0.6, 0.75)
    assert (hires.rng, hires.tiling, hires.subseed, hires.subseed_strength, hires.seed_resize_from_w,
            hires.seed_resize_from_h) == ("CPU", True, 9, 0.2, 32, 48)
    img2img = GenerationParams.from_infotext(
        "p\nSteps: 10, Sampler: Euler, Seed: 1, Denoising strength: 0.3, Mask blur: 2, Noise multiplier: 1.1, "
        "Conditional mask weight: 0.5, Inpaint area: Only masked, Masked area padding: 16", init_images=["x.png"])
    assert (img2img.denoising_strength, img2img.mask_blur, img2img.noise_multiplier, img2img.inpainting_mask_weight,
            img2img.inpaint_full_res, img2img.inpaint_full_res_padding, img2img.init_images) == (
        0.3, 2, 1.1, 0.5, True, 16, ["x.png"])


def test_malformed_numbers_in_an_infotext_name_the_field():
    with pytest.raises(ParamsError, match="'Steps' has the value 'many'"):
        GenerationParams.from_infotext("p\nSteps: many, Sampler: Euler, Seed: 1")
