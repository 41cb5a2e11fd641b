"""Zero-shot caption retrieval of a CLIP on held-out shapes renders: which attributes its embeddings tell apart.

Each probe is a multiple choice among captions that differ in one attribute only; a scene counts as right when its
true caption has the highest cosine similarity with the image (Radford et al. 2021, §3.1.2, zero-shot transfer):

    colour     one object; "a <c> <shape>" for every colour c                        (chance 1/8)
    shape      one object; "a <colour> <s>" for every shape s                        (chance 1/6)
    position   one object; "a <colour> <shape> <where>" for the five positions       (chance 1/5)
    relation   two objects; "a <c1> <s1> <r> a <c2> <s2>" for the four relations     (chance 1/4)
    binding    two objects of different colours; the true caption against the same one with the two colours
               swapped ("a <c2> <s1> <r> a <c1> <s2>"): the words are the same, only who has which colour differs,
               which a bag-of-words text embedding cannot tell apart                (chance 1/2)

(chance for the built-in vocabulary). Scenes come from a random stream no data set and no judge prompt uses, so
every image is new to the model (the caption space is small: the captions are not).
"""
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F

from .captions import caption
from .world import ANCHORS, RELATIONS, Scene, Vocabulary, render, sample_scene

# One-object scene i of seed s comes from default_rng([ZERO_SHOT_STREAM, s, 0, i]), two-object scene i from
# default_rng([ZERO_SHOT_STREAM, s, 1, i]); data sets use default_rng([s, i]), the judge's prompts default_rng([1, s, i]).
ZERO_SHOT_STREAM = 2
PROBES = ("colour", "shape", "position", "relation", "binding")
# caption() template numbers: "{a}", "{a} {where}" (one object) and "{a} {relation} {b}" (two).
PLAIN, WITH_POSITION, RELATION = 0, 2, 0


def held_out_scenes(n: int, seed: int, vocabulary: Vocabulary, two_objects: bool) -> list[Scene]:
    return [sample_scene(np.random.default_rng([ZERO_SHOT_STREAM, seed, int(two_objects), index]), vocabulary,
                         two_object_fraction=1.0 if two_objects else 0.0) for index in range(n)]


def candidates(scene: Scene, probe: str, vocabulary: Vocabulary) -> list[str]:
    """The captions a scene's image chooses among in `probe`; the true one first."""
    obj = scene.objects[0]
    if probe == "colour":
        return [caption(Scene((replace(obj, colour=c),)), PLAIN)
                for c in (obj.colour, *(c for c in vocabulary.colours if c != obj.colour))]
    if probe == "shape":
        return [caption(Scene((replace(obj, shape=s),)), PLAIN)
                for s in (obj.shape, *(s for s in vocabulary.shapes if s != obj.shape))]
    if probe == "position":
        return [caption(Scene((replace(obj, position=p),)), WITH_POSITION)
                for p in (obj.position, *(p for p in ANCHORS if p != obj.position))]
    if probe == "relation":
        return [caption(replace(scene, relation=r), RELATION)
                for r in (scene.relation, *(r for r in RELATIONS if r != scene.relation))]
    first, second = scene.objects
    swapped = (replace(first, colour=second.colour), replace(second, colour=first.colour))
    return [caption(scene, RELATION), caption(replace(scene, objects=swapped), RELATION)]


@torch.no_grad()
def zero_shot_accuracy(model, n: int = 500, seed: int = 0, vocabulary: Vocabulary = Vocabulary(),
                       batch_size: int = 500) -> dict:
    """{probe: accuracy} over `n` one-object and `n` two-object held-out scenes (binding: the two-object scenes whose
    objects differ in colour), with the counts and each probe's chance level. `model`: an ldm.clip_model.CLIP."""
    from metrics.clip import preprocess

    single, pairs = held_out_scenes(n, seed, vocabulary, False), held_out_scenes(n, seed, vocabulary, True)

    def image_features(chosen: list[Scene]) -> torch.Tensor:
        parts = []
        for start in range(0, len(chosen), batch_size):
            images = [render(scene, model.config.image_resolution, model.config.image_resolution)
                      for scene in chosen[start:start + batch_size]]
            pixels = preprocess(images, model.config.image_resolution).to(model.device, model.dtype)
            parts.append(F.normalize(model.encode_image(pixels).float(), dim=-1))
        return torch.cat(parts)

    single_features, pair_features = image_features(single), image_features(pairs)
    def text_features(texts: list[str]) -> dict[str, torch.Tensor]:
        features = {}
        for start in range(0, len(texts), batch_size):
            chunk = texts[start:start + batch_size]
            tokens = model.tokenizer(chunk)
            # Causal attention: the padding after the last EOS cannot change the EOS states, so it is cut.
            tokens = tokens[:, :int(tokens.argmax(dim=-1).max()) + 1].to(model.device)
            features.update(zip(chunk, F.normalize(model.encode_text(tokens).float(), dim=-1)))
        return features

    # probe -> the (image embedding, scene) pairs it asks about
    questions = {probe: list(zip(single_features, single)) for probe in ("colour", "shape", "position")}
    questions["relation"] = list(zip(pair_features, pairs))
    questions["binding"] = [(f, s) for f, s in questions["relation"] if s.objects[0].colour != s.objects[1].colour]
    choices = {probe: [candidates(scene, probe, vocabulary) for _, scene in asked] for probe, asked in questions.items()}
    texts = text_features(sorted({text for options in choices.values() for texts in options for text in texts}))
    result = {}
    for probe, asked in questions.items():
        correct = sum(int((torch.stack([texts[t] for t in options]) @ image).argmax().item() == 0)
                      for (image, _), options in zip(asked, choices[probe]))
        result[probe] = correct / len(asked) if asked else None
        result[f"{probe}_chance"] = 1 / len(choices[probe][0]) if asked else None
    result.update(n_single=len(single), n_pairs=len(pairs), n_binding=len(questions["binding"]), seed=seed)
    return result
