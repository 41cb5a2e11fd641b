"""The shapes world: a synthetic text–image domain whose every image has a known, machine-checkable content.

    python -m shapes make --out data/shapes --n 20000 --seed 0        # a captioned data set with its ground truth
    python -m shapes judge --model default --n 200                     # how well a model draws what it is asked
    python -m shapes text --model M --data data/shapes --out T         # stage 2 of the recipe (docs/SHAPES.md)

- `shapes.world`: the vocabulary (shapes, colours, sizes, positions, relations), random scenes, the renderer, and
  `register_shape` to add a shape without editing this package;
- `shapes.captions`: caption templates and the parser that reads a prompt back to the objects it asks for;
- `shapes.dataset`: data sets as an imagefolder and webdataset shards;
- `shapes.judge`: the detector that reads objects back from images, the scorer and the labelled grid;
- `shapes.text`: the text-encoder stage (the only part that needs torch, `ldm` and `train`; not imported here).

`train` and `metrics` use this package; it imports neither of them (except `shapes.text`, which reads data sets with
`train.data`).

    def heart(t):  # the heart curve; t [N] in [0, 2π) -> points [N, 2], y downwards
        return np.stack([16 * np.sin(t) ** 3,
                         -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))], axis=1)

    with shapes.registered_shape("heart", heart):
        scene, text = shapes.sample(0, 0, shapes.Vocabulary(shapes.SHAPES + ("heart",), required_shapes=("heart",)))
        shapes.detect_objects(shapes.render(scene))   # [DetectedObject(shape='heart', ...)]
"""
from .captions import CaptionError, Expectation, ExpectedObject, caption, parse_caption, random_caption
from .dataset import make_dataset, sample
from .judge import DetectedObject, detect_objects, held_out_prompts, judge, save_grid, score_image, segment_objects
from .world import (COLOURS, SHAPES, Scene, SceneObject, Vocabulary, WorldObject, register_shape, registered_shape,
                    render, shape_names, unregister_shape)

__all__ = ["CaptionError", "Expectation", "ExpectedObject", "caption", "parse_caption", "random_caption",
           "make_dataset", "sample", "DetectedObject", "detect_objects", "held_out_prompts", "judge", "save_grid",
           "score_image", "segment_objects", "COLOURS", "SHAPES", "Scene", "SceneObject", "Vocabulary", "WorldObject", "register_shape",
           "registered_shape", "render", "shape_names", "unregister_shape"]
