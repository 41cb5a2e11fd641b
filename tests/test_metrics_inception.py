"""The FID Inception-v3 against torch-fidelity's port (same weight file), and the 299x299 input conventions against
torch-fidelity's, clean-fid's and pytorch-fid's resizing."""
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import metrics.inception as inception
from ldm.checkpoint import CheckpointError
from metrics.features import read_image
from metrics.inception import FIDInceptionV3, is_standard_weights, load_inception
from metrics.resize import inception_input, tf1_bilinear
from metrics_oracles import cleanfid_resize, torch_fidelity_module
from oracles import find_oracle
from random_weights import randomize_weights


def calibrated_random_inception(seed: int = 0, size: int = 107) -> FIDInceptionV3:
    """Random weights with batch-norm statistics measured on random images (as a trained network's are on data), so
    that activations stay O(1) and depend on the input through all 94 convolutions; with arbitrary statistics the
    deep features come out the same for every image and a parity test would compare constants."""
    model = randomize_weights(FIDInceptionV3(), seed)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # cumulative average: one batch sets the statistics exactly
    model.train()
    with torch.no_grad():
        model(torch.rand(4, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1)
    return model.eval()


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    torch.save(calibrated_random_inception().state_dict(), path)
    return path


def torch_fidelity_extractor(path: Path):
    module = torch_fidelity_module("feature_extractor_inceptionv3")
    # Its constructor loads the file with a strict load_state_dict: our module tree's keys and shapes are its.
    return module, module.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased", "logits"],
                                                      feature_extractor_weights_path=str(path))


def test_network_matches_torch_fidelity_on_random_weights(weights_file, monkeypatch):
    module, reference = torch_fidelity_extractor(weights_file)
    # torch-fidelity always resizes to 299 first; bypassing that (the resize is tested separately below) lets the
    # whole network run on a 107x107 input, 8x cheaper, through every block with full-size channels.
    monkeypatch.setattr(module, "interpolate_bilinear_2d_like_tensorflow1x", lambda x, size, align_corners: x)
    pixels = torch.randint(0, 256, (2, 3, 107, 107), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    ours = load_inception(weights_file)
    with torch.no_grad():
        features, logits_unbiased, logits = reference(pixels)
        our_features, our_logits = ours((pixels.float() - 128) / 128)
    assert features.std(dim=0).mean() > 0.1 * features.abs().mean()  # the images give different features
    torch.testing.assert_close(our_features, features, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(our_logits, logits_unbiased, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(our_logits + ours.fc.bias, logits, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_full_pipeline_matches_torch_fidelity_at_299_from_small_uint8_images(weights_file):
    """Resize (TensorFlow 1.x bilinear) + network, end to end, as torchmetrics' FID computes features."""
    _, reference = torch_fidelity_extractor(weights_file)
    pixels = torch.randint(0, 256, (2, 3, 64, 80), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    with torch.no_grad():
        features, logits_unbiased, _ = reference(pixels)
        our_features, our_logits = load_inception(weights_file)(inception_input(pixels / 255, "torch-fidelity"))
    torch.testing.assert_close(our_features, features, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(our_logits, logits_unbiased, rtol=1e-4, atol=1e-4)


def test_standard_weight_file_is_the_one_pytorch_fid_and_torch_fidelity_download():
    """pytorch-fid and torch-fidelity publish the weights under two names with one SHA-256 prefix (the hub
    convention's file-name suffix): the same file, whose key layout the strict load above checks."""
    spec = find_oracle("pytorch_fid")
    source = (Path(spec.submodule_search_locations[0]) / "inception.py").read_text()
    pytorch_fid_name = re.search(r"FID_WEIGHTS_URL = '[^']*/([^'/]+)'", source).group(1)
    torch_fidelity_name = torch_fidelity_module("feature_extractor_inceptionv3").URL_INCEPTION_V3.rsplit("/", 1)[1]
    assert pytorch_fid_name == inception.STANDARD_WEIGHTS_NAME
    assert torch_fidelity_name.endswith(f"-{inception.STANDARD_SHA256_PREFIX}.pth")
    # pytorch-fid's FID-specific blocks are ours, with the same arguments, at the same places.
    with torch.device("meta"):
        model = FIDInceptionV3()
    patched = re.findall(r"inception\.(Mixed_\w+) = FID(Inception\w)(_\d)?\((\d+)(?:, (\w+)=(\d+))?\)", source)
    assert len(patched) == 9
    for name, block, variant, in_channels, argument, value in patched:
        ours = getattr(model, name)
        assert type(ours).__name__ == block and ours.branch1x1.conv.in_channels == int(in_channels)
        if argument == "pool_features":
            assert ours.branch_pool.conv.out_channels == int(value)
        elif argument == "channels_7x7":
            assert ours.branch7x7_1.conv.out_channels == int(value)
        if variant:  # FIDInceptionE_1 pools its side branch with an average, _2 with a max
            assert ours.pool == {"_1": "avg", "_2": "max"}[variant]


def test_weight_file_recognition_is_by_content_hash(weights_file, monkeypatch):
    assert not is_standard_weights(weights_file)
    monkeypatch.setattr(inception, "STANDARD_SHA256_PREFIX", inception.file_sha256(weights_file)[:8])
    assert is_standard_weights(weights_file)


def test_load_inception_accepts_files_without_batch_norm_counters(weights_file, tmp_path):
    state_dict = torch.load(weights_file)
    without = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    assert len(without) < len(state_dict)
    torch.save(without, tmp_path / "without.pth")
    model = load_inception(tmp_path / "without.pth")
    torch.testing.assert_close(model.Mixed_7c.branch_pool.bn.running_var,
                               state_dict["Mixed_7c.branch_pool.bn.running_var"])


def test_load_inception_names_missing_unexpected_and_misshapen_tensors(weights_file, tmp_path):
    state_dict = torch.load(weights_file)
    broken = {**{k: v for k, v in state_dict.items() if k != "fc.bias"}, "AuxLogits.fc.weight": torch.zeros(1)}
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError, match=r"1 missing key\(s\) \['fc.bias'\], 1 unexpected key\(s\) "
                                              r"\['AuxLogits.fc.weight'\].*pt_inception-2015-12-05-6726825d.pth"):
        load_inception(tmp_path / "broken.pth")
    torch.save({**state_dict, "fc.weight": torch.zeros(1000, 2048)}, tmp_path / "imagenet_fc.pth")
    with pytest.raises(CheckpointError, match="fc.weight"):
        load_inception(tmp_path / "imagenet_fc.pth")


# --- the 299x299 input conventions ---------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(64, 64), (512, 384), (300, 299)])
def test_tf1_bilinear_matches_torch_fidelity(size):
    interpolate = torch_fidelity_module("interpolate_compat_tensorflow").interpolate_bilinear_2d_like_tensorflow1x
    x = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(3)) * 255
    expected = interpolate(x, size=(299, 299), align_corners=False)
    torch.testing.assert_close(tf1_bilinear(x, 299), expected, rtol=0, atol=0)  # float32 coordinates as in TF


def random_photo(height: int, width: int, seed: int) -> torch.Tensor:
    """[3, H, W] in [0, 1] already on the 8-bit grid, like a decoded PNG."""
    return torch.randint(0, 256, (3, height, width), generator=torch.Generator().manual_seed(seed)) / 255


@pytest.mark.parametrize("size", [(64, 64), (512, 384)])
def test_clean_convention_matches_clean_fid_resizer(size):
    image = random_photo(*size, seed=4)
    resize = cleanfid_resize().make_resizer("PIL", False, "bicubic", (299, 299))  # clean-fid's "clean" mode
    expected = resize((image * 255).round().byte().permute(1, 2, 0).numpy())  # [299, 299, 3] in [0, 255]
    ours = inception_input(image[None], "clean")[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(ours, (expected - 128) / 128, rtol=0, atol=1e-6)


def test_pytorch_fid_convention_matches_clean_fids_legacy_pytorch_resizer():
    image = random_photo(96, 128, seed=5)
    resize = cleanfid_resize().make_resizer("PyTorch", False, "bilinear", (299, 299))
    expected = resize((image * 255).round().permute(1, 2, 0).numpy())  # interpolation in [0, 255]
    ours = inception_input(image[None], "pytorch-fid")[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(ours, 2 * expected / 255 - 1, rtol=0, atol=1e-5)


def test_conventions_differ_only_by_scaling_at_299():
    image = random_photo(299, 299, seed=6)[None]
    clean, fidelity, legacy = (inception_input(image, c) for c in ("clean", "torch-fidelity", "pytorch-fid"))
    torch.testing.assert_close(clean, fidelity, rtol=0, atol=0)
    torch.testing.assert_close(legacy, 2 * image - 1)
    torch.testing.assert_close(clean, (image * 255 - 128) / 128)


@pytest.mark.parametrize("convention", ["clean", "pytorch-fid", "torch-fidelity"])
def test_images_in_memory_and_saved_as_png_give_the_same_input(convention, tmp_path):
    """Quantisation to 8 bits happens first, so scoring a batch before or after writing it to PNG is identical."""
    image = torch.rand(3, 40, 56, generator=torch.Generator().manual_seed(7))
    pixels = (image * 255).round().byte().permute(1, 2, 0).numpy()
    Image.fromarray(pixels).save(tmp_path / "image.png")
    from_file = inception_input([read_image(tmp_path / "image.png")], convention)
    torch.testing.assert_close(inception_input(image[None], convention), from_file, rtol=0, atol=0)


def test_batches_of_mixed_sizes_are_resized_one_by_one():
    images = [random_photo(40, 50, 8), random_photo(64, 64, 9)]
    batch = inception_input(images, "torch-fidelity")
    torch.testing.assert_close(batch[1:], inception_input(images[1][None], "torch-fidelity"))
    with pytest.raises(ValueError, match="unknown resize convention 'bicubic'"):
        inception_input(images, "bicubic")
