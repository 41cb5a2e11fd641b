"""python -m benchmarks.heart make|judge ...: `python -m shapes` with a heart registered, for the forgetting pilot.

The shapes world learns a shape outside its vocabulary through `shapes.register_shape`; this command registers the
heart curve (the one of tests/test_shapes.py and the shapes package docstring) for one run of `python -m shapes`, so
its data sets can hold hearts and its judge can score them (docs/RESULTS.md, "Forgetting pilot"):

    python -m benchmarks.heart make --out data/hearts --n 80 --seed 3 --shapes circle,square,triangle,star,hexagon,cross,heart --require-shape heart
    python -m benchmarks.heart judge --model default+outputs/heart/heart.safetensors --n 200 --shapes ...,heart --require-shape heart
"""
import sys

import numpy as np

from shapes import registered_shape
from shapes.__main__ import main as shapes_main


def heart(t: np.ndarray) -> np.ndarray:
    """The heart curve; t [N] in [0, 2π) -> outline points [N, 2], y downwards."""
    return np.stack([16 * np.sin(t) ** 3,
                     -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))], axis=1)


def main(argv=None) -> int:
    with registered_shape("heart", heart):
        return shapes_main(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
