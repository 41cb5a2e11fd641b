"""Does a ControlNet control the layout? Held-out layouts of the shapes world, generated with and without control.

    python -m shapes.control --controlnet outputs/tiny-shapes-controlnet/controlnet.safetensors --n 100 \\
        --grid docs/results/controlnet-shapes.png

For each of n held-out scenes (a random stream no data set uses) the prompt is the scene's caption and the control
image its silhouette (`shapes.world.silhouette`) or, with `--control segmentation`, its colour segmentation
(`shapes.world.segmentation`, for a ControlNet trained on those). The default model generates each prompt three
times with the same seed: without control, with the ControlNet at weight 1, and (for the first `--bitwise-n`) at weight 0. Printed (JSON):
- `iou`: mean over images of the intersection-over-union of the generated objects' silhouette (the judge's coverage
  α > ½, all objects) with the scene's silhouette (coverage > ½), whichever control map was given;
- `layout_position`: share of the scenes' objects whose nearest generated object lies at the same anchor (left,
  right, top, bottom, center), whether or not the prompt names the position;
- the judge's accuracies against the prompts (`shapes.judge.summarize`: position where the prompt names one, colour,
  shape, size, relation) of each run;
- `weight_0_bitwise`: whether every weight-0 image equals its uncontrolled twin byte for byte.
"""
import argparse
import contextlib
import json
import sys

import numpy as np
from tqdm import tqdm

from .captions import random_caption
from .judge import detect_objects, judge, segment_objects
from .world import Vocabulary, sample_scene, segmentation, silhouette

CONTROL_STREAM = 3  # layout i of seed s comes from default_rng([3, s, i]); data sets use [s, i], prompts [1, s, i]
# The control maps a layout can be given as (`python -m shapes make --silhouettes / --segmentation` train on them):
# name -> function(scene, width, height) -> RGB image. Add an entry to measure a ControlNet trained on another map.
CONTROL_MAPS = {"silhouette": silhouette, "segmentation": segmentation}


def held_out_layouts(n: int, seed: int = 0, size: int = 64, two_object_fraction: float = 0.4,
                     control: str = "silhouette"):
    """[(prompt, control image, scene)] of n scenes from a stream no data set or held-out prompt set uses; the
    control image is CONTROL_MAPS[control] of the scene. The scenes do not depend on `control`."""
    if control not in CONTROL_MAPS:
        raise ValueError(f"control map {control!r} is not one of {', '.join(CONTROL_MAPS)} "
                         "(shapes.control.CONTROL_MAPS)")
    layouts = []
    for index in range(n):
        rng = np.random.default_rng([CONTROL_STREAM, seed, index])
        scene = sample_scene(rng, Vocabulary(), two_object_fraction, 0.0, size, size)
        layouts.append((random_caption(rng, scene), CONTROL_MAPS[control](scene, size, size), scene))
    return layouts


def layout_positions(image, scene) -> list[bool]:
    """Per object of the scene: does the detected object nearest to it (centroid distance) lie at its anchor? The
    layout's position whether or not the prompt names it."""
    found = detect_objects(image)
    return [bool(found) and min(found, key=lambda f: (f.x - o.x) ** 2 + (f.y - o.y) ** 2).position == o.position
            for o in scene.objects]


def silhouette_iou(image, control) -> float:
    """IoU of the objects the judge finds in `image` (coverage > ½) with the silhouette `control` (grey > ½)."""
    wanted = np.asarray(control.convert("L"), dtype=np.float64) > 127.5
    found = np.zeros_like(wanted)
    for _, alpha in segment_objects(image):
        found |= alpha > 0.5
    union = (wanted | found).sum()
    return float((wanted & found).sum() / union) if union else 1.0


@contextlib.contextmanager
def controlled(model, controlnet, hint, weight: float):
    """`model.apply_model` adds `controlnet`'s residuals for control image `hint` [1, 3, H, W] in [0, 1], × weight,
    to every UNet call (the conditional and unconditional halves of CFG alike), for the duration of the block."""
    import torch

    from ldm.controlnet import sum_residuals
    plain = model.apply_model

    def apply_model(x, t, context, y=None):
        with torch.no_grad():
            residuals = controlnet(x, hint.to(x).expand(x.shape[0], -1, -1, -1), t, context, y)
        return plain(x, t, context, y, control=sum_residuals([residuals], [weight]))

    model.apply_model = apply_model  # an instance attribute shadowing the method until the block ends
    try:
        yield
    finally:
        del model.apply_model


def evaluate(controlnet_path: str, n: int, seed: int = 0, steps: int = 20, cfg_scale: float = 7.0,
             grid: str | None = None, bitwise_n: int = 10, control: str = "silhouette") -> dict:
    import torch

    from ldm.controlnet import load_controlnet
    from sample.generate import GenerationParams, generate
    from sample.models import default_model

    checkpoint = default_model()
    controlnet = load_controlnet(controlnet_path, dtype=checkpoint.model.dtype).eval()
    size = checkpoint.model.preset.resolution
    layouts = held_out_layouts(n, seed, size, control=control)
    runs = {"none": [], "weight_1": [], "weight_0": []}
    for index, (prompt, control_image, _) in enumerate(tqdm(layouts, desc="generate", file=sys.stderr)):
        params = GenerationParams(prompt=prompt, steps=steps, cfg_scale=cfg_scale, seed=seed + index)
        runs["none"].extend(generate(checkpoint, params, progress=False).images)
        hint = torch.from_numpy(np.asarray(control_image, dtype=np.float32) / 255).permute(2, 0, 1)[None]
        for name, weight in (("weight_1", 1.0), ("weight_0", 0.0)):
            if name == "weight_0" and index >= bitwise_n:
                continue
            with controlled(checkpoint.model, controlnet, hint, weight):
                runs[name].extend(generate(checkpoint, params, progress=False).images)
    prompts = [prompt for prompt, _, _ in layouts]
    controls = [image for _, image, _ in layouts]
    # IoU is measured against the silhouette whichever map steered: a colour map's dark colours are not "white".
    silhouettes = [silhouette(scene, size, size) for _, _, scene in layouts]
    report = {"images": n, "seed": seed, "steps": steps, "cfg_scale": cfg_scale, "control": control}
    for name, images in runs.items():
        if not images:  # --bitwise-n 0: no weight-0 run
            continue
        summary, _ = judge(images, prompts[:len(images)])
        positions = [right for image, (_, _, scene) in zip(images, layouts) for right in layout_positions(image, scene)]
        report[name] = {"images": len(images),
                        "iou": round(float(np.mean([silhouette_iou(i, c) for i, c in zip(images, silhouettes)])), 4),
                        "layout_position": round(float(np.mean(positions)), 4),
                        **{key: summary[key] for key in ("position", "colour", "shape", "size", "relation",
                                                          "count", "single_object", "two_object")}}
    if runs["weight_0"]:
        pairs = zip(runs["none"], runs["weight_0"])
        report["weight_0_bitwise"] = all(a.tobytes() == b.tobytes() for a, b in pairs)
    if grid:
        save_rows([("control", controls), ("no control", runs["none"]), ("ControlNet", runs["weight_1"])],
                  prompts, grid)
    return report


def save_rows(rows: list[tuple[str, list]], prompts: list[str], path: str, columns: int = 8, cell: int = 128) -> None:
    """A PNG with one labelled row per (label, images), the first `columns` images each, prompts on top."""
    from PIL import Image, ImageDraw
    label_width, text_height = 90, 28
    sheet = Image.new("RGB", (label_width + columns * cell, text_height + len(rows) * cell), "white")
    draw = ImageDraw.Draw(sheet)
    for column, prompt in enumerate(prompts[:columns]):
        words = prompt.split()
        half = (len(words) + 1) // 2
        draw.text((label_width + column * cell + 2, 2), " ".join(words[:half]), fill="black")
        draw.text((label_width + column * cell + 2, 14), " ".join(words[half:]), fill="black")
    for row, (label, images) in enumerate(rows):
        top = text_height + row * cell
        draw.text((4, top + cell // 2 - 6), label, fill="black")
        for column, image in enumerate(images[:columns]):
            sheet.paste(image.convert("RGB").resize((cell, cell), Image.Resampling.NEAREST),
                        (label_width + column * cell, top))
    from ldm.files import atomic_write
    with atomic_write(path) as file:
        sheet.save(file, format="PNG")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shapes.control", description=__doc__.split("\n")[0])
    parser.add_argument("--controlnet", required=True, metavar="PATH", help="ControlNet file for the default model")
    parser.add_argument("--n", type=int, default=100, help="number of held-out layouts")
    parser.add_argument("--seed", type=int, default=0, help="seed of the layouts and of image 0")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps (Euler a)")
    parser.add_argument("--cfg-scale", type=float, default=7.0, help="CFG scale")
    parser.add_argument("--grid", metavar="PNG", help="write a before/after grid of the first 8 layouts here")
    parser.add_argument("--bitwise-n", type=int, default=10, metavar="N",
                        help="also generate the first N layouts at control weight 0 (compared with no control)")
    parser.add_argument("--control", choices=sorted(CONTROL_MAPS), default="silhouette",
                        help="the control map the ControlNet was trained on (shapes.control.CONTROL_MAPS)")
    args = parser.parse_args(argv)
    print(json.dumps(evaluate(args.controlnet, args.n, args.seed, args.steps, args.cfg_scale, args.grid,
                              args.bitwise_n, args.control), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
