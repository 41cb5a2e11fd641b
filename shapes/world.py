"""The shapes world: its vocabulary, random scenes, and an exact antialiased renderer.

An image (64×64 by default) shows one or two flat objects on a white background. An object has a shape (circle,
square, triangle, star, hexagon, cross, and any added with `register_shape`), one of eight named colours, a size
(small or large), and lies at one of five positions (left, right, top, bottom, center). Two objects stand in a
relation (above, below, left of, right of): they are placed far apart along that axis and close along the other, never
touching, so the relation is unambiguous. Objects are upright unless a rotation range allows a random turn. Edges are
antialiased by an exact box filter (each pixel gets the share of it the object covers), so a judge can locate outlines
to a fraction of a pixel.

`shapes.captions` describes scenes in words and reads the words back, `shapes.dataset` writes captioned data sets,
`shapes.judge` reads objects back from images.
"""
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from PIL import Image

# ----------------------------------------------------------------------------------------------------------------------
# The vocabulary

# Colours far apart in RGB: every pair ≥ 90 apart (Euclidean), every colour ≥ 170 from white, so that both a small
# model and the nearest-palette judge can keep them apart.
PALETTE = {
    "red": (210, 30, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 220, 30),
    "orange": (250, 130, 20),
    "purple": (130, 50, 190),
    "pink": (240, 100, 180),
    "black": (25, 25, 25),
}
COLOURS = tuple(PALETTE)


def _regular_polygon(corners: int, radius: float, start_degrees: float) -> np.ndarray:
    angles = np.radians(start_degrees + 360.0 * np.arange(corners) / corners)
    return np.stack([radius * np.cos(angles), radius * np.sin(angles)], axis=1)


def _star(points: int, outer: float, inner: float) -> np.ndarray:
    # Alternating outer and inner corners, the first outer one pointing up (image y grows downwards).
    angles = np.radians(-90.0 + 180.0 * np.arange(2 * points) / points)
    radii = np.where(np.arange(2 * points) % 2 == 0, outer, inner)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _cross(half_width: float) -> np.ndarray:
    w = half_width
    return np.array([(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w),
                     (-w, -w)], dtype=np.float64)


# Every shape in unit coordinates: centroid at the origin, about 2 units across, so that an object of size s (a fraction
# of the image width) is the outline scaled by s·width/2. Image y grows downwards. The circle (None) is drawn exactly.
# `register_shape` adds entries; the judge and the caption parser read this table when they run.
OUTLINES: dict[str, np.ndarray | None] = {
    "circle": None,
    "square": np.array([(-0.9, -0.9), (0.9, -0.9), (0.9, 0.9), (-0.9, 0.9)]),
    "triangle": _regular_polygon(3, 2 / math.sqrt(3), -90.0),  # equilateral, apex up, side 2
    "star": _star(5, 1.1, 0.5),  # five points; inner/outer radius 0.45 keeps the points thick enough to draw small
    "hexagon": _regular_polygon(6, 1.0, 0.0),  # flat top and bottom
    "cross": _cross(0.34),  # a plus sign of arm width 0.68
}
SHAPES = tuple(OUTLINES)  # the built-in shapes: the default vocabulary of data sets and prompts
SIZES = {"small": 0.25, "large": 0.40}  # nominal width as a fraction of the image width
SIZE_NAMES = tuple(SIZES)
SIZE_JITTER = 0.07  # each object's size is its nominal size × U(1 − j, 1 + j)
# Single objects sit at one of five anchors (fractions of width and height), jittered by up to POSITION_JITTER.
ANCHORS = {"center": (0.5, 0.5), "left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75)}
POSITIONS = tuple(ANCHORS)
POSITION_JITTER = 0.04
# Relations between two objects: "A <relation> B". The pair lies along the relation's axis, the first object's centre
# at 0.2–0.3 and the second's at 0.7–0.8 of that axis, both within ±0.06 of the middle on the other axis.
RELATIONS = ("above", "below", "left of", "right of")
MIN_GAP = 0.06  # the closest points of two objects are at least this far apart (fraction of the image width)
MARGIN = 0.02  # and every object stays this far inside the image border


def shape_names() -> tuple[str, ...]:
    """Every shape the renderer, the judge and the caption parser know now: the built-in ones, then registered ones."""
    return tuple(OUTLINES)


def _unit_outline(outline_fn: Callable[[np.ndarray], np.ndarray], points: int) -> np.ndarray:
    """outline_fn sampled at `points` parameters, moved so its area centroid is the origin and scaled so its larger
    side is 2 units, as the built-in outlines are: [points, 2]."""
    t = 2 * np.pi * np.arange(points) / points
    outline = np.asarray(outline_fn(t), dtype=np.float64)
    if outline.shape != (points, 2) or not np.isfinite(outline).all():
        raise ValueError(f"outline_fn must map {points} parameters to {points} finite (x, y) points, i.e. an array "
                         f"[{points}, 2]; it returned shape {outline.shape}")
    x, y = outline[:, 0], outline[:, 1]
    cross = x * np.roll(y, -1) - np.roll(x, -1) * y  # shoelace terms: area = Σ/2, centroid = Σ (p + p') · term / 6A
    area = cross.sum() / 2
    if abs(area) < 1e-9 * max(float(np.ptp(outline, axis=0).max()), 1.0) ** 2:
        raise ValueError("outline_fn's curve encloses no area; it must trace a closed outline once around")
    centroid = np.array([((x + np.roll(x, -1)) * cross).sum(), ((y + np.roll(y, -1)) * cross).sum()]) / (6 * area)
    outline = outline - centroid
    return outline * (2 / np.ptp(outline, axis=0).max())


def register_shape(name: str, outline_fn: Callable[[np.ndarray], np.ndarray], points: int = 256) -> None:
    """Add a shape to the world: the renderer draws it, the caption parser reads its name, the judge detects it.

    outline_fn(t) maps parameters t [N] evenly spread over [0, 2π) to the points [N, 2] of a simple closed outline
    traced once around (x to the right, y downwards, any position and scale): it is sampled at `points` parameters,
    centred on its area centroid and scaled to 2 units on its larger side, so that an object of size s spans s of
    the image width that way, as the built-in shapes do. The name must be one lowercase word that is not already a word of the captions. Data
    sets and prompts use a registered shape only when a `Vocabulary` names it. The judge tells shapes apart by their
    radial signature (the distance from centroid to outline by angle), so a new shape is recognised when that
    signature differs from every other shape's; mirror images and turns of one outline look alike to it."""
    from .captions import caption_words  # here: shapes.captions imports this module

    if not (isinstance(name, str) and name.isascii() and name.isalpha() and name.islower()):
        raise ValueError(f"a shape name must be one lowercase word of letters a-z, e.g. 'heart'; got {name!r}")
    if name in caption_words():
        raise ValueError(f"{name!r} is already a word of the shapes captions; choose another name for the shape")
    OUTLINES[name] = _unit_outline(outline_fn, points)


def unregister_shape(name: str) -> None:
    """Remove a shape added by `register_shape` (the built-in ones stay)."""
    if name in SHAPES or name not in OUTLINES:
        registered = ", ".join(shape_names()[len(SHAPES):]) or "none"
        raise ValueError(f"{name!r} is not a registered shape (registered: {registered})")
    del OUTLINES[name]


@contextmanager
def registered_shape(name: str, outline_fn: Callable[[np.ndarray], np.ndarray], points: int = 256) -> Iterator[str]:
    """`register_shape` for the duration of a `with` block (a test, a scoring run): unregistered on the way out."""
    register_shape(name, outline_fn, points)
    try:
        yield name
    finally:
        unregister_shape(name)


def unit_area(shape: str) -> float:
    """Area of a shape's unit outline (the object's area in pixels is this × (size·width/2)²)."""
    outline = OUTLINES[shape]
    if outline is None:
        return math.pi
    x, y = outline[:, 0], outline[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def nearest_position(x: float, y: float) -> str:
    """The anchor nearest to a point given in fractions of the image: how positions are named, here and by the judge."""
    return min(POSITIONS, key=lambda name: (ANCHORS[name][0] - x) ** 2 + (ANCHORS[name][1] - y) ** 2)


def size_name(size: float) -> str:
    """small/large from a measured size, split at the geometric mean of the two nominal sizes."""
    return "small" if size < math.sqrt(SIZES["small"] * SIZES["large"]) else "large"


@dataclass(frozen=True)
class WorldObject:
    """What the ground truth and the judge both say about an object. x, y: centroid as fractions of the image width
    and height; size: width as a fraction of the image width before rotation (its name is `size_name`); position: the
    anchor nearest to the centroid."""
    shape: str
    colour: str
    size_name: str
    position: str
    x: float
    y: float
    size: float


@dataclass(frozen=True)
class SceneObject(WorldObject):
    """One object of an image, as recorded in the ground truth; rotation: degrees, counter-clockwise."""
    rotation: float = 0.0


@dataclass(frozen=True)
class Scene:
    """The content of one image: one or two objects; with two, `objects[0] <relation> objects[1]`."""
    objects: tuple[SceneObject, ...]
    relation: str | None = None


@dataclass(frozen=True)
class Vocabulary:
    """Which shapes and colours may appear (by default the built-in shapes; a registered shape when named).
    `required_shapes` / `required_colours`: every image contains an object with one of these shapes or one of these
    colours (for fine-tuning sets that teach new concepts)."""
    shapes: tuple[str, ...] = SHAPES
    colours: tuple[str, ...] = COLOURS
    required_shapes: tuple[str, ...] = ()
    required_colours: tuple[str, ...] = ()

    def __post_init__(self):
        for kind, names, known in (("shape", self.shapes + self.required_shapes, shape_names()),
                                   ("colour", self.colours + self.required_colours, COLOURS)):
            unknown = [n for n in names if n not in known]
            if unknown:
                raise ValueError(f"unknown {kind} {', '.join(unknown)}; choose from {', '.join(known)}")
        if not self.shapes or not self.colours:
            raise ValueError("the vocabulary needs at least one shape and one colour")
        missing = [n for n in self.required_shapes if n not in self.shapes] + [
            n for n in self.required_colours if n not in self.colours]
        if missing:
            raise ValueError(f"required {', '.join(missing)} is excluded from the vocabulary")

    @classmethod
    def restricted(cls, shapes=SHAPES, colours=COLOURS, exclude_shapes=(), exclude_colours=(), required_shapes=(),
                   required_colours=()) -> "Vocabulary":
        """A vocabulary from allow lists minus exclusions (names are checked)."""
        for kind, names, known in (("shape", exclude_shapes, shape_names()), ("colour", exclude_colours, COLOURS)):
            unknown = [n for n in names if n not in known]
            if unknown:
                raise ValueError(f"unknown {kind} {', '.join(unknown)}; choose from {', '.join(known)}")
        return cls(tuple(s for s in shapes if s not in exclude_shapes),
                   tuple(c for c in colours if c not in exclude_colours), tuple(required_shapes),
                   tuple(required_colours))

    def concept_pairs(self) -> list[tuple[str, str]]:
        """(shape, colour) pairs an object may take; with requirements, only those carrying a required concept."""
        pairs = [(s, c) for s in self.shapes for c in self.colours]
        if self.required_shapes or self.required_colours:
            pairs = [(s, c) for s, c in pairs if s in self.required_shapes or c in self.required_colours]
        return pairs


# ----------------------------------------------------------------------------------------------------------------------
# Scenes


def outline_pixels(shape: str, x: float, y: float, size: float, rotation: float, width: int, height: int) -> np.ndarray:
    """The polygon of an object in pixel coordinates [N, 2] (None for a circle)."""
    outline = OUTLINES[shape]
    if outline is None:
        return None
    turn = math.radians(rotation)
    # Counter-clockwise on screen, where y points down: x' = x cos + y sin, y' = −x sin + y cos.
    rotate = np.array([[math.cos(turn), -math.sin(turn)], [math.sin(turn), math.cos(turn)]])
    radius = size * width / 2
    return outline @ rotate * radius + np.array([x * width, y * height])


def _extent(shape: str, size: float, rotation: float, width: int, height: int) -> np.ndarray:
    """How far an object reaches from its centroid, as fractions of the image: [[left, up], [right, down]] (the
    first row ≤ 0). A triangle reaches further up than down."""
    corners = outline_pixels(shape, 0.0, 0.0, size, rotation, width, height)
    if corners is None:
        corners = np.array([[-1.0, -1.0], [1.0, 1.0]]) * size * width / 2
    return np.stack([corners.min(axis=0), corners.max(axis=0)]) / np.array([width, height])


def _place(rng: np.random.Generator, centre: float, reach: np.ndarray, jitter: float) -> float:
    """A jittered coordinate that keeps the object (reaching reach[0] ≤ 0 and reach[1] ≥ 0 from it) MARGIN inside."""
    return float(np.clip(centre + rng.uniform(-jitter, jitter), MARGIN - reach[0], 1.0 - MARGIN - reach[1]))


def _object(rng: np.random.Generator, pair: tuple[str, str], rotation_range: float) -> dict:
    shape, colour = pair
    size_label = SIZE_NAMES[rng.integers(len(SIZE_NAMES))]
    size = SIZES[size_label] * rng.uniform(1 - SIZE_JITTER, 1 + SIZE_JITTER)
    rotation = rng.uniform(-rotation_range, rotation_range) if rotation_range else 0.0
    if shape == "circle":
        rotation = 0.0  # a turned circle is the same picture
    return {"shape": shape, "colour": colour, "size_name": size_label, "size": size, "rotation": rotation}


def _edge_pixels(mask: np.ndarray) -> np.ndarray:
    """[N, 2] (row, column) of the pixels of a mask that have a 4-neighbour outside it (or lie on the border)."""
    padded = np.pad(mask, 1)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return np.argwhere(mask & ~interior)


def closest_distance(mask_a: np.ndarray, mask_b: np.ndarray) -> float:
    """Smallest distance between pixel centres of two disjoint boolean [H, W] masks (inf if one is empty).

    A closest pair lies on both edges (from an inner pixel, the step towards the other mask is still inside and
    closer), so only edge pixels are compared: O(perimeter²), not O(area²)."""
    edge_a, edge_b = _edge_pixels(mask_a), _edge_pixels(mask_b)
    if not len(edge_a) or not len(edge_b):
        return math.inf
    return float(np.sqrt(((edge_a[:, None, :] - edge_b[None, :, :]) ** 2).sum(-1).min()))


def _separated(a: SceneObject, b: SceneObject, width: int, height: int) -> bool:
    """Whether the pixels the two objects touch are more than MIN_GAP apart (exact for any rotation)."""
    return closest_distance(draw_mask(a, width, height), draw_mask(b, width, height)) > MIN_GAP * width


def sample_scene(rng: np.random.Generator, vocabulary: Vocabulary, two_object_fraction: float = 0.4,
                 rotation: float = 0.0, width: int = 64, height: int = 64) -> Scene:
    """A random scene. The first object carries a required concept if the vocabulary has any; the second (in a pair)
    is any allowed object that differs from the first in shape or colour. Objects turn by up to ±`rotation` degrees."""
    first_pairs = vocabulary.concept_pairs()
    first = _object(rng, first_pairs[rng.integers(len(first_pairs))], rotation)
    if rng.uniform() >= two_object_fraction:
        reach = _extent(first["shape"], first["size"], first["rotation"], width, height)
        anchor = POSITIONS[rng.integers(len(POSITIONS))]
        x = _place(rng, ANCHORS[anchor][0], reach[:, 0], POSITION_JITTER)
        y = _place(rng, ANCHORS[anchor][1], reach[:, 1], POSITION_JITTER)
        return Scene((SceneObject(**first, position=nearest_position(x, y), x=x, y=y),))

    all_pairs = [(s, c) for s in vocabulary.shapes for c in vocabulary.colours if (s, c) != (first["shape"],
                                                                                              first["colour"])]
    if not all_pairs:
        raise ValueError("a vocabulary of one shape and one colour cannot make two different objects")
    second = _object(rng, all_pairs[rng.integers(len(all_pairs))], rotation)
    relation = RELATIONS[rng.integers(len(RELATIONS))]
    # The object that comes first along the axis (left or top) sits at 0.2–0.3, the other at 0.7–0.8.
    leading, trailing = (first, second) if relation in ("above", "left of") else (second, first)
    horizontal = relation in ("left of", "right of")
    for _ in range(100):
        placed = []
        for obj, along in ((leading, 0.25), (trailing, 0.75)):
            if rotation and obj["shape"] != "circle":  # a new turn on each try: some turns leave no room
                obj["rotation"] = rng.uniform(-rotation, rotation)
            reach = _extent(obj["shape"], obj["size"], obj["rotation"], width, height)
            centre_x, centre_y = (along, 0.5) if horizontal else (0.5, along)
            jitter_x, jitter_y = (0.05, 0.06) if horizontal else (0.06, 0.05)
            x, y = _place(rng, centre_x, reach[:, 0], jitter_x), _place(rng, centre_y, reach[:, 1], jitter_y)
            placed.append(SceneObject(**obj, position=nearest_position(x, y), x=x, y=y))
        if _separated(placed[0], placed[1], width, height):
            lead_obj, trail_obj = placed
            return Scene((lead_obj, trail_obj) if leading is first else (trail_obj, lead_obj), relation)
    raise RuntimeError(f"could not place {first['shape']} and {second['shape']} {MIN_GAP} apart in {width}x{height} "
                       "after 100 tries; use a larger image or a smaller --rotation")


# ----------------------------------------------------------------------------------------------------------------------
# Drawing

SCANLINES = 16  # horizontal lines per pixel row on which the coverage is measured (exactly, along each line)


def _spans(shape: str, polygon: np.ndarray | None, centre: tuple[float, float], radius: float,
           ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where each horizontal line y = ys[m] is inside the object: (starts, ends) [M, K], the k-th inside interval
    of line m (NaN where a line has fewer than K)."""
    if polygon is None:
        half = np.sqrt(np.clip(radius ** 2 - (ys - centre[1]) ** 2, 0, None))
        inside = np.where(half > 0, 1.0, np.nan)
        return (centre[0] - half * inside)[:, None], (centre[0] + half * inside)[:, None]
    x1, y1 = polygon[:, 0], polygon[:, 1]
    x2, y2 = np.roll(x1, -1), np.roll(y1, -1)
    y = ys[:, None]
    # An edge crosses line y when its end points lie on either side (one end counts as above, so a line through a
    # corner crosses exactly one of its two edges); crossings [M, edges], NaN for edges that do not.
    crosses = (y1 > y) != (y2 > y)
    with np.errstate(divide="ignore", invalid="ignore"):
        crossing_x = np.where(crosses, x1 + (y - y1) * (x2 - x1) / (y2 - y1), np.nan)
    crossing_x = np.sort(crossing_x, axis=1)  # NaNs last; by the even–odd rule, crossings pair up as in/out
    return crossing_x[:, 0::2], crossing_x[:, 1::2]


def coverage(obj: SceneObject, width: int, height: int) -> np.ndarray:
    """Float [H, W] in [0, 1]: the share of each pixel the object covers (pixel (i, j) is the square [j, j+1) ×
    [i, i+1)): the mean, over SCANLINES lines through the pixel, of the length of the line inside the object. This
    is box-filter antialiasing, exact along x and sampled 16 times along y."""
    polygon = outline_pixels(obj.shape, obj.x, obj.y, obj.size, obj.rotation, width, height)
    centre, radius = (obj.x * width, obj.y * height), obj.size * width / 2
    result = np.zeros((height, width))
    # Only the pixels of the bounding box can be covered.
    if polygon is None:
        left, top, right, bottom = centre[0] - radius, centre[1] - radius, centre[0] + radius, centre[1] + radius
    else:
        (left, top), (right, bottom) = polygon.min(axis=0), polygon.max(axis=0)
    x0, y0 = max(int(math.floor(left)), 0), max(int(math.floor(top)), 0)
    x1, y1 = min(int(math.ceil(right)), width), min(int(math.ceil(bottom)), height)
    if x1 <= x0 or y1 <= y0:
        return result
    ys = (np.arange(y0, y1)[:, None] + (np.arange(SCANLINES) + 0.5) / SCANLINES).reshape(-1)
    starts, ends = _spans(obj.shape, polygon, centre, radius, ys)
    # Length of each interval inside each pixel column [j, j+1): [lines, intervals, columns], NaN counts as 0.
    columns = np.arange(x0, x1)
    inside = np.minimum(ends[..., None], columns + 1) - np.maximum(starts[..., None], columns)
    lengths = np.nan_to_num(np.clip(inside, 0, 1)).sum(axis=1)
    result[y0:y1, x0:x1] = lengths.reshape(y1 - y0, SCANLINES, x1 - x0).mean(axis=1)
    return result


def draw_mask(obj: SceneObject, width: int, height: int) -> np.ndarray:
    """Boolean [H, W]: pixels the object touches at all."""
    return coverage(obj, width, height) > 0


def silhouette(scene: Scene, width: int = 64, height: int = 64) -> Image.Image:
    """The scene's layout as a control image: white where objects are (grey by coverage at antialiased edges),
    black elsewhere; RGB. What a layout tool would hand a ControlNet (ldm.controlnet)."""
    covered = np.zeros((height, width))
    for obj in scene.objects:
        covered = np.maximum(covered, coverage(obj, width, height))
    grey = np.rint(covered * 255).astype(np.uint8)
    return Image.fromarray(np.stack([grey] * 3, axis=-1), mode="RGB")


def segmentation(scene: Scene, width: int = 64, height: int = 64) -> Image.Image:
    """The scene's layout with its colours as a control image: each object's silhouette filled with its flat
    colour (blended by coverage at antialiased edges, later objects over earlier ones, as in `render`) on black; RGB.
    What a layout tool painting coloured regions would hand a ControlNet: where, how large and which colour."""
    pixels = np.zeros((height, width, 3))
    for obj in scene.objects:
        alpha = coverage(obj, width, height)[..., None]
        pixels = pixels * (1 - alpha) + np.array(PALETTE[obj.colour], dtype=np.float64) * alpha
    return Image.fromarray(np.rint(pixels).astype(np.uint8), mode="RGB")


def render(scene: Scene, width: int = 64, height: int = 64) -> Image.Image:
    """RGB image of a scene on white: each pixel is white blended with the object colour by its coverage."""
    pixels = np.full((height, width, 3), 255.0)
    for obj in scene.objects:
        alpha = coverage(obj, width, height)[..., None]
        pixels = pixels * (1 - alpha) + np.array(PALETTE[obj.colour], dtype=np.float64) * alpha
    return Image.fromarray(np.rint(pixels).astype(np.uint8), mode="RGB")
