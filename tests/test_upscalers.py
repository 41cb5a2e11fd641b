"""Upscaler models: parity with spandrel through the real key layouts, detection from the keys, file loading, tiling,
exact output sizes and the extension registries."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import sample.upscalers as upscalers
from ldm.checkpoint import save_state_dict
from sample.upscalers.esrgan import OldESRGAN, RRDBNet
from sample.upscalers.srvgg import SRVGGNetCompact
from sample.upscalers.swinir import SwinIR
from sample.upscalers.tiles import run_tiled
from oracles import spandrel_architecture
from random_weights import randomize_weights

# Random fp32 weights, activations of order 1: both implementations do the same float operations in a possibly
# different order (concatenations, window reshapes), so they agree to a few ulps of the output's magnitude.
PARITY_TOLERANCE = dict(rtol=1e-5, atol=1e-5)


def _swinir(upsampler: str, scale: int, three_conv: bool = False) -> SwinIR:
    return SwinIR(in_channels=3, dim=16, depths=[2, 2], heads=[2, 4], window=4, mlp_ratio=2.0, trained_size=16,
                  three_conv=three_conv, upsampler=upsampler, scale=scale, features=64, out_channels=3)


# (spandrel family, our model): every family and scale the loader supports, tiny widths and depths. The dense
# blocks' growth stays 32 and SwinIR's upsampler width 64: every released file uses them and spandrel does not read
# them off the tensors (we do).
CASES = {
    "esrgan-old-x4": ("ESRGAN", lambda: OldESRGAN(3, 3, features=8, growth=32, blocks=2, upsample_count=2)),
    "esrgan-old-x2": ("ESRGAN", lambda: OldESRGAN(3, 3, features=8, growth=32, blocks=1, upsample_count=1)),
    "realesrgan-x4": ("ESRGAN", lambda: RRDBNet(3, 3, features=8, growth=32, blocks=2, unshuffle=1)),
    "realesrgan-x2-unshuffle": ("ESRGAN", lambda: RRDBNet(3, 3, features=8, growth=32, blocks=2, unshuffle=2)),
    "realesrgan-x1-unshuffle": ("ESRGAN", lambda: RRDBNet(3, 3, features=8, growth=32, blocks=1, unshuffle=4)),
    "srvgg-x4": ("Compact", lambda: SRVGGNetCompact(3, 3, features=8, num_conv=3, scale=4)),
    "srvgg-x2": ("Compact", lambda: SRVGGNetCompact(3, 3, features=8, num_conv=2, scale=2)),
    "swinir-classical-x2": ("SwinIR", lambda: _swinir("pixelshuffle", 2)),
    "swinir-classical-x4": ("SwinIR", lambda: _swinir("pixelshuffle", 4)),
    "swinir-realworld-x4": ("SwinIR", lambda: _swinir("nearest+conv", 4, three_conv=True)),
}


def _random_state_dict(make) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {key: value.clone() for key, value in randomize_weights(make().eval()).state_dict().items()}


def _oracle(family: str, state_dict: dict) -> nn.Module:
    module = spandrel_architecture(family)
    architecture = next(value for name, value in vars(module).items() if name == f"{family}Arch")()
    return architecture.load(dict(state_dict)).model.eval()


@pytest.mark.parametrize("case", sorted(CASES))
def test_output_matches_spandrel_for_the_same_file(case):
    family, make = CASES[case]
    state_dict = _random_state_dict(make)
    # Ours is built from the tensors alone (detection + shapes), as a file would be loaded.
    architecture, ours = upscalers.detect.build_model(dict(state_dict))
    assert type(ours) is type(make())
    oracle = _oracle(family, state_dict)
    # 16x16 is SwinIR's stored training size (its stored attn_mask is used); 13x10 needs reflect padding to the
    # window (SwinIR) or to the unshuffle factor (Real-ESRGAN x2/x1), and a freshly computed shift mask.
    for height, width in ((16, 16), (13, 10)):
        x = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(height))
        with torch.no_grad():
            expected, actual = oracle(x), ours(x)
        assert actual.shape == (1, 3, height * ours.scale, width * ours.scale)
        torch.testing.assert_close(actual, expected, **PARITY_TOLERANCE)


def test_an_unknown_file_is_refused_naming_its_keys():
    with pytest.raises(ValueError, match=r"not a known upscaler model: its key prefixes are encoder\.conv.*known "
                                         r"layouts.*ESRGAN \(model\.0\.weight"):
        upscalers.detect_architecture({"encoder.conv.weight": torch.zeros(1)})


def test_a_truncated_file_says_which_layout_it_resembles():
    state_dict = _random_state_dict(CASES["realesrgan-x4"][1])
    del state_dict["conv_hr.weight"]
    with pytest.raises(ValueError, match=r"(?s)looks like RealESRGAN .* does not load as one.*conv_hr\.weight"):
        upscalers.detect.build_model(state_dict)


def test_files_in_a1111_folders_are_listed_and_upscale_to_the_exact_size(tmp_path):
    # A BasicSR .pth ({"params_ema": ...}) in RealESRGAN/, a .safetensors in ESRGAN/, an unusable file at the top.
    (tmp_path / "RealESRGAN").mkdir()
    (tmp_path / "ESRGAN").mkdir()
    compact = _random_state_dict(CASES["srvgg-x4"][1])
    torch.save({"params_ema": compact, "params": compact}, tmp_path / "RealESRGAN" / "general-x4.pth")
    save_state_dict(_random_state_dict(CASES["esrgan-old-x2"][1]), tmp_path / "ESRGAN" / "old-x2.safetensors")
    save_state_dict({"unrelated.weight": torch.zeros(2)}, tmp_path / "broken.safetensors")

    infos = upscalers.list_upscalers(tmp_path)
    assert [(i.name, i.model_name, i.scale) for i in infos] == [
        ("None", None, 4), ("Lanczos", None, 4), ("Nearest", None, 4), ("broken", None, None),
        ("old-x2", "ESRGAN", 2), ("general-x4", "RealESRGAN compact", 4)]
    assert infos[-1].model_path == str(tmp_path / "RealESRGAN" / "general-x4.pth")

    image = Image.new("RGB", (13, 7), (200, 30, 90))
    for name in ("None", "Lanczos", "Nearest", "old-x2", "general-x4"):
        for scale in (1, 1.5, 2, 2.5, 5):
            assert upscalers.upscale(image, name, scale, tmp_path).size == (round(13 * scale), round(7 * scale))
    # One x4 pass at 2.5x is the model's output resized; two x2 passes (x4) for 2.5x with the x2 model.
    model = upscalers.load_upscaler(tmp_path / "RealESRGAN" / "general-x4.pth")
    once = upscalers.run_model(model, image)
    assert upscalers.upscale(image, "general-x4", 4, tmp_path).tobytes() == once.tobytes()

    with pytest.raises(upscalers.UpscalerError, match=r"broken\.safetensors: not a known upscaler model"):
        upscalers.upscale(image, "broken", 2, tmp_path)
    with pytest.raises(upscalers.UpscalerError, match=r"unknown upscaler 'nope'; available: None, Lanczos, "
                                                      r"Nearest, broken, old-x2, general-x4"):
        upscalers.upscale(image, "nope", 2, tmp_path)
    with pytest.raises(upscalers.UpscalerError, match="latent mode"):
        upscalers.upscale(image, "Latent", 2, tmp_path)


def test_the_upscaled_image_is_the_model_output_rounded():
    # The PIL round trip: input bytes / 255 -> model -> clamp, x255, round.
    state_dict = _random_state_dict(CASES["srvgg-x2"][1])
    architecture, model = upscalers.detect.build_model(state_dict)
    image = Image.fromarray((torch.rand(17, 19, 3, generator=torch.Generator().manual_seed(1)) * 255).byte().numpy())
    result = upscalers.run_model(upscalers.LoadedUpscaler(architecture, model), image)
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        expected = (model(x).clamp(0, 1) * 255).round().byte()[0].permute(1, 2, 0).numpy()
    assert np.array_equal(np.array(result), expected)


@pytest.mark.cuda
def test_fp16_on_the_gpu_stays_within_a_few_levels_of_fp32():
    # ESRGAN-family models run in fp16 on a GPU (SwinIR stays fp32): the 8-bit result may differ by fp16 round-off.
    state_dict = _random_state_dict(CASES["realesrgan-x4"][1])
    architecture, model = upscalers.detect.build_model(state_dict)
    loaded = upscalers.LoadedUpscaler(architecture, model)
    pixels = torch.randint(0, 256, (40, 40, 3), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    image = Image.fromarray(pixels.numpy())
    full = np.array(upscalers.run_model(loaded, image, "cpu")).astype(int)
    half = np.array(upscalers.run_model(loaded, image, "cuda")).astype(int)
    assert np.abs(full - half).mean() < 1 and np.abs(full - half).max() <= 4


class _PointwiseX2(nn.Module):
    """A 1x1 conv then pixel shuffle: every output pixel depends on one input pixel, so tiling must be exact."""

    def __init__(self):
        super().__init__()
        self.scale = 2
        self.proj = nn.Conv2d(3, 12, 1)

    def forward(self, x):
        return nn.functional.pixel_shuffle(self.proj(x), 2)


def test_tiles_blend_to_the_whole_image_result_for_a_pointwise_model():
    model = randomize_weights(_PointwiseX2())
    x = torch.rand(1, 3, 50, 37)
    with torch.no_grad():
        whole = model(x)
    tiled = run_tiled(model, x, scale=2, tile=16, overlap=4)
    torch.testing.assert_close(tiled, whole, rtol=1e-5, atol=1e-6)


def test_tiles_of_a_convolutional_model_differ_only_near_seams():
    _, model = upscalers.detect.build_model(_random_state_dict(CASES["srvgg-x2"][1]))
    x = torch.rand(1, 3, 40, 40, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        whole = model(x)
    tiled = run_tiled(model, x, scale=2, tile=24, overlap=8)
    # Receptive field 5 convs of 3x3 = 5 px; with 8 px of overlap most pixels see their full context in some tile.
    assert (tiled - whole).abs().mean() < 0.02 * whole.abs().mean()


def test_registered_architectures_and_upscalers_are_used_by_name(tmp_path):
    architecture = upscalers.register_architecture("pointwise x2", ["proj.weight", "proj.bias"],
                                                   lambda state_dict: _PointwiseX2())
    upscalers.register_upscaler("Posterize", lambda image, scale: image.quantize(4).convert("RGB"), scale=1)
    try:
        save_state_dict(randomize_weights(_PointwiseX2()).state_dict(), tmp_path / "mine.safetensors")
        infos = {info.name: info for info in upscalers.list_upscalers(tmp_path)}
        assert (infos["mine"].model_name, infos["mine"].scale) == ("pointwise x2", 2)
        assert [name for name in infos][:4] == ["None", "Lanczos", "Nearest", "Posterize"]
        image = Image.new("RGB", (8, 6), (10, 200, 40))
        assert upscalers.upscale(image, "mine", 2, tmp_path).size == (16, 12)
        assert upscalers.upscale(image, "Posterize", 1.5).size == (12, 9)
        with pytest.raises(ValueError, match="already registered"):
            upscalers.register_architecture("pointwise x2", ["x"], lambda state_dict: _PointwiseX2())
    finally:
        upscalers.unregister_architecture(architecture.name)
        upscalers.unregister_upscaler("Posterize")


def _training_example():
    """examples/train_upscaler.py as a module (examples/ is not a package)."""
    path = Path(__file__).resolve().parent.parent / "examples" / "train_upscaler.py"
    spec = importlib.util.spec_from_file_location("train_upscaler", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_a_tiny_rrdbnet_trained_on_shapes_beats_lanczos(tmp_path):
    # 300 steps of a 16-wide, 1-block RRDBNet on 24x24 -> 96x96 crops of shapes renders (about 2 minutes on the
    # shared 2-core CPU). The untrained network is bilinear, below Lanczos; the trained one must be clearly above it
    # on 16 scenes it never saw (docs/RESULTS.md: 33.5 dB against Lanczos's 32.3).
    example = _training_example()
    model, scores = example.train(300, log=lambda text: None)
    assert scores["untrained"] < scores["lanczos"]
    assert scores["trained"] > scores["lanczos"] + 0.5, scores
    # What it saved is an ordinary Real-ESRGAN x4 file: listed, detected and used by name.
    save_state_dict(model.state_dict(), tmp_path / "tiny-rrdbnet-x4.safetensors")
    info = next(i for i in upscalers.list_upscalers(tmp_path) if i.name == "tiny-rrdbnet-x4")
    assert (info.model_name, info.scale) == ("RealESRGAN", 4)
    # Through upscale() by name (the PIL round trip included), on 4 of the held-out scenes.
    low, high = example.render_pairs(100_000, 4)
    images = [Image.fromarray((x.permute(1, 2, 0) * 255).round().byte().numpy()) for x in low]
    as_tensor = lambda pictures: torch.stack(  # noqa: E731
        [torch.from_numpy(np.array(picture)).permute(2, 0, 1) for picture in pictures]).float() / 255
    upscaled = as_tensor([upscalers.upscale(image, "tiny-rrdbnet-x4", 4, tmp_path) for image in images])
    lanczos = as_tensor([image.resize((256, 256), Image.LANCZOS) for image in images])
    assert example.psnr(upscaled, high) > example.psnr(lanczos, high)


@pytest.mark.parametrize("case", ["realesrgan-x2-unshuffle", "swinir-classical-x2"])
def test_images_smaller_than_the_padding_needs_are_upscaled(case, tmp_path):
    save_state_dict(_random_state_dict(CASES[case][1]), tmp_path / "model.safetensors")
    image = Image.new("RGB", (1, 3), (10, 200, 40))
    assert upscalers.upscale(image, "model", 2, tmp_path).size == (2, 6)
