"""Control images computed from training images, for ControlNet training without a column of control-image files.

Each function maps the cropped, flipped training image, pixels [3, h, w] in [-1, 1], to its control image
[3, h, w] in [0, 1] (white marks, black elsewhere, as lllyasviel's maps). Choose one by name with
`conditioning_function = "NAME"`; add your own without editing the library:

    from train.conditioning import CONDITIONING_FUNCTIONS
    CONDITIONING_FUNCTIONS["edges"] = my_edge_map     # a module-level function (data-loader workers pickle it)
"""
from collections.abc import Callable

import torch

from shapes.judge import BACKGROUND_TOLERANCE


def silhouette(pixels: torch.Tensor) -> torch.Tensor:
    """Where the image is not background white, by the shapes judge's rule (RGB distance from white above
    BACKGROUND_TOLERANCE): the objects' silhouettes in a shapes-world image. [3, h, w] in [-1, 1] -> {0, 1}."""
    distance = ((1 - pixels) * 127.5).norm(dim=0)  # [h, w]: RGB distance from white in 0..255 units
    return (distance > BACKGROUND_TOLERANCE).to(pixels.dtype).expand(3, -1, -1).contiguous()


CONDITIONING_FUNCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silhouette": silhouette,
}
