"""Image helpers: resize modes, masked fill, "only masked" crop boxes, atomic PNG writing with infotext, A1111 names."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from sample.images import (ImageError, filename_part, fill_masked, image_grid, mask_crop_region, next_sequence_number,
                           open_image, read_infotext, resize_image, save_png, to_pil, to_tensor)
from sample.styles import Style, apply_styles


def striped(width, height):
    """Left half red, right half blue."""
    image = Image.new("RGB", (width, height), (255, 0, 0))
    image.paste((0, 0, 255), (width // 2, 0, width, height))
    return image


def test_resize_modes_stretch_crop_and_fill():
    source = striped(40, 20)  # 2:1
    assert resize_image(source, 16, 16, 0).size == (16, 16)
    cropped = np.asarray(resize_image(source, 16, 16, 1))  # cover: the middle 20x20 of the source
    assert cropped.shape == (16, 16, 3) and cropped[8, 1, 0] > 200 and cropped[8, 14, 2] > 200
    filled = np.asarray(resize_image(source, 16, 16, 2))  # fit 16x8 in the middle, bands repeat the edge rows
    assert filled.shape == (16, 16, 3)
    np.testing.assert_array_equal(filled[0], filled[4])
    np.testing.assert_array_equal(filled[15], filled[11])


def test_fill_paints_the_hole_with_the_surrounding_colour():
    image = Image.new("RGB", (32, 32), (0, 128, 255))
    image.paste((255, 255, 255), (8, 8, 24, 24))  # what the mask hides must not leak into the fill
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    filled = np.asarray(fill_masked(image, mask)).astype(int)
    # 8-bit premultiplied blurs lose a few levels; the white under the mask must not show at all.
    assert np.abs(filled[8:24, 8:24] - (0, 128, 255)).max() <= 6
    assert (filled[:8] == (0, 128, 255)).all()


def test_only_masked_crop_box_pads_the_mask_and_takes_the_target_aspect_ratio():
    mask = Image.new("L", (100, 80), 0)
    mask.paste(255, (40, 30, 50, 40))  # 10x10 at (40, 30)
    assert mask_crop_region(mask, 5, 64, 64) == (35, 25, 55, 45)
    x1, y1, x2, y2 = mask_crop_region(mask, 5, 128, 64)  # 2:1 target widens the box
    assert (x2 - x1, y2 - y1) == (40, 20) and x1 <= 35 and x2 >= 55
    # Padded past the image: clipped to it; the square cannot fit, so the box keeps the image's full height.
    assert mask_crop_region(mask, 40, 64, 64) == (0, 0, 90, 80)
    assert mask_crop_region(Image.new("L", (10, 10), 0), 4, 8, 8) is None


def test_decoded_images_go_to_8_bits_by_truncation_like_a1111():
    levels = torch.tensor([-2.0, -1.0, 0.0, 2 * 100.9 / 255 - 1, 1.0, 3.0]).reshape(1, 1, 1, 6).expand(1, 3, 1, 6)
    assert np.asarray(to_pil(levels)[0])[0, :, 0].tolist() == [0, 0, 127, 100, 255, 255]
    image = Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3))
    assert torch.equal(to_tensor(image), torch.from_numpy(np.asarray(image) / 127.5 - 1).permute(2, 0, 1)[None]
                       .float())


def test_png_is_written_atomically_with_its_infotext(tmp_path):
    infotext = "a caf\u00e9 \u2603\nSteps: 2, Sampler: Euler, Seed: 1"
    path = save_png(Image.new("RGB", (4, 4)), str(tmp_path / "out" / "x.png"), infotext)
    assert read_infotext(path) == infotext
    assert os.listdir(tmp_path / "out") == ["x.png"]
    with pytest.raises(ImageError, match="image not found"):
        read_infotext(tmp_path / "missing.png")
    (tmp_path / "bad.png").write_bytes(b"nope")
    with pytest.raises(ImageError, match="cannot read image"):
        open_image(tmp_path / "bad.png")


def test_a1111_file_names_and_numbering(tmp_path):
    assert filename_part('a <lora:x:1>, "quoted" / path?') == "a _lora_x_1_, _quoted_ _ path_"
    assert len(filename_part("word " * 100)) <= 128
    assert next_sequence_number(str(tmp_path)) == 0
    for name in ("00007-1-a.png", "00012-3-b.png", "grid-0004.png", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert next_sequence_number(str(tmp_path)) == 13
    assert next_sequence_number(str(tmp_path), "grid-") == 5


def test_grid_has_round_sqrt_rows():
    grid = image_grid([Image.new("RGB", (8, 4))] * 5)  # 5 images: 2 rows of 3
    assert grid.size == (24, 8)


def test_styles_wrap_or_append_to_the_prompt():
    styles = {"cine": Style("cine", "cinematic still of {prompt}, film grain", "cartoon"),
              "sharp": Style("sharp", "sharp focus", "")}
    assert apply_styles("a cat", "blurry", ["cine", "sharp"], styles) == \
        ("cinematic still of a cat, film grain, sharp focus", "blurry, cartoon")
    with pytest.raises(KeyError, match="unknown style 'x'"):
        apply_styles("a", "", ["x"], styles)
