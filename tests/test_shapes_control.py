"""shapes.control, the measurement of a ControlNet on the shapes world: its metrics on ground-truth renders, and
control weight 0 reproducing the uncontrolled image bitwise through the generation pipeline."""
import json

import pytest

from shapes.control import controlled, held_out_layouts, layout_positions, silhouette_iou
from shapes.world import render

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_ground_truth_render_agrees_with_its_own_layout():
    layouts = held_out_layouts(12, seed=5)
    assert [prompt for prompt, _, _ in layouts] == [prompt for prompt, _, _ in held_out_layouts(12, seed=5)]
    for prompt, control, scene in layouts:
        # Coverage > ½ on both sides: only antialiased edge pixels whose colour sits near the judge's threshold differ.
        assert silhouette_iou(render(scene), control) > 0.9, prompt
        assert all(layout_positions(render(scene), scene)), prompt
    _, control, scene = layouts[0]
    assert silhouette_iou(render(held_out_layouts(2, seed=6)[1][2]), control) < 0.5  # another layout does not fit


def test_control_weight_zero_reproduces_the_uncontrolled_image_bitwise():
    import torch

    from ldm.controlnet import from_unet
    from random_weights import randomize_weights
    from sample.generate import GenerationParams, generate
    from sample.models import default_model

    checkpoint = default_model()
    net = randomize_weights(from_unet(checkpoint.model), seed=0).eval()  # non-zero residuals everywhere
    prompt, _, _ = held_out_layouts(1)[0]
    hint = torch.rand(1, 3, 64, 64)  # the default model's image size (its autoencoder downsamples 4×)
    params = GenerationParams(prompt=prompt, steps=3, seed=1)
    plain = generate(checkpoint, params, progress=False).images[0]
    with controlled(checkpoint.model, net, hint, 0.0):
        weight_0 = generate(checkpoint, params, progress=False).images[0]
    with controlled(checkpoint.model, net, hint, 1.0):
        weight_1 = generate(checkpoint, params, progress=False).images[0]
    assert weight_0.tobytes() == plain.tobytes()
    assert weight_1.tobytes() != plain.tobytes()
    assert "apply_model" not in vars(checkpoint.model)  # the wrapper is gone after the block


def test_make_dataset_writes_silhouette_control_images_for_controlnet_training(tmp_path):
    from PIL import Image

    from shapes.dataset import make_dataset, sample
    from shapes.world import Vocabulary, silhouette
    rows = make_dataset(tmp_path, 3, seed=2, silhouettes=True)
    for index, row in enumerate(rows):
        scene, _ = sample(2, index, Vocabulary())
        with Image.open(tmp_path / row["conditioning_image"]) as control:
            assert control.tobytes() == silhouette(scene).tobytes()
        with Image.open(tmp_path / row["file_name"]) as image:
            assert silhouette_iou(image, silhouette(scene)) > 0.9


def test_make_dataset_writes_colour_segmentation_control_images(tmp_path):
    import numpy as np
    from PIL import Image

    from shapes.__main__ import main
    from shapes.dataset import make_dataset, sample
    from shapes.world import PALETTE, Vocabulary, coverage, segmentation
    assert main(["make", "--out", str(tmp_path / "cli"), "--n", "3", "--seed", "2", "--segmentation"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "cli" / "metadata.jsonl").read_text().splitlines()]
    for index, row in enumerate(rows):
        scene, _ = sample(2, index, Vocabulary())
        with Image.open(tmp_path / "cli" / row["conditioning_image"]) as control:
            assert row["conditioning_image"].endswith("-segmentation.png")
            assert control.tobytes() == segmentation(scene).tobytes()
        # The map is the render on black instead of white: render = map + 255·Π(1 − αᵢ) (both start from their
        # background and blend the same colours by the same coverages), to ±1 from each image's rounding.
        uncovered = np.prod([1 - coverage(obj, 64, 64) for obj in scene.objects], axis=0)[..., None]
        with Image.open(tmp_path / "cli" / row["file_name"]) as image:
            difference = np.asarray(image, float) - (np.asarray(control, float) + 255 * uncovered)
        assert np.abs(difference).max() <= 1
        # Inside each object the map is that object's flat palette colour.
        for obj in scene.objects:
            inside = coverage(obj, 64, 64) == 1
            assert inside.any()
            colours = np.asarray(control)[inside]
            if len(scene.objects) == 1:
                assert (colours == PALETTE[obj.colour]).all()
    with pytest.raises(ValueError, match="silhouettes or segmentation maps"):
        make_dataset(tmp_path / "both", 1, silhouettes=True, segmentation_maps=True)


def test_held_out_segmentation_layouts_are_the_silhouette_layouts_in_colour():
    from shapes.world import segmentation
    plain, coloured = held_out_layouts(6, seed=4), held_out_layouts(6, seed=4, control="segmentation")
    for (prompt, silhouette_map, scene), (coloured_prompt, colour_map, coloured_scene) in zip(plain, coloured):
        assert (prompt, scene) == (coloured_prompt, coloured_scene)
        assert colour_map.tobytes() == segmentation(scene).tobytes()
        assert silhouette_iou(render(scene), silhouette_map) > 0.9
    with pytest.raises(ValueError, match="'edges' is not one of silhouette, segmentation"):
        held_out_layouts(1, control="edges")


@pytest.mark.parametrize("name", ["tiny-shapes-controlnet", "tiny-shapes-controlnet-seg"])
def test_the_shipped_controlnets_fit_the_default_model_and_are_small(name):
    from pathlib import Path

    import torch

    import ldm
    from ldm.controlnet import load_controlnet
    path = Path(ldm.__file__).parent / "data" / f"{name}.safetensors"
    assert path.stat().st_size <= 10 * 2 ** 20
    net = load_controlnet(path)
    model = ldm.load_model(Path(ldm.__file__).parent / "data" / "tiny-shapes.safetensors")
    assert net.dtype == torch.float16 and net.hint_downscale == model.first_stage_model.downscale == 4
    assert net.encoder_config == model.unet.encoder_config
