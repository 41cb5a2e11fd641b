"""The shapes judge: read objects back from images, compare them with what their prompts ask for, and score.

Detector (`detect_objects`), deterministic and free of learned weights, for images of the shapes world:
1. Foreground: pixels whose RGB distance from white exceeds `BACKGROUND_TOLERANCE` (allows off-white backgrounds
   and faint antialiased edges to count as background).
2. Objects: 8-connected components of the foreground; components smaller than `MIN_AREA` of the image are noise
   and dropped, and a fragment under `FRAGMENT_SHARE` of a neighbour's area lying within `MERGE_DISTANCE` of it is
   taken as a piece of that neighbour (a corner cut off by a generated seam), not as an object of its own.
3. Colour: median RGB of a component's most-inked half of pixels (edges are blended with white), then the nearest
   palette colour.
4. Coverage α of each pixel: its ink projected on the component's own ink colour, clipped to [0, 1]; this inverts the
   antialiasing blend `pixel = white + α (colour − white)` and locates edges to a fraction of a pixel.
5. Centroid and area from α; position = nearest anchor of the centroid; size = width that a shape of this area has.
   (`segment_objects` returns each object with its α: the object's pixels, to a fraction of a pixel.)
6. Shape, from the radial signature r(θ) (distance from the centroid to where α falls below ½ along 120 rays), which
   is invariant to translation and, in magnitude, to rotation:
   - the number of corners is the dominant harmonic k ∈ {3, 4, 5, 6} of r(θ) (a regular k-gon or k-pointed star
     repeats every 360°/k): 3 triangle, 4 square or cross, 5 star, 6 hexagon; if no harmonic reaches
     `CIRCLE_TOLERANCE` of the mean radius, the outline is round: circle;
   - solidity (area of the signature polygon over the area of its convex hull) separates the concave cross from the
     square;
   - shapes added with `shapes.register_shape` are recognised by their features (the relative amplitudes of the
     first `FEATURE_HARMONICS` harmonics of r(θ) and the solidity): each shape's prototype is the mean of those
     features over renders of it, and an outline whose nearest prototype is a registered shape's is that shape; the
     rules above decide among the built-in shapes, so registering a shape changes nothing while none is registered.

Scoring (`score_image`): the prompt is parsed (`shapes.captions.parse_caption`), expected objects are matched to
detected ones (the assignment with the most attributes right); an object's colour/shape/size/position is right if its
match has it; a relation is right if the matched pair's centroids are further apart along the relation's axis than
across it, in the right order. `judge` scores a set, `save_grid` draws it labelled.
"""
import itertools
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from .captions import CaptionError, Expectation, ExpectedObject, parse_caption, random_caption
from .world import (COLOURS, OUTLINES, PALETTE, SHAPES, SIZES, Scene, SceneObject, Vocabulary, WorldObject,
                    closest_distance, nearest_position, render, sample_scene, shape_names, size_name, unit_area)

BACKGROUND_TOLERANCE = 60.0  # RGB distance from white below which a pixel is background (palette colours: ≥ 170)
MIN_AREA = 0.003  # components below this share of the image are noise (a small rendered star covers ≥ 0.02)
FRAGMENT_SHARE = 0.1  # a component under this share of a neighbour's area ...
MERGE_DISTANCE = 1.5 / 64  # ... within this distance (fraction of the image width) is part of that neighbour
# (rendered objects are ≥ 4/64 apart and a small one has ≥ 0.14 of a large one's area, so neither rule fires there)
RAYS = 120  # radial signature samples; a multiple of 3, 4, 5 and 6 so each corner count is an exact harmonic
RAY_STEP = 0.25  # pixels between samples along a ray
CORNER_HARMONICS = {3: "triangle", 4: "square", 5: "star", 6: "hexagon"}
# Relative amplitude of the strongest corner harmonic below which an outline is a circle. Measured on rendered 64×64
# images (both sizes, any turn): circles ≤ 0.005; the weakest polygon, the hexagon, ≥ 0.05.
CIRCLE_TOLERANCE = 0.025
# Solidity below which a four-cornered outline is a cross rather than a square: rendered crosses measure 0.74–0.80
# (0.72 for the exact outline), squares ≥ 0.98.
CONCAVE_SOLIDITY = 0.88
# Registered shapes: harmonics 1..8 of r(θ) (with the solidity) as features, and a prototype from this many turns per
# size. Rendered built-in shapes and a heart, measured: each feature varies by ≤ 0.02 over turns and sizes, while the
# nearest two prototypes (heart and triangle) lie 0.19 apart.
FEATURE_HARMONICS = 8
PROTOTYPE_TURNS = 8
WHITE = np.array([255.0, 255.0, 255.0])


@dataclass(frozen=True)
class DetectedObject(WorldObject):
    """One object found in an image (the fields of `WorldObject`, with size estimated from the area as the unrotated
    width of the detected shape); area: share of the image covered."""
    area: float


# ----------------------------------------------------------------------------------------------------------------------
# Detection


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of a boolean [H, W] mask: (labels [H, W] with 0 for background and 1..n, n).

    Works on runs of foreground pixels per row: runs in neighbouring rows that overlap or touch diagonally are joined
    (union–find), which takes time proportional to the number of runs, not of pixels."""
    height, width = mask.shape
    padded = np.zeros((height, width + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    edges = np.diff(padded, axis=1)  # +1 where a run starts, −1 one past where it ends
    runs = []  # (row, start, end) with end exclusive
    row_runs = []  # per row, indices into runs
    for row in range(height):
        starts, ends = np.flatnonzero(edges[row] == 1), np.flatnonzero(edges[row] == -1)
        row_runs.append(range(len(runs), len(runs) + len(starts)))
        runs.extend((row, int(s), int(e)) for s, e in zip(starts, ends))
    parent = list(range(len(runs)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for row in range(1, height):
        above, here = row_runs[row - 1], row_runs[row]
        i = j = 0
        while i < len(above) and j < len(here):
            _, a_start, a_end = runs[above[i]]
            _, b_start, b_end = runs[here[j]]
            # 8-connectivity: runs touch when they overlap or meet at a corner (end is exclusive).
            if a_start <= b_end and b_start <= a_end:
                parent[root(above[i])] = root(here[j])
            # Advance whichever run ends first; the other may still touch the next one.
            if a_end < b_end:
                i += 1
            else:
                j += 1
    labels = np.zeros((height, width), dtype=np.int32)
    numbers = {}
    for index, (row, start, end) in enumerate(runs):
        labels[row, start:end] = numbers.setdefault(root(index), len(numbers) + 1)
    return labels, len(numbers)


def _absorb_fragments(labels: np.ndarray, merge_pixels: float) -> np.ndarray:
    """Clear each small fragment (under FRAGMENT_SHARE of a neighbour within merge_pixels): it is a piece of that
    neighbour, not an object, and is left out of the neighbour's measurements (a detached piece would bend its
    outline)."""
    numbers = [int(n) for n in np.unique(labels) if n != 0]
    masks = {n: labels == n for n in numbers}
    areas = {n: int(masks[n].sum()) for n in numbers}
    for small in numbers:
        for big in numbers:
            # Pixel-centre distance; touching pixels are 1 apart, so the gap between the two is distance − 1.
            if (big != small and areas[small] < FRAGMENT_SHARE * areas[big]
                    and closest_distance(masks[small], masks[big]) - 1 <= merge_pixels):
                labels[masks[small]] = 0
                break
    return labels


def _dilate(mask: np.ndarray) -> np.ndarray:
    """Boolean [H, W] grown by one pixel in all 8 directions."""
    grown = mask.copy()
    grown[1:, :] |= mask[:-1, :]
    grown[:-1, :] |= mask[1:, :]
    grown[:, 1:] |= grown[:, :-1].copy()
    grown[:, :-1] |= grown[:, 1:].copy()
    return grown


def nearest_colour(rgb) -> str:
    return min(COLOURS, key=lambda name: float(((np.asarray(PALETTE[name], dtype=np.float64) - rgb) ** 2).sum()))


def _bilinear(values: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """values [H, W] sampled at points (x, y) in pixel units (pixel (i, j) centred at (j + ½, i + ½)); 0 outside."""
    height, width = values.shape
    padded = np.zeros((height + 2, width + 2))
    padded[1:-1, 1:-1] = values
    # Padded index of the sample to the upper left, and the weights of the four around the point.
    u, v = np.clip(x - 0.5, -1, width) + 1, np.clip(y - 0.5, -1, height) + 1
    j, i = np.minimum(np.floor(u).astype(int), width), np.minimum(np.floor(v).astype(int), height)
    fu, fv = u - j, v - i
    return ((1 - fv) * ((1 - fu) * padded[i, j] + fu * padded[i, j + 1])
            + fv * ((1 - fu) * padded[i + 1, j] + fu * padded[i + 1, j + 1]))


def radial_signature(alpha: np.ndarray, cx: float, cy: float, rays: int = RAYS) -> np.ndarray:
    """r(θ) [rays]: along each ray from (cx, cy), the distance of the outermost point where coverage α falls below ½
    (interpolated between samples); 0 where the ray never enters the shape."""
    rows, cols = np.nonzero(alpha)
    reach = np.sqrt((cols + 1.0 - cx) ** 2 + (rows + 1.0 - cy) ** 2).max() + 2 if len(rows) else 2.0
    radii = np.arange(0.0, reach, RAY_STEP)
    angles = 2 * np.pi * np.arange(rays) / rays
    # samples [rays, steps]
    samples = _bilinear(alpha, cx + np.cos(angles)[:, None] * radii, cy + np.sin(angles)[:, None] * radii)
    inside = samples >= 0.5
    last = np.where(inside.any(axis=1), radii.size - 1 - np.argmax(inside[:, ::-1], axis=1), -1)
    signature = np.zeros(rays)
    for ray in np.flatnonzero(last >= 0):
        step = last[ray]
        if step + 1 < radii.size:  # between the last inside sample and the next: where does α cross ½?
            a0, a1 = samples[ray, step], samples[ray, step + 1]
            signature[ray] = radii[step] + RAY_STEP * (a0 - 0.5) / (a0 - a1)
        else:
            signature[ray] = radii[step]
    return signature


def _polygon_area(points: np.ndarray) -> float:
    x, y = points[:, 0], points[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _convex_hull(points: np.ndarray) -> np.ndarray:
    """Andrew's monotone chain; points [N, 2] -> hull vertices in order."""
    ordered = sorted(map(tuple, points))
    if len(ordered) < 3:
        return np.array(ordered)

    def half(sequence):
        chain = []
        for p in sequence:
            while len(chain) >= 2 and ((chain[-1][0] - chain[-2][0]) * (p[1] - chain[-2][1])
                                       - (chain[-1][1] - chain[-2][1]) * (p[0] - chain[-2][0])) <= 0:
                chain.pop()
            chain.append(p)
        return chain[:-1]

    return np.array(half(ordered) + half(ordered[::-1]))


def shape_features(signature: np.ndarray) -> tuple[dict[int, float], float]:
    """(relative amplitude of each corner harmonic {k: |R_k|·2/R_0}, solidity) of a radial signature."""
    spectrum = np.abs(np.fft.rfft(signature))
    mean = spectrum[0] if spectrum[0] > 0 else 1.0
    harmonics = {k: float(2 * spectrum[k] / mean) for k in CORNER_HARMONICS}
    angles = 2 * np.pi * np.arange(len(signature)) / len(signature)
    outline = np.stack([signature * np.cos(angles), signature * np.sin(angles)], axis=1)
    hull_area = _polygon_area(_convex_hull(outline)) if signature.any() else 0.0
    solidity = _polygon_area(outline) / hull_area if hull_area > 0 else 1.0
    return harmonics, solidity


def feature_vector(signature: np.ndarray) -> np.ndarray:
    """[FEATURE_HARMONICS + 1]: the relative amplitudes |R_k|·2/R_0 of harmonics k = 1..FEATURE_HARMONICS of a radial
    signature, then its solidity; what tells a registered shape from the others."""
    spectrum = np.abs(np.fft.rfft(signature))
    mean = spectrum[0] if spectrum[0] > 0 else 1.0
    _, solidity = shape_features(signature)
    return np.append(2 * spectrum[1:FEATURE_HARMONICS + 1] / mean, solidity)


# shape -> (the outline its prototype was measured on, the prototype); remeasured when a name gets a new outline.
_prototypes: dict[str, tuple[np.ndarray | None, np.ndarray]] = {}


def shape_prototype(shape: str) -> np.ndarray:
    """The mean feature vector of a shape over PROTOTYPE_TURNS turns at each nominal size, drawn in the middle of a
    64×64 image and measured as `detect_objects` measures (cached per outline)."""
    outline = OUTLINES[shape]
    cached = _prototypes.get(shape)
    if cached is None or cached[0] is not outline:
        features = []
        for size, turn in itertools.product(SIZES.values(), np.arange(PROTOTYPE_TURNS) * 360.0 / PROTOTYPE_TURNS):
            drawn = SceneObject(shape, COLOURS[0], size_name(size), "center", 0.5, 0.5, size, float(turn))
            pixels, ink, labels = _components(render(Scene((drawn,))))
            alpha, _, cx, cy = _coverage(pixels, ink, labels, int(labels.max()))
            features.append(feature_vector(radial_signature(alpha, cx, cy)))
        cached = _prototypes[shape] = (outline, np.mean(features, axis=0))
    return cached[1]


def classify_shape(signature: np.ndarray) -> str:
    """The shape of an outline by its radial signature (see the module docstring, step 6)."""
    registered = shape_names()[len(SHAPES):]
    if registered:
        features = feature_vector(signature)
        nearest = min(shape_names(), key=lambda shape: float(np.linalg.norm(features - shape_prototype(shape))))
        if nearest in registered:
            return nearest
    harmonics, solidity = shape_features(signature)
    corners = max(harmonics, key=harmonics.get)
    if harmonics[corners] < CIRCLE_TOLERANCE:
        return "circle"
    if corners == 4 and solidity < CONCAVE_SOLIDITY:
        return "cross"
    return CORNER_HARMONICS[corners]


def _components(image) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Steps 1–2 on a PIL image or uint8 array [H, W, 3]: (pixels [H, W, 3] float, ink = white − pixels clipped at 0
    [H, W, 3], labels [H, W] with 0 for background and each object's own number)."""
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float64)
    height, width = pixels.shape[:2]
    ink = np.clip(WHITE - pixels, 0.0, None)
    labels, count = label_components(np.linalg.norm(ink, axis=2) > BACKGROUND_TOLERANCE)
    areas = np.bincount(labels.ravel(), minlength=count + 1)
    for number in np.flatnonzero(areas < MIN_AREA * height * width):
        labels[labels == number] = 0
    return pixels, ink, _absorb_fragments(labels, MERGE_DISTANCE * width)


def _coverage(pixels: np.ndarray, ink: np.ndarray, labels: np.ndarray,
              number: int) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Steps 3–5 for one component: (coverage α [H, W], its colour RGB [3], centroid x, y in pixels); colour from the
    component's core, α from that colour."""
    height, width = labels.shape
    own = labels == number
    strength = np.linalg.norm(ink[own], axis=1)
    core = pixels[own][strength >= np.median(strength)]
    colour_rgb = np.median(core, axis=0)
    colour_ink = WHITE - colour_rgb
    # Faint edge pixels just below the background tolerance belong to the object too, unless another object owns them.
    region = _dilate(own) & ((labels == 0) | own)
    alpha = np.where(region, np.clip(ink @ colour_ink / max(float(colour_ink @ colour_ink), 1.0), 0.0, 1.0), 0.0)
    area = float(alpha.sum())
    rows, cols = np.mgrid[0:height, 0:width]
    return alpha, colour_rgb, float((alpha * (cols + 0.5)).sum() / area), float((alpha * (rows + 0.5)).sum() / area)


def _measure(pixels: np.ndarray, ink: np.ndarray, labels: np.ndarray, number: int) -> tuple[DetectedObject, np.ndarray]:
    """One component: colour, coverage and centroid, then position, shape and size; (object, coverage α [H, W])."""
    height, width = labels.shape
    alpha, colour_rgb, cx, cy = _coverage(pixels, ink, labels, number)
    area = float(alpha.sum())
    shape = classify_shape(radial_signature(alpha, cx, cy))
    size = 2 * math.sqrt(area / unit_area(shape)) / width
    x, y = cx / width, cy / height
    found = DetectedObject(shape, nearest_colour(colour_rgb), size_name(size), nearest_position(x, y), x, y, size,
                           area / (width * height))
    return found, alpha


def segment_objects(image) -> list[tuple[DetectedObject, np.ndarray]]:
    """The objects of an image (PIL image or uint8 array [H, W, 3]), largest first, each with its coverage α [H, W]:
    the share of each pixel it covers (0 outside it), read back from the antialiased colours."""
    pixels, ink, labels = _components(image)
    found = [_measure(pixels, ink, labels, number) for number in np.unique(labels) if number != 0]
    return sorted(found, key=lambda pair: -pair[0].area)


def detect_objects(image) -> list[DetectedObject]:
    """The objects of an image (PIL image or uint8 array [H, W, 3]), largest first."""
    return [found for found, _ in segment_objects(image)]


# ----------------------------------------------------------------------------------------------------------------------
# Scoring


def relation_holds(first: DetectedObject, second: DetectedObject, relation: str) -> bool:
    """Whether `first <relation> second`: the centroids are further apart along the relation's axis than across it,
    in the relation's order (image y grows downwards)."""
    dx, dy = second.x - first.x, second.y - first.y
    if relation in ("left of", "right of"):
        return abs(dx) > abs(dy) and (dx > 0) == (relation == "left of")
    return abs(dy) > abs(dx) and (dy > 0) == (relation == "above")


@dataclass
class ImageScore:
    """The verdict on one image. Per expected object (None where the prompt does not ask): colour, shape, size,
    position right; `relation` None for one object; `correct`: every object's colour and shape right (and the
    relation, for two)."""
    prompt: str
    expected: Expectation
    detected: list[DetectedObject]
    colour: list[bool | None]
    shape: list[bool]
    size: list[bool | None]
    position: list[bool | None]
    relation: bool | None
    count: bool
    correct: bool


MAX_CANDIDATES = 6  # only the largest detections are matched (enough for prompts of one or two objects)


def _attributes(expected: ExpectedObject, found: DetectedObject | None) -> tuple:
    """(colour, shape, size, position) right? — None for an attribute the prompt does not ask for."""
    def check(want, got):
        return None if want is None else (found is not None and want == got)
    return (check(expected.colour, found and found.colour), check(expected.shape, found and found.shape),
            check(expected.size_name, found and found.size_name), check(expected.position, found and found.position))


def score_image(prompt: str, detected: list[DetectedObject], expected: Expectation | None = None) -> ImageScore:
    """Match the prompt's objects to the detected ones and judge every attribute (see the module docstring)."""
    expected = expected if expected is not None else parse_caption(prompt)
    candidates = list(range(min(len(detected), MAX_CANDIDATES)))
    wanted = len(expected.objects)
    best, best_points, correct = None, -1, False
    # Every injective assignment of expected objects to detections (None: not found), in a fixed order.
    slots = candidates + [None] * wanted
    for assignment in dict.fromkeys(itertools.permutations(slots, wanted)):
        found = [detected[i] if i is not None else None for i in assignment]
        checks = [_attributes(e, f) for e, f in zip(expected.objects, found)]
        relation = None
        if expected.relation is not None:
            relation = None not in found and relation_holds(found[0], found[1], expected.relation)
        points = sum(bool(c) for check in checks for c in check) + bool(relation)
        if points > best_points:
            best, best_points = (checks, relation), points
        objects_right = all(check[0] is not False and check[1] for check in checks)
        correct = correct or (objects_right and relation is not False)
    checks, relation = best
    colour, shape, size, position = (list(column) for column in zip(*checks))
    return ImageScore(prompt, expected, detected, colour, shape, size, position, relation, len(detected) == wanted,
                      correct)


def _mean(values) -> float | None:
    values = [bool(v) for v in values if v is not None]
    return round(sum(values) / len(values), 4) if values else None


def summarize(scores: list[ImageScore]) -> dict:
    """Accuracies over a set of judged images (None where no prompt asked for that attribute).

    single_object / two_object: `correct` over prompts of one / two objects; colour, shape, size, position: over
    the objects whose prompt names that attribute; relation over two-object prompts; count: exactly as many objects
    detected as asked for; by_shape / by_colour: shape accuracy per asked shape, colour accuracy per asked colour (the
    score of a concept, e.g. one held out of training)."""
    singles = [s for s in scores if s.expected.relation is None]
    pairs = [s for s in scores if s.expected.relation is not None]
    by_shape, by_colour = {}, {}
    for s in scores:
        for obj, shape_right, colour_right in zip(s.expected.objects, s.shape, s.colour):
            by_shape.setdefault(obj.shape, []).append(shape_right)
            if obj.colour is not None:
                by_colour.setdefault(obj.colour, []).append(colour_right)
    return {
        "images": len(scores), "single_object_prompts": len(singles), "two_object_prompts": len(pairs),
        "single_object": _mean(s.correct for s in singles), "two_object": _mean(s.correct for s in pairs),
        "colour": _mean(c for s in scores for c in s.colour), "shape": _mean(c for s in scores for c in s.shape),
        "size": _mean(c for s in scores for c in s.size), "position": _mean(c for s in scores for c in s.position),
        "relation": _mean(s.relation for s in pairs), "count": _mean(s.count for s in scores),
        "by_shape": {k: _mean(v) for k, v in sorted(by_shape.items())},
        "by_colour": {k: _mean(v) for k, v in sorted(by_colour.items())},
    }


# ----------------------------------------------------------------------------------------------------------------------
# Grid

CELL = 128  # pixels of each image in the grid
CELL_WIDTH = 150  # room for about 28 characters of label at the default font's 11 px
LINE_HEIGHT = 13


def _verdict(score: ImageScore) -> str:
    wrong = [name for name, values in (("colour", score.colour), ("shape", score.shape), ("size", score.size),
                                       ("position", score.position)) if False in values]
    wrong += ["relation"] if score.relation is False else []
    return "ok" if score.correct and not wrong else "wrong " + ", ".join(wrong or ["count"])


def save_grid(images: list[Image.Image], scores: list[ImageScore], path: str | Path, columns: int = 8) -> None:
    """A PNG of the images, each labelled with its prompt, the verdict (green ok / red wrong attributes) and what the
    detector saw."""
    font = ImageFont.load_default(size=11)
    text_lines = 5
    columns = max(1, min(columns, len(images)))
    rows = math.ceil(len(images) / columns)
    cell_height = CELL + 4 + text_lines * LINE_HEIGHT
    grid = Image.new("RGB", (columns * CELL_WIDTH, rows * cell_height), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for index, (image, score) in enumerate(zip(images, scores)):
        left, top = (index % columns) * CELL_WIDTH, (index // columns) * cell_height
        thumbnail = image.convert("RGB")
        resample = Image.NEAREST if CELL % thumbnail.width == 0 else Image.BOX
        grid.paste(thumbnail.resize((CELL, CELL), resample), (left + (CELL_WIDTH - CELL) // 2, top))
        draw.rectangle([left, top, left + CELL_WIDTH - 1, top + CELL - 1], outline=(200, 200, 200))
        room = CELL_WIDTH - 6
        lines = [""]
        for word in score.prompt.split():
            if lines[-1] and font.getlength(f"{lines[-1]} {word}") > room:
                lines.append("")
            lines[-1] = f"{lines[-1]} {word}".strip()
        verdict = _verdict(score)
        seen = ", ".join(f"{o.colour} {o.shape}" for o in score.detected[:2]) or "nothing"
        labels = [(line, (0, 0, 0)) for line in lines[:text_lines - 2]] + [
            (verdict, (0, 140, 0) if verdict == "ok" else (200, 0, 0)), ("saw " + seen, (90, 90, 90))]
        for n, (line, colour) in enumerate(labels):
            while font.getlength(line) > room:  # cut what does not fit rather than spill into the next cell
                line = line[:-1]
            draw.text((left + 3, top + CELL + 2 + n * LINE_HEIGHT), line, fill=colour, font=font)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


# ----------------------------------------------------------------------------------------------------------------------
# Images and their prompts

def load_prompted_images(folder: str | Path, prompts: str | Path | None = None) -> list[tuple[Path, str]]:
    """(image path, prompt) pairs of a folder. Prompts come from `prompts` (a metadata.jsonl of `file_name`, relative
    to the folder, and `text`), else the folder's metadata.jsonl, else each image's own prompt
    (`sample.imagefiles.read_prompt`: a same-name .txt file, else the PNG infotext)."""
    # Imported here: reading prompts of loose files is the only part of the judge that needs `sample` (and torch).
    from sample.imagefiles import IMAGE_EXTENSIONS, list_images, read_prompt

    folder = Path(folder)
    metadata = Path(prompts) if prompts else folder / "metadata.jsonl"
    if prompts or metadata.is_file():
        pairs = []
        with open(metadata, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                row = json.loads(line)
                text = row.get("text", row.get("prompt"))
                if "file_name" not in row or text is None:
                    raise ValueError(f"{metadata} line {number} needs 'file_name' and 'text' (has {sorted(row)})")
                pairs.append((folder / row["file_name"], text))
        return pairs
    pairs = []
    for path in list_images(folder):
        text = read_prompt(path)
        if text is None:
            raise ValueError(f"no prompt for {path}: give --prompts metadata.jsonl, a {path.stem}.txt file, or images "
                             "with an infotext")
        pairs.append((path, text))
    if not pairs:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {folder}")
    return pairs


def judge(images: list[Image.Image], prompts: list[str]) -> tuple[dict, list[tuple[Image.Image, ImageScore]]]:
    """(summary, [(image, score)]) of images and their prompts. Prompts the parser cannot read are left out and
    counted as `unparsed` in the summary."""
    if not prompts:
        raise ValueError("no images to judge: give at least one image with its prompt")
    judged, unparsed = [], []
    for image, prompt in zip(images, prompts, strict=True):
        try:
            expected = parse_caption(prompt)
        except CaptionError:
            unparsed.append(prompt)
            continue
        judged.append((image, score_image(prompt, detect_objects(image), expected)))
    if not judged:
        raise ValueError(f"none of the {len(prompts)} prompts is in the shapes vocabulary (e.g. {unparsed[0]!r})")
    summary = summarize([score for _, score in judged])
    summary["unparsed"] = len(unparsed)
    return summary, judged


# ----------------------------------------------------------------------------------------------------------------------
# Held-out prompts and generation

HELD_OUT_STREAM = 1  # prompt i of seed s comes from default_rng([1, s, i]); training sets use default_rng([s, i])


def held_out_prompts(n: int, seed: int = 0, vocabulary: Vocabulary = Vocabulary(),
                     two_object_fraction: float = 0.4) -> list[str]:
    """n prompts drawn like the captions of `shapes.dataset` but from a random stream no data set uses. (The caption
    space is small, so some texts also occur in training; what a model cannot have seen is a held-out concept, chosen
    with the vocabulary.)"""
    prompts = []
    for index in range(n):
        rng = np.random.default_rng([HELD_OUT_STREAM, seed, index])
        prompts.append(random_caption(rng, sample_scene(rng, vocabulary, two_object_fraction)))
    return prompts


def generate_images(model: str, prompts: list[str], seed: int, sampler: str = "Euler a", steps: int = 20,
                    cfg_scale: float = 7.0, lora: str | None = None, lora_strength: float = 1.0,
                    progress: bool = True) -> list[Image.Image]:
    """One image per prompt through the generation pipeline (`sample.generate`, txt2img at the model's own
    resolution, empty negative prompt), image i with seed + i. `model`: a model spec (`sample.models.ModelSpec`: a
    checkpoint path or "default" for the embedded shapes model, optionally +LORA[:STRENGTH] and +EMBEDDING parts);
    `lora`: one more LoRA file merged for every image at `lora_strength` (A1111's `<lora:name:strength>`, the same
    strength for the UNet and the text encoder)."""
    # Imported here: detection and scoring need only numpy and PIL; only generating loads torch and the models.
    from sample.generate import GenerationParams, generate
    from sample.lora import applied, load_lora, with_bundled_embeddings
    from sample.models import load_model_spec

    checkpoint, embeddings = load_model_spec(model)
    loras = [(load_lora(lora), lora_strength, lora_strength)] if lora else []
    embeddings, notes = with_bundled_embeddings(embeddings, loras)
    for note in notes:
        warnings.warn(note, stacklevel=2)
    images = []
    with applied(checkpoint.model, loras) as messages:
        if messages:
            raise ValueError(f"the LoRA {lora} does not fit {checkpoint.name}: {messages[0]}")
        for index, prompt in enumerate(tqdm(prompts, desc="generate", disable=not progress)):
            params = GenerationParams(prompt=prompt, sampler_name=sampler, steps=steps, cfg_scale=cfg_scale,
                                      seed=seed + index)
            images.extend(generate(checkpoint, params, progress=False, embeddings=embeddings).images)
    return images
