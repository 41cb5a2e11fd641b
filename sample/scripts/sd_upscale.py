"""A1111's SD upscale (img2img): upscale the init image, then redraw it with img2img tile by tile and blend the tiles.

Tiles have the request's width x height (the size the model draws well); neighbours overlap by at least `overlap`
pixels and are spread evenly over the image (A1111's split_grid). They are redrawn batch_size at a time; tile i of
upscale n has seed `seed + n + i`, as A1111's loop over one-image batches gives them. The tiles are blended back with linear ramps across each overlap.
"""
import dataclasses
import math

import numpy as np
from PIL import Image

from ..generate import Result
from ..infotext import quote
from ..params import GenerationParams
from ..rng import fixed_seed
from ..upscalers import target_size, upscale_to, upscaler_names
from .base import Script, ScriptArg, ScriptError, ScriptJob, register_script

def upscaler_choices(mode: str, options: dict) -> list[str]:
    """The upscalers SD upscale offers: the built-ins, the registered ones and the models in the job's
    `upscaler_dir` (sample.upscalers), in /sdapi/v1/upscalers' order, so an index means the same upscaler."""
    return upscaler_names(options.get("upscaler_dir"))


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Where tiles of `tile` pixels start along a side of `length` pixels so that neighbours overlap by at least
    `overlap` pixels and the last one ends at the edge (A1111's split_grid)."""
    count = max(math.ceil((length - overlap) / (tile - overlap)), 1)
    spacing = (length - tile) / (count - 1) if count > 1 else 0
    return [min(int(i * spacing), length - tile) for i in range(count)]


def blend_tiles(tiles: list[Image.Image], xs: list[int], ys: list[int], size: tuple[int, int]) -> Image.Image:
    """Tiles (row by row, len(xs) per row) put back on a `size` canvas; each tile fades in linearly over the
    columns and rows it shares with the tile left of it and the row above."""
    canvas = np.zeros((size[1], size[0], 3), dtype=np.float64)
    for i, tile in enumerate(tiles):
        column, row = i % len(xs), i // len(xs)
        x, y = xs[column], ys[row]
        pixels = np.asarray(tile, dtype=np.float64)
        height, width = pixels.shape[:2]
        weight = np.ones((height, width, 1))
        if column:
            shared = xs[column - 1] + width - x  # columns this tile shares with its left neighbour
            weight[:, :shared] *= np.linspace(0, 1, shared + 2)[1:-1].reshape(1, shared, 1)
        if row:
            shared = ys[row - 1] + height - y
            weight[:shared] *= np.linspace(0, 1, shared + 2)[1:-1].reshape(shared, 1, 1)
        region = canvas[y:y + height, x:x + width]
        canvas[y:y + height, x:x + width] = region * (1 - weight) + pixels * weight
    return Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8))


def run(job: ScriptJob, params: GenerationParams, args: list) -> Result:
    _, overlap, upscaler, scale = args
    directory = job.generate_options.get("upscaler_dir")
    name = upscaler_names(directory)[upscaler]
    if params.mask is not None:
        raise ScriptError("SD upscale redraws the whole image; send it without a mask")
    width = params.width or job.model.model.preset.resolution
    height = params.height or job.model.model.preset.resolution
    if overlap >= min(width, height):
        raise ScriptError(f"Tile overlap {overlap} must be smaller than the tile ({width}x{height}: the request's "
                          "width and height)")
    source = params.init_images[0]
    target = source.size if name == "None" else target_size(source.size, scale)
    if target[0] < width or target[1] < height:
        raise ScriptError(f"the upscaled image is {target[0]}x{target[1]}, smaller than one tile "
                          f"({width}x{height}); lower width/height or raise the scale factor")
    xs, ys = tile_starts(target[0], width, overlap), tile_starts(target[1], height, overlap)
    seed = fixed_seed(params.seed)
    # Tiles go batch_size at a time through one generate() call; tile i of upscale n has seed seed + n + i either
    # way (image k of a batch has the batch's seed + k).
    count = len(xs) * len(ys)
    starts = range(0, count, params.batch_size)
    calls = [dataclasses.replace(params, width=width, height=height, batch_count=1,
                                 batch_size=min(params.batch_size, count - start)) for start in starts]
    # The work is known from the tile count: it is checked before the (possibly slow) upscale.
    job.check_work(calls * params.batch_count, f"SD upscale's {count} tiles x {params.batch_count} images")
    image = upscale_to(source, name, target, directory, device=job.model.model.device)
    tiles = [image.crop((x, y, x + width, y + height)) for y in ys for x in xs]
    fields = {"SD upscale overlap": overlap, "SD upscale upscaler": name}
    images, infotexts, seeds, subseeds, warnings = [], [], [], [], []
    for n in range(params.batch_count):
        results = [job.generate(dataclasses.replace(call, init_images=tiles[start:start + call.batch_size],
                                                    seed=seed + n + start)) for start, call in zip(starts, calls)]
        warnings += [note for result in results for note in result.warnings]
        redrawn = [tile for result in results for tile in result.images]
        if len(redrawn) < count:
            break  # interrupted or skipped: an image with holes is not returned
        images.append(blend_tiles(redrawn, xs, ys, image.size))
        infotexts.append(results[0].infotexts[0] + ", " + ", ".join(f"{k}: {quote(v)}" for k, v in fields.items()))
        seeds.append(seed + n)
        subseeds.append(results[0].subseeds[0])
    run_params = dataclasses.replace(params, seed=seed)
    return Result(images, seeds, subseeds, infotexts, run_params, list(dict.fromkeys(warnings)), job.interrupted)


ARGS = (ScriptArg("Will upscale the image by the selected scale factor; use width and height sliders to set tile "
                  "size", "", "html"),
        ScriptArg("Tile overlap", 64, "number", 0, 256, 16),
        ScriptArg("Upscaler", "None", "radio", choices=upscaler_choices, index=True),
        ScriptArg("Scale Factor", 2.0, "number", 1, 4, 0.05))

SCRIPT = register_script(Script("SD upscale", ARGS, run, txt2img=False))
