"""ControlNet in generation: preprocessors (canny against scikit-image), units (validation, schedule, control modes,
infotext), and generate() with a random ControlNet on the random tiny model (txt2img, img2img, inpainting, hires)."""
import os
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

import ldm
from ldm.controlnet import ControlNet, load_controlnet, save_controlnet
from oracles import import_oracle
from sample import GenerationParams, ParamsError, generate, txt2img
from sample import images as imaging
from sample.controlnet import (ControlledModel, ControlNetUnit, PreparedUnit, UnitControl, UnitError, detect,
                               fit_map, get_preprocessor, hint_tensor, register_preprocessor, run_preprocessor,
                               unit_from_api, unregister_preprocessor)
from sample.controlnet.preprocessors import PreprocessorError, canny, hysteresis, pixel_perfect_resolution
from sample.controlnet.units import (BUILTIN_CONTROLNETS, SOFT_INJECTION_BASE, find_model, list_models,
                                    parse_unit_infotext)
from sample.images import read_infotext
from sample.models import default_model
from controlnet_helpers import save_random_controlnet, shapes_image
from sample_helpers import one_thread, random_tiny  # noqa: F401  (autouse fixture)
from shapes.control import controlled
from shapes.world import Vocabulary, render, sample_scene
from train.conditioning import silhouette

BASE = dict(prompt="a red circle", negative_prompt="blurry", seed=5, steps=4, width=32, height=32, cfg_scale=5.0)


@pytest.fixture(scope="module")
def tiny():
    return random_tiny()


@pytest.fixture(scope="module")
def controlnet_dir(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("controlnet")
    save_random_controlnet(tiny.model, folder, "random_cn", seed=1)
    save_random_controlnet(tiny.model, folder, "second_cn", seed=2)
    return folder


def unit(**fields) -> ControlNetUnit:
    # processor_res 64: the 64-pixel image's map at its own size (fitted to the 32x32 image afterwards).
    return ControlNetUnit(**{"image": shapes_image(), "module": "canny", "model": "random_cn", "processor_res": 64,
                             **fields})


def run(tiny, controlnet_dir, units=(), **overrides):
    params = GenerationParams(**{**BASE, **overrides}, controlnet_units=list(units))
    return generate(tiny, params, progress=False, controlnet_dir=controlnet_dir)


def same_pixels(a, b) -> bool:
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a.images, b.images))


def synthetic_grey(seed: int, size: int = 96) -> np.ndarray:
    """Discs, boxes and a diagonal band of several grey levels plus Gaussian noise, 0..255 float."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:size, :size]
    image = np.full((size, size), 40.0)
    for _ in range(3):
        r, c, radius = rng.uniform(15, size - 15, 2).tolist() + [rng.uniform(6, 20)]
        image[(rows - r) ** 2 + (cols - c) ** 2 < radius ** 2] = rng.uniform(90, 250)
    top, left = rng.integers(5, size // 2, 2)
    image[top:top + size // 3, left:left + size // 4] = rng.uniform(60, 200)
    image[np.abs(rows - cols - rng.integers(-20, 20)) < 4] = 230
    return image + rng.normal(0, 6, image.shape)


# ----- preprocessors ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sigma, low, high", [(1.0, 100, 200), (2.0, 40, 120), (1.4, 20, 60)])
def test_canny_agrees_with_scikit_image_on_synthetic_images(sigma, low, high):
    feature = import_oracle("skimage.feature")
    for seed in range(3):
        image = synthetic_grey(seed)
        ours, reference = canny(image, sigma, low, high), feature.canny(image, sigma, low, high)
        assert reference.sum() > 50  # the images have edges to find
        agreement = (ours == reference).mean()
        assert agreement >= 0.95, f"seed {seed}: {agreement:.4f} of pixels agree"


def test_hysteresis_follows_a_long_winding_edge_and_drops_unconnected_ones():
    weak = np.zeros((200, 200), bool)
    for row in range(2, 190, 4):  # a serpentine of 47 rows joined at alternate ends: one 9000-pixel edge
        weak[row, 2:198] = True
        weak[row:row + 4, 197 if (row // 4) % 2 == 0 else 2] = True
    weak[195, 50:150] = True  # a separate weak edge with no strong pixel
    strong = np.zeros_like(weak)
    strong[2, 2] = True
    edges = hysteresis(weak, strong)
    assert edges[:194].sum() == weak[:194].sum() and not edges[195].any()


def test_canny_preprocessor_draws_white_edges_on_black_at_the_processor_resolution():
    control_map = run_preprocessor("canny", shapes_image(64), resolution=128)
    assert control_map.shape == (128, 128, 3)
    assert set(np.unique(control_map)) == {0, 255}
    # The disc's outline is found: its left edge crosses row 51 (0.4 · 128) near column 0.15 · 128.
    assert control_map[51, 14:24, 0].max() == 255


def test_weightless_preprocessors_give_the_documented_maps():
    image = shapes_image(64)
    pixels = np.asarray(image)
    assert np.array_equal(run_preprocessor("invert", image), 255 - pixels)
    assert np.array_equal(run_preprocessor("none", image), pixels)
    threshold = run_preprocessor("threshold", image, resolution=64, threshold_a=100)
    assert np.array_equal(threshold[..., 0] == 255, pixels.astype(float) @ [0.299, 0.587, 0.114] > 100)
    segmented = run_preprocessor("seg_color", image, resolution=64, threshold_a=2)
    assert len(np.unique(segmented.reshape(-1, 3), axis=0)) == 3  # background, disc, square
    assert run_preprocessor("tile_resample", image, threshold_a=4).shape == (16, 16, 3)
    # binary at 0 picks Otsu's level: on a page half grey 50, half grey 200 the dark half becomes the white stroke.
    page = Image.fromarray(np.repeat(np.array([50, 200], np.uint8).repeat(32)[None, :, None], 3, 2).repeat(64, 0))
    binary = run_preprocessor("binary", page, resolution=64)
    assert (binary[:, :32] == 255).all() and (binary[:, 32:] == 0).all()
    colour = run_preprocessor("color", shapes_image(128), resolution=128)
    assert len(np.unique(colour[:64, :64].reshape(-1, 3), axis=0)) == 1  # one colour per 64-pixel cell
    shuffled = run_preprocessor("shuffle", image, resolution=64)
    assert np.array_equal(shuffled, run_preprocessor("shuffle", image, resolution=64))  # a fixed flow
    assert not np.array_equal(shuffled, pixels)
    mask = Image.new("L", (64, 64))
    mask.paste(255, (0, 0, 32, 64))
    inpaint = run_preprocessor("inpaint", image, mask=mask)
    assert inpaint.shape == (64, 64, 4) and (inpaint[:, :32, 3] == 255).all() and (inpaint[:, 32:, 3] == 0).all()


def test_silhouette_gives_the_map_controlnet_training_computes_from_a_shapes_image():
    for seed in range(3):
        image = render(sample_scene(np.random.default_rng([9, seed]), Vocabulary(), 1.0))
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
        trained_on = (silhouette(pixels).permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        assert np.array_equal(run_preprocessor("silhouette", image, resolution=64), trained_on)


def test_unavailable_and_unknown_preprocessors_are_refused_with_the_reason():
    with pytest.raises(PreprocessorError, match="openpose.*downloaded weights"):
        get_preprocessor("openpose")
    with pytest.raises(PreprocessorError, match="unknown preprocessor 'nope'; valid: none, invert, canny"):
        get_preprocessor("nope")
    with pytest.raises(PreprocessorError, match=r"threshold_a \(Canny Low Threshold of canny\) must be in \[1, 255\]"):
        run_preprocessor("canny", shapes_image(), threshold_a=300)


def test_a_registered_preprocessor_is_usable_by_name_in_a_unit():
    register_preprocessor("red_channel", lambda image, a, b, mask: np.repeat(image[..., :1], 3, axis=2),
                          uses_resolution=False)
    try:
        control_map = run_preprocessor("red_channel", shapes_image())
        assert np.array_equal(control_map[..., 1], np.asarray(shapes_image())[..., 0])
        assert unit(module="red_channel").validate().module == "red_channel"
        with pytest.raises(ValueError, match="already registered"):
            register_preprocessor("red_channel", lambda *args: None)
    finally:
        unregister_preprocessor("red_channel")


def test_pixel_perfect_resolution_lands_one_map_pixel_per_image_pixel():
    # A 200x100 image covering a 512x512 target (crop) scales by 5.12: short side 100 -> 512.
    assert pixel_perfect_resolution((200, 100), (512, 512), "Crop and Resize") == 512
    # Fitting inside (Resize and Fill) scales by 2.56: short side 100 -> 256.
    assert pixel_perfect_resolution((200, 100), (512, 512), "Resize and Fill") == 256


# ----- units ------------------------------------------------------------------------------------------------------

def test_unit_validation_names_the_bad_field():
    cases = [(dict(control_mode="Louder"), "control_mode must be one of 'Balanced'"),
             (dict(resize_mode=7), "resize_mode must be one of"),
             (dict(guidance_start=0.6, guidance_end=0.3), "0 <= start <= end <= 1"),
             (dict(weight=-1), "weight must be >= 0"),
             (dict(model="None"), "no model chosen"),
             (dict(processor_res=10), r"processor_res must be an integer in \[64, 2048\]"),
             (dict(module="depth_midas"), "downloaded weights")]
    for fields, message in cases:
        with pytest.raises(UnitError, match=message):
            unit(**fields).validate()
    normalised = unit(control_mode=2, resize_mode="Envelope (Outer Fit)").validate()
    assert (normalised.control_mode, normalised.resize_mode) == ("ControlNet is more important", "Resize and Fill")
    assert (normalised.processor_res, normalised.threshold_a, normalised.threshold_b) == (64, 100, 200)
    assert ControlNetUnit(module="canny", model="m").validate().processor_res == 512  # -1: the default


def test_generation_params_refuse_a_txt2img_unit_without_an_image():
    with pytest.raises(ParamsError, match="ControlNet unit 0 has no control image"):
        GenerationParams(**BASE, controlnet_units=[unit(image=None)]).validate()
    with pytest.raises(ParamsError, match="ControlNet unit 0: guidance_start"):
        GenerationParams(**BASE, controlnet_units=[unit(guidance_start=2.0)]).validate()


def test_each_unit_adds_half_the_work_of_a_job():
    plain = GenerationParams(**BASE)
    assert GenerationParams(**BASE, controlnet_units=[unit(), unit()]).work() == 2 * plain.work()


def test_unit_infotext_round_trips():
    original = unit(weight=0.6, guidance_start=0.25, control_mode=1, pixel_perfect=True).validate()
    text = original.infotext("random_cn [0123abcd]")
    assert text == ("Module: canny, Model: random_cn [0123abcd], Weight: 0.6, Resize Mode: Crop and Resize, "
                    "Processor Res: 64, Threshold A: 100, Threshold B: 200, Guidance Start: 0.25, Guidance End: 1, "
                    "Pixel Perfect: True, Control Mode: My prompt is more important")
    parsed = parse_unit_infotext(text + ", Low Vram: False, Hr Option: Both").validate()
    assert replace(parsed, image=original.image, model="random_cn") == original


def test_api_units_accept_the_extension_field_names_and_refuse_unknown_ones():
    decoded = []

    def decode(data, name):
        decoded.append((data, name))
        return shapes_image()

    api_unit = unit_from_api({"enabled": True, "input_image": "AAA", "mask": "BBB", "module": "canny",
                              "model": "random_cn", "control_mode": 2, "lowvram": True, "guidance": 0.5}, decode)
    assert decoded == [("AAA", "image"), ("BBB", "mask")]
    assert (api_unit.control_mode, api_unit.guidance_end, api_unit.module) == (2, 0.5, "canny")
    assert unit_from_api({"enabled": False, "module": "whatever"}, decode) is None
    with pytest.raises(UnitError, match="unknown ControlNet unit field 'wieght'"):
        unit_from_api({"wieght": 1}, decode)


# ----- schedule and control modes on a stub UNet ---------------------------------------------------------------------

class StubNet(torch.nn.Module):
    """A 'ControlNet' whose residual i is the constant (i + 1) · value, shaped [B, 1, 1, 1]."""

    def __init__(self, value: float, count: int = 4):
        super().__init__()
        self.value, self.count = value, count
        self.encoder_config = {"in_channels": 4}
        self.calls = []

    def forward(self, x, hint, t, context, y=None):
        self.calls.append(hint.shape)
        return [torch.full((x.shape[0], 1, 1, 1), (i + 1) * self.value) for i in range(self.count)]


class StubModel:
    """apply_model records the control it is given and returns zeros."""
    parameterization, dtype = "eps", torch.float32

    def __init__(self):
        self.controls = []

    def apply_model(self, x, t, context, y=None, control=None):
        self.controls.append(control)
        return torch.zeros_like(x)


def prepared(net, **fields):
    return PreparedUnit(unit(**fields).validate(), net, "stub", np.zeros((8, 8, 3), np.uint8))


def control_of(units, conditional_rows):
    """The control ControlledModel passes to the UNet for a batch whose rows are cond (True) / uncond (False)."""
    stub = StubModel()
    active = torch.tensor([[float(u.unit.weight > 0 and (c or not u.unit.cfg_injection)) for u in units]
                           for c in conditional_rows])
    hints = torch.zeros(len(conditional_rows), len(units), 3, 8, 8)
    ControlledModel(stub, units).apply_model(torch.zeros(len(conditional_rows), 4, 1, 1), torch.zeros(2),
                                             torch.zeros(2, 1, 1), None, hints, active)
    return [level[:, 0, 0, 0].tolist() for level in stub.controls[0]]


def test_control_modes_scale_residuals_as_sd_webui_controlnet():
    rows = [True, False]  # [cond; uncond], as CFGDenoiser batches them
    balanced = control_of([prepared(StubNet(1.0), weight=0.5, control_mode="Balanced")], rows)
    assert balanced == [[0.5 * (i + 1)] * 2 for i in range(4)]
    soft = [0.5 * (i + 1) * SOFT_INJECTION_BASE ** (3 - i) for i in range(4)]
    prompt = control_of([prepared(StubNet(1.0), weight=0.5, control_mode="My prompt is more important")], rows)
    assert np.allclose(prompt, [[s, s] for s in soft], rtol=1e-6)
    control = control_of([prepared(StubNet(1.0), weight=0.5, control_mode="ControlNet is more important")], rows)
    assert np.allclose(control, [[s, 0.0] for s in soft], rtol=1e-6)


def test_several_units_add_their_scaled_residuals():
    units = [prepared(StubNet(1.0), weight=0.5), prepared(StubNet(10.0), weight=2.0)]
    assert control_of(units, [True]) == [[(0.5 + 20.0) * (i + 1)] for i in range(4)]


def test_no_acting_unit_calls_the_unet_without_control():
    net = StubNet(1.0)
    assert_control = StubModel()
    ControlledModel(assert_control, [prepared(net)]).apply_model(
        torch.zeros(1, 4, 1, 1), torch.zeros(1), torch.zeros(1, 1, 1), None, torch.zeros(1, 1, 3, 8, 8),
        torch.zeros(1, 1))
    assert assert_control.controls == [None] and net.calls == []


@pytest.mark.parametrize("start, end", [(0.0, 1.0), (0.25, 0.5), (0.3, 0.3), (0.5, 1.0), (1.0, 1.0)])
def test_unit_acts_exactly_at_the_steps_of_its_guidance_range(start, end):
    steps = 8
    sigmas = torch.cat([torch.linspace(10, 0.5, steps), torch.zeros(1)])
    control = UnitControl([prepared(StubNet(1.0), guidance_start=start, guidance_end=end)])
    at = control.attach(lambda sigma: {}, sigmas, 1, (1, 1), conditional=True)
    expected = [float(start <= i / steps <= end) for i in range(steps)]
    assert [float(at(sigmas[i:i + 1])["control_active"][0, 0]) for i in range(steps)] == expected
    # A second-order sampler's evaluation between two levels belongs to the earlier step.
    midpoints = (sigmas[:-2] * sigmas[1:-1]).sqrt()
    assert [float(at(m[None])["control_active"][0, 0]) for m in midpoints] == expected[:-1]


# ----- generate() -------------------------------------------------------------------------------------------------

def count_controlnet_calls():
    calls = []
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda module, args, output: calls.append(args[1].shape) if isinstance(module, ControlNet) else None)
    return calls, handle


def test_controlnet_changes_txt2img_and_weight_zero_or_no_step_reproduces_the_uncontrolled_image(tiny, controlnet_dir):
    plain = run(tiny, controlnet_dir)
    controlled = run(tiny, controlnet_dir, [unit()])
    assert not same_pixels(plain, controlled)
    assert same_pixels(plain, run(tiny, controlnet_dir, [unit(weight=0)]))
    # start 1 with 4 steps: i / 4 reaches at most 0.75, so no step is controlled.
    assert same_pixels(plain, run(tiny, controlnet_dir, [unit(guidance_start=1.0)]))


def test_generation_runs_the_controlnet_at_the_scheduled_steps_only(tiny, controlnet_dir):
    calls, handle = count_controlnet_calls()
    try:
        run(tiny, controlnet_dir, [unit(guidance_start=0.25, guidance_end=0.5)], steps=8, sampler_name="Euler")
    finally:
        handle.remove()
    # Steps 2, 3 and 4 of 8 (0.25 <= i/8 <= 0.5); cond and uncond in one batch of 2, hints at the image's size.
    assert calls == [torch.Size([2, 3, 32, 32])] * 3


def test_infotext_records_each_unit_and_reproduces_the_image(tiny, controlnet_dir):
    units = [unit(weight=0.7, control_mode="My prompt is more important"),
             unit(module="seg_color", model="second_cn", guidance_end=0.5, resize_mode="Just Resize")]
    result = run(tiny, controlnet_dir, units)
    infotext = result.infotexts[0]
    assert 'ControlNet 0: "Module: canny, Model: random_cn [' in infotext
    assert 'Weight: 0.7, Resize Mode: Crop and Resize' in infotext
    assert 'ControlNet 1: "Module: seg_color, Model: second_cn [' in infotext
    params = GenerationParams.from_infotext(infotext)
    params.controlnet_units = [replace(u, image=shapes_image()) for u in params.controlnet_units]
    again = generate(tiny, params, progress=False, controlnet_dir=controlnet_dir)
    assert same_pixels(result, again) and again.infotexts == result.infotexts


def test_img2img_inpainting_and_hires_fix_apply_the_units(tiny, controlnet_dir):
    init = Image.fromarray(np.asarray(shapes_image(32))[::-1].copy())
    mask = Image.new("L", (32, 32))
    mask.paste(255, (8, 8, 24, 24))
    for extra in (dict(init_images=[init], denoising_strength=0.8),
                  dict(init_images=[init], mask=mask, denoising_strength=0.9, mask_blur=0)):
        plain = run(tiny, controlnet_dir, **extra)
        # No image: the unit takes the init image (and, for the inpaint module, the inpainting mask).
        assert not same_pixels(plain, run(tiny, controlnet_dir, [unit(image=None)], **extra))
    assert not same_pixels(plain, run(tiny, controlnet_dir, [unit(image=None, module="inpaint")], **extra))
    with pytest.raises(ParamsError, match="ControlNet unit 0: preprocessor 'inpaint' needs a mask"):
        run(tiny, controlnet_dir, [unit(module="inpaint")])
    calls, handle = count_controlnet_calls()
    try:
        hires = run(tiny, controlnet_dir, [unit()], enable_hr=True, hr_scale=2.0, hr_second_pass_steps=2,
                    hr_denoising_strength=0.6, sampler_name="Euler")
    finally:
        handle.remove()
    assert hires.images[0].size == (64, 64)
    # Base pass at 32x32, hires pass at 64x64: the hints follow the image size.
    assert calls == [torch.Size([2, 3, 32, 32])] * 4 + [torch.Size([2, 3, 64, 64])] * 2


def captured_hints(tiny, controlnet_dir, units, **overrides) -> list[torch.Tensor]:
    """The hint of every ControlNet call of a generation ([B, 3, H, W] each)."""
    hints = []
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda module, args, output: hints.append(args[1].clone()) if isinstance(module, ControlNet) else None)
    try:
        run(tiny, controlnet_dir, units, **overrides)
    finally:
        handle.remove()
    return hints


def marker_centre(hint: torch.Tensor) -> tuple[float, float]:
    """(x, y) centre of the dark pixels of a hint [3, H, W], in image coordinates (pixel i spans [i, i + 1))."""
    rows, cols = torch.nonzero(hint.mean(0) < 0.5, as_tuple=True)
    return cols.float().mean().item() + 0.5, rows.float().mean().item() + 0.5


def test_only_masked_inpainting_crops_the_control_image_like_the_init_image(tiny, controlnet_dir):
    # A 64x64 init image, inpainted "Only masked" at 32x32: the crop around the mask (16x16 box + 2 padding = 20x20)
    # is what the latents see. The control image is the same picture at 128x128 with a 4x4 (8x8 there) black marker
    # centred at (46, 14) of the init image, inside the masked box.
    mask = Image.new("L", (64, 64))
    mask.paste(255, (36, 4, 52, 20))
    control = Image.new("RGB", (128, 128), "white")
    control.paste((0, 0, 0), (88, 24, 96, 32))
    region = (34, 2, 54, 22)
    assert imaging.mask_crop_region(mask, 2, 32, 32) == region
    extra = dict(init_images=[shapes_image(64)], mask=mask, inpaint_full_res=True, inpaint_full_res_padding=2,
                 mask_blur=0, denoising_strength=0.8, steps=2, sampler_name="Euler")
    hint = captured_hints(tiny, controlnet_dir, [unit(image=control, module="none", resize_mode="Just Resize")],
                          **extra)[0][0]
    # The full-size map (the control image fitted to the init image), cut to the crop rectangle, resized to 32x32.
    full_map = control.resize((64, 64), Image.LANCZOS)
    expected = hint_tensor(fit_map(np.asarray(imaging.resize_image(full_map.crop(region), 32, 32, 2)), (32, 32),
                                   "Just Resize"))[0]
    torch.testing.assert_close(hint, expected, atol=0, rtol=0)
    # The marker at (46, 14) sits at ((46 - 34) · 32/20, (14 - 2) · 32/20) = (19.2, 19.2) of the hint, not at
    # (23, 7), where fitting the whole control image to 32x32 (no crop) would put it.
    assert np.allclose(marker_centre(hint), (19.2, 19.2), atol=0.6)
    # The inpaint preprocessor's mask is cut alike: the -1 pixels are the masked box's part of the crop.
    hint = captured_hints(tiny, controlnet_dir, [unit(image=None, module="inpaint")], **extra)[0][0]
    masked = np.asarray(imaging.resize_image(mask.crop(region), 32, 32, 2)) >= 128
    assert torch.equal(hint[0] == -1, torch.from_numpy(masked))


def test_hires_pass_resizes_the_base_map_as_sd_webui_controlnet_does(tiny, controlnet_dir):
    # sd-webui-controlnet runs the preprocessor once, at the resolution pixel perfect gives for the base size, and
    # resizes that map to the hires size (detectmap_proc(detected_map, ..., hr_y, hr_x)); it does not detect again.
    control_unit = unit(pixel_perfect=True, resize_mode="Crop and Resize")
    hints = captured_hints(tiny, controlnet_dir, [control_unit], width=64, height=64, enable_hr=True, hr_scale=2.0,
                           hr_second_pass_steps=2, hr_denoising_strength=0.6, steps=2, sampler_name="Euler")
    base, hires = hints[0][0], hints[-1][0]
    detected = detect(control_unit.validate(), shapes_image(), None, (64, 64))
    assert detected.shape[:2] == (64, 64)  # pixel perfect: one map pixel per base-pass pixel
    torch.testing.assert_close(base, hint_tensor(detected)[0], atol=0, rtol=0)
    torch.testing.assert_close(hires, hint_tensor(fit_map(detected, (128, 128), "Crop and Resize"))[0], atol=0,
                               rtol=0)
    # Detecting again at the hires size would give another (thinner-edged) map.
    again = detect(control_unit.validate(), shapes_image(), None, (128, 128))
    assert not torch.equal(hires, hint_tensor(again)[0])


def test_generation_errors_name_the_unit_and_what_to_do(tiny, controlnet_dir, tmp_path):
    with pytest.raises(ParamsError, match="ControlNet unit 0: ControlNet model 'missing' not found in .*available: "
                                          r"random_cn \[[0-9a-f]{8}\], second_cn"):
        run(tiny, controlnet_dir, [unit(model="missing")])
    # sd-webui-controlnet falls back to the name when a "[hash]" names another version of the file.
    assert find_model(controlnet_dir, "Random_CN [00000000]")[0].endswith("random_cn.safetensors")
    with pytest.raises(ParamsError, match=r"no ControlNet folder given: --controlnet-dir"):
        run(tiny, None, [unit()])
    other = ControlNet(in_channels=4, model_channels=64, channel_mult=(1, 2), num_res_blocks=1,
                       attention_resolutions=(2,), num_heads=2, num_head_channels=None, transformer_depth=1,
                       transformer_depth_middle=None, context_dim=64, use_linear_in_transformer=False,
                       adm_in_channels=None)
    save_controlnet(other, tmp_path / "wide.safetensors")
    with pytest.raises(ParamsError, match="ControlNet wide .* was made for another model"):
        run(tiny, tmp_path, [unit(model="wide")])
    save_controlnet(ControlNet(hint_downscale=8, **tiny.model.unet.encoder_config), tmp_path / "sd_hint.safetensors")
    with pytest.raises(ParamsError, match="autoencoder downsamples 8x; this model's downsamples 2x"):
        run(tiny, tmp_path, [unit(model="sd_hint")])


def test_commands_take_units_from_controlnet_options(tmp_path, capsys):
    save_random_controlnet(default_model().model, tmp_path, "shapes_random")
    shapes_image(64).save(tmp_path / "control.png")
    fast = ["a red circle", "--steps", "2", "--width", "32", "--height", "32", "--no-progress", "--seed", "1",
            "--outdir", str(tmp_path / "out"), "--controlnet-dir", str(tmp_path)]
    option = f"image={tmp_path / 'control.png'},module=canny,model=shapes_random,weight=0.5,processor_res=128"
    assert txt2img.main([*fast, "--controlnet", option]) == 0
    path = capsys.readouterr().out.strip()
    assert 'ControlNet 0: "Module: canny, Model: shapes_random [' in read_infotext(path)
    with pytest.raises(SystemExit) as exit_info:
        txt2img.main([*fast, "--controlnet", "module=canny,wieght=2"])
    assert exit_info.value.code == 2
    assert "argument --controlnet: 'wieght=2' is not key=value with a key among" in capsys.readouterr().err
    assert txt2img.main([*fast, "--controlnet", option.replace("shapes_random", "missing")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "ControlNet model 'missing' not found" in error


def test_a_balanced_unit_equals_adding_the_weighted_residuals_to_every_unet_call(tiny, controlnet_dir):
    # The hand-made path of shapes.control (apply_model patched to add w · residuals to both halves of CFG) and a
    # Balanced unit with a ready-made map (module none, already at the image size) are the same computation.
    control_map = Image.fromarray(np.asarray(shapes_image(32)))
    result = run(tiny, controlnet_dir, [unit(image=control_map, module="none", weight=0.7)])
    net = load_controlnet(controlnet_dir / "random_cn.safetensors", dtype=tiny.model.dtype)
    hint = torch.from_numpy(np.asarray(control_map, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    with controlled(tiny.model, net, hint, 0.7):
        by_hand = run(tiny, controlnet_dir)
    assert same_pixels(result, by_hand)


def test_a_controlnet_cache_reuses_the_last_jobs_networks_only(tiny, controlnet_dir):
    cache = {}
    params = GenerationParams(**BASE, controlnet_units=[unit()])
    first = generate(tiny, params, progress=False, controlnet_dir=controlnet_dir, controlnet_cache=cache)
    (net,) = cache.values()
    again = generate(tiny, params, progress=False, controlnet_dir=controlnet_dir, controlnet_cache=cache)
    assert len(cache) == 1 and next(iter(cache.values())) is net  # reused, not loaded again
    assert same_pixels(first, again)
    generate(tiny, replace(params, controlnet_units=[unit(model="second_cn")]), progress=False,
             controlnet_dir=controlnet_dir, controlnet_cache=cache)
    assert len(cache) == 1 and next(iter(cache.values())) is not net


def test_shipped_controlnets_are_found_without_a_folder_and_a_folder_file_of_the_same_name_wins(tmp_path, capsys):
    shipped = {os.path.basename(path) for path in BUILTIN_CONTROLNETS.values()}
    assert shipped == {"tiny-shapes-controlnet.safetensors", "tiny-shapes-controlnet-seg.safetensors"}
    path, label = find_model(None, "tiny-shapes-controlnet-seg")
    assert label == f"tiny-shapes-controlnet-seg [{ldm.legacy_model_hash(path)}]"
    # The user's folder comes first, and its file of a built-in's name replaces the built-in in the listing.
    own = save_random_controlnet(default_model().model, tmp_path, "tiny-shapes-controlnet")
    listing = list_models(tmp_path)
    assert list(listing.values()) == [str(own), BUILTIN_CONTROLNETS["tiny-shapes-controlnet-seg"]]
    assert find_model(tmp_path, "tiny-shapes-controlnet")[0] == str(own)
    # The command line reaches a shipped ControlNet by name alone; the infotext names it with its hash.
    segmentation = Image.new("RGB", (64, 64), "white")
    segmentation.paste((220, 30, 30), (16, 16, 48, 48))
    segmentation.save(tmp_path / "map.png")
    option = f"image={tmp_path / 'map.png'},module=none,model=tiny-shapes-controlnet-seg"
    assert txt2img.main(["a red square", "--steps", "2", "--no-progress", "--outdir", str(tmp_path / "out"),
                         "--controlnet", option]) == 0
    assert f"Model: {label}" in read_infotext(capsys.readouterr().out.strip())
