"""Hard negative captions for contrastive training (method "clip", `clip_negatives`).

A CLIP trained on random pairs can match an image to its caption by the bag of words alone: in a batch of N random
pairs, the caption that says "left" where the image's says "right" is rarely there to be told apart. NegCLIP
(Yuksekgonul et al. 2023, "When and Why Vision-Language Models Behave like Bags-of-Words, and What to Do About It",
§5) adds, for each caption, captions that keep its words but change what they say — swapped word order or attributes
— as extra negatives on the text side: each image must score its caption above the batch's other captions *and*
above these. They enter only the image-to-text half of the loss (train.contrastive.clip_loss); a negative has no
image of its own.

NEGATIVES maps a name to a function caption -> negative captions (empty when it does not apply). The two here use
general English word lists, not any data set's grammar:

    spatial   every spatial word replaced by its opposite (left/right, above/below, over/under, top/bottom):
              "a red circle left of a blue square" -> "a red circle right of a blue square"
    colours   the first two different colour words swapped (attribute binding):
              "a red circle left of a blue square" -> "a blue circle left of a red square"
    axes      the first relation phrase turned to the two relations of the other axis:
              "a red circle left of a blue square" -> "a red circle above a blue square",
                                                      "a red circle below a blue square"
              (with spatial, every wrong relation of the four is a negative)

A function of your own added to NEGATIVES is usable by its name in `clip_negatives`.
"""
import re
from collections.abc import Callable, Iterable

SPATIAL_OPPOSITES = {"left": "right", "right": "left", "above": "below", "below": "above", "over": "under",
                     "under": "over", "top": "bottom", "bottom": "top"}
# The eleven basic colour terms of English (Berlin & Kay 1969), with both spellings of grey.
COLOUR_WORDS = frozenset({"black", "white", "red", "green", "yellow", "blue", "brown", "purple", "pink", "orange",
                          "grey", "gray"})
WORD = re.compile(r"[A-Za-z]+")
# Relation phrases between two things: horizontal ("to the left of", "on the right of", "left of") and vertical
# ("above", "over", "below", "under", "beneath"). Position phrases ("on the left", "at the top") are not relations.
RELATION_PHRASE = re.compile(r"(?P<horizontal>\b(?:(?:to|on) the )?(?:left|right) of\b)"
                             r"|(?P<vertical>\b(?:above|over|below|under|beneath)\b)", re.IGNORECASE)
# The axis a relation phrase matched (the group's name) -> the relations of the other axis.
PERPENDICULAR = {"horizontal": ("above", "below"), "vertical": ("to the left of", "to the right of")}


def _same_case(word: str, template: str) -> str:
    """`word` in the case pattern of `template` (lower, Title or UPPER)."""
    if template.isupper() and len(template) > 1:
        return word.upper()
    return word.capitalize() if template[:1].isupper() else word


def swap_spatial_words(caption: str) -> list[str]:
    """The caption with every spatial word replaced by its opposite; [] when it has none."""
    def opposite(match: re.Match) -> str:
        word = match.group(0)
        replacement = SPATIAL_OPPOSITES.get(word.lower())
        return _same_case(replacement, word) if replacement else word
    swapped = WORD.sub(opposite, caption)
    return [swapped] if swapped != caption else []


def swap_colour_words(caption: str) -> list[str]:
    """The caption with its first two different colour words swapped; [] when it names fewer than two colours."""
    matches = [m for m in WORD.finditer(caption) if m.group(0).lower() in COLOUR_WORDS]
    first = matches[0] if matches else None
    second = next((m for m in matches[1:] if m.group(0).lower() != first.group(0).lower()), None)
    if second is None:
        return []
    a, b = first.group(0), second.group(0)
    return [caption[:first.start()] + _same_case(b.lower(), a) + caption[first.end():second.start()]
            + _same_case(a.lower(), b) + caption[second.end():]]


def turn_relation(caption: str) -> list[str]:
    """The caption with its first relation phrase replaced by each relation of the other axis ("left of" -> "above",
    "below"; "over" -> "to the left of", "to the right of"); [] when it has none. The spatial negatives contrast a
    relation with its opposite only; these contrast it with the other two."""
    match = RELATION_PHRASE.search(caption)
    if match is None:
        return []
    return [caption[:match.start()] + _same_case(turned, match.group(0)) + caption[match.end():]
            for turned in PERPENDICULAR[match.lastgroup]]


NEGATIVES: dict[str, Callable[[str], list[str]]] = {"spatial": swap_spatial_words, "colours": swap_colour_words,
                                                      "axes": turn_relation}


def _normalised(caption: str) -> str:
    return " ".join(caption.lower().split())


def negative_captions(captions: Iterable[str], names: list[str], batch_captions: Iterable[str] = ()) -> list[str]:
    """The hard negatives of `captions` by the NEGATIVES named, in caption order, each once. A negative that is (up
    to case and spacing) one of the batch's true captions (`batch_captions`, and `captions` themselves) is dropped:
    it describes an image of the batch, so it must not be pushed away from it."""
    captions = list(captions)
    taken = {_normalised(c) for c in [*captions, *batch_captions]}
    negatives = []
    for caption in captions:
        for name in names:
            for negative in NEGATIVES[name](caption):
                key = _normalised(negative)
                if key not in taken:
                    taken.add(key)
                    negatives.append(negative)
    return negatives
