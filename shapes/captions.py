"""Captions of the shapes world: the templates that describe a scene, and the parser that reads a prompt back.

Templates name a subset of a scene's attributes ("a red circle", "a small blue square on the left", "a green triangle
above a yellow star"), with two wordings of each position and relation; the ground truth always records all of them.
The parser (`parse_caption`) reads any template back to the attributes it names, and also the synonyms a person may
write ("big", "beneath", "in the centre"). Shape names come from `shapes.world.OUTLINES` when a caption is read, so a
shape added with `register_shape` is understood.
"""
import itertools
import re
from dataclasses import dataclass

import numpy as np

from .world import COLOURS, Scene, SceneObject, Vocabulary, shape_names

# ----------------------------------------------------------------------------------------------------------------------
# Templates

# Wordings of the position and relation phrases; a caption uses one at random.
WHERE_WORDS = {
    "left": ("on the left", "on the left side"),
    "right": ("on the right", "on the right side"),
    "top": ("at the top", "near the top"),
    "bottom": ("at the bottom", "near the bottom"),
    "center": ("in the center", "in the middle"),
}
RELATION_WORDS = {
    "above": ("above", "over"),
    "below": ("below", "under"),
    "left of": ("to the left of", "left of"),
    "right of": ("to the right of", "right of"),
}
# {a} {b}: noun phrases ("a red circle"), {a_sized} with the size ("a small red circle"); {where}: a position phrase.
SINGLE_TEMPLATES = (
    "{a}",
    "{a_sized}",
    "{a} {where}",
    "{a_sized} {where}",
    "a drawing of {a_sized}",
    "{where}, {a}",
)
PAIR_TEMPLATES = (
    "{a} {relation} {b}",
    "{a_sized} {relation} {b_sized}",
)


def _noun_phrase(obj: SceneObject, sized: bool) -> str:
    words = f"{obj.size_name} {obj.colour} {obj.shape}" if sized else f"{obj.colour} {obj.shape}"
    return ("an " if words[0] in "aeiou" else "a ") + words


def caption(scene: Scene, template: int, wording: int = 0) -> str:
    """The caption of a scene by template number (SINGLE_TEMPLATES or PAIR_TEMPLATES, by object count) and wording
    number (which phrasing of the position or relation)."""
    a = scene.objects[0]
    fields = {"a": _noun_phrase(a, False), "a_sized": _noun_phrase(a, True)}
    if scene.relation is None:
        where = WHERE_WORDS[a.position][wording % len(WHERE_WORDS[a.position])]
        fields.update(where=where)
        return SINGLE_TEMPLATES[template].format(**fields)
    b = scene.objects[1]
    words = RELATION_WORDS[scene.relation]
    fields.update(b=_noun_phrase(b, False), b_sized=_noun_phrase(b, True), relation=words[wording % len(words)])
    return PAIR_TEMPLATES[template].format(**fields)


def random_caption(rng: np.random.Generator, scene: Scene) -> str:
    """A caption of a scene with a template and a wording drawn from `rng`."""
    templates = SINGLE_TEMPLATES if scene.relation is None else PAIR_TEMPLATES
    return caption(scene, int(rng.integers(len(templates))), int(rng.integers(2)))


def class_prompts(vocabulary: Vocabulary = Vocabulary()) -> list[str]:
    """"a {colour} {shape}" for every shape and colour of the vocabulary, shape-major: the classes of a zero-shot
    classifier over the shapes world (the IS of `metrics.evaluate --zero-shot-classes shapes`)."""
    return [f"a {colour} {shape}" for shape in vocabulary.shapes for colour in vocabulary.colours]


# ----------------------------------------------------------------------------------------------------------------------
# Parser


class CaptionError(ValueError):
    """A prompt that does not describe one object, or two in a relation, in the shapes vocabulary."""


@dataclass(frozen=True)
class ExpectedObject:
    """What a prompt asks for; None where the prompt does not say."""
    shape: str
    colour: str | None = None
    size_name: str | None = None
    position: str | None = None


@dataclass(frozen=True)
class Expectation:
    """The objects a prompt asks for; with two, `objects[0] <relation> objects[1]`."""
    objects: tuple[ExpectedObject, ...]
    relation: str | None = None


# "to the left of" / "left of" / "on the left of", "above" / "over", "below" / "under" / "beneath"
RELATION_PHRASE = re.compile(r"\b(?:(?:to|on) the )?(left|right) of\b|\b(above|over|below|under|beneath)\b")
RELATION_SYNONYMS = {"left": "left of", "right": "right of", "above": "above", "over": "above", "below": "below",
                     "under": "below", "beneath": "below"}
SIZE_SYNONYMS = {"small": "small", "little": "small", "tiny": "small", "large": "large", "big": "large",
                 "huge": "large"}
POSITION_SYNONYMS = {"left": "left", "right": "right", "top": "top", "bottom": "bottom", "center": "center",
                     "centre": "center", "middle": "center"}


def _one(words: list[str], vocabulary: dict[str, str], kind: str, phrase: str) -> str | None:
    found = {vocabulary[w] for w in words if w in vocabulary}
    if len(found) > 1:
        raise CaptionError(f"{phrase!r} names more than one {kind} ({', '.join(sorted(found))})")
    return found.pop() if found else None


def caption_words() -> set[str]:
    """Every word the parser gives a meaning to (a shape added with `register_shape` must not be one of them)."""
    phrases = (*SINGLE_TEMPLATES, *PAIR_TEMPLATES, *itertools.chain(*WHERE_WORDS.values(), *RELATION_WORDS.values()))
    template_words = set(re.findall(r"[a-z]+", re.sub(r"{\w+}", " ", " ".join(phrases))))
    return (set(shape_names()) | set(COLOURS) | set(SIZE_SYNONYMS) | set(POSITION_SYNONYMS) | set(RELATION_SYNONYMS)
            | template_words | {"a", "an"})


def _parse_object(phrase: str) -> ExpectedObject:
    words = re.findall(r"[a-z]+", phrase)
    shapes = shape_names()
    shape = _one(words, {s: s for s in shapes}, "shape", phrase)
    if shape is None:
        raise CaptionError(f"{phrase.strip()!r} names no shape; shapes are {', '.join(shapes)}")
    colour = _one(words, {c: c for c in COLOURS}, "colour", phrase)
    size = _one(words, SIZE_SYNONYMS, "size", phrase)
    return ExpectedObject(shape, colour, size, _one(words, POSITION_SYNONYMS, "position", phrase))


def parse_caption(text: str) -> Expectation:
    """The objects a prompt asks for: "a small red circle on the left" -> one object with all four attributes;
    "a green triangle above a yellow star" -> two objects and the relation "above". Raises CaptionError."""
    text = text.lower()
    relations = list(RELATION_PHRASE.finditer(text))
    if not relations:
        return Expectation((_parse_object(text),))
    if len(relations) > 1:
        raise CaptionError(f"{text!r} has more than one relation; the shapes domain relates two objects")
    match = relations[0]
    relation = RELATION_SYNONYMS[match.group(1) or match.group(2)]
    return Expectation((_parse_object(text[:match.start()]), _parse_object(text[match.end():])), relation)
