"""The shapes world (shapes.world, shapes.dataset) and its judge (shapes.judge, shapes.captions): deterministic
rendering, ground truth that matches the pixels, held-out concepts, the detector on rendered ground truth (≥ 0.99),
the caption parser on every template, shapes added with register_shape, webdataset shards, and the command lines."""
import dataclasses
import itertools
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage
from PIL import Image, PngImagePlugin

from shapes.__main__ import main as shapes_command
from shapes.captions import (PAIR_TEMPLATES, RELATION_WORDS, SINGLE_TEMPLATES, WHERE_WORDS, CaptionError,
                             ExpectedObject, Expectation, caption, parse_caption)
from shapes.dataset import make_dataset, sample
from shapes.judge import (DetectedObject, detect_objects, held_out_prompts, judge, label_components,
                          load_prompted_images, score_image, segment_objects)
from shapes.world import (ANCHORS, MIN_GAP, OUTLINES, PALETTE, SHAPES, Scene, SceneObject, Vocabulary, WorldObject,
                          closest_distance, coverage, nearest_position, register_shape, registered_shape, render,
                          shape_names, size_name, unit_area, unregister_shape)
from train.data import SkipReport, imagefolder_items, webdataset_items, webdataset_shards

WIDTH = 64


def rendered_set(n: int, seed: int, rotation: float = 0.0):
    """n (scene, caption, image) triples of the default vocabulary at 64×64."""
    triples = []
    for index in range(n):
        scene, text = sample(seed, index, Vocabulary(), rotation=rotation)
        triples.append((scene, text, render(scene)))
    return triples


def circumradius(obj: SceneObject) -> float:
    """Pixels from the centroid to the farthest point of the object."""
    outline = OUTLINES[obj.shape]
    unit = 1.0 if outline is None else float(np.linalg.norm(outline, axis=1).max())
    return unit * obj.size * WIDTH / 2


# ----------------------------------------------------------------------------------------------------------------------
# Renderer


def test_same_seed_writes_identical_bytes_and_a_longer_run_extends_a_shorter_one(tmp_path):
    first = make_dataset(tmp_path / "a", 12, seed=3, shard_size=5)
    make_dataset(tmp_path / "b", 12, seed=3, shard_size=5)
    longer = make_dataset(tmp_path / "c", 15, seed=3, shard_size=5)
    other_seed = make_dataset(tmp_path / "d", 12, seed=4, shard_size=5)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 12 + 1 + 3  # PNGs, metadata.jsonl, three shards of ≤ 5 samples
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert longer[:12] == first
    for name in (f"{i:06d}.png" for i in range(12)):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "c" / name).read_bytes()
    assert [row["text"] for row in other_seed] != [row["text"] for row in first]


def test_ground_truth_matches_the_pixels():
    for scene, _, image in rendered_set(60, seed=11, rotation=0.0) + rendered_set(20, seed=12, rotation=180.0):
        pixels = np.asarray(image, dtype=np.float64)
        rows, cols = np.mgrid[0:WIDTH, 0:WIDTH] + 0.5
        near_any = np.zeros((WIDTH, WIDTH), dtype=bool)
        for obj in scene.objects:
            cx, cy, radius = obj.x * WIDTH, obj.y * WIDTH, circumradius(obj)
            window = (cols - cx) ** 2 + (rows - cy) ** 2 <= (radius + 1.5) ** 2
            near_any |= window
            # Coverage read back from the pixels: the blend pixel = white + α (colour − white), inverted.
            ink = 255.0 - np.asarray(PALETTE[obj.colour], dtype=np.float64)
            alpha = np.where(window, ((255.0 - pixels) @ ink) / (ink @ ink), 0.0)
            area = alpha.sum()
            assert area == pytest.approx(unit_area(obj.shape) * (obj.size * WIDTH / 2) ** 2, rel=0.01)
            assert (alpha * cols).sum() / area == pytest.approx(cx, abs=0.1)
            assert (alpha * rows).sum() / area == pytest.approx(cy, abs=0.1)
            # Every shape contains its centroid, drawn in the exact palette colour.
            assert tuple(np.asarray(image)[int(cy), int(cx)]) == PALETTE[obj.colour]
            assert obj.position == nearest_position(obj.x, obj.y)
            assert obj.size_name == size_name(obj.size)
        assert (pixels[~near_any] == 255).all()
        # Objects stay inside the image: its outermost ring of pixels is white.
        assert (pixels[[0, -1]] == 255).all() and (pixels[:, [0, -1]] == 255).all()
        if scene.relation is not None:
            a, b = scene.objects
            dx, dy = b.x - a.x, b.y - a.y
            along, across = (dx, dy) if scene.relation in ("left of", "right of") else (dy, dx)
            assert abs(along) > 2 * abs(across)
            assert (along > 0) == (scene.relation in ("left of", "above"))
            # No two inked pixels of different objects are as close as the minimum gap (centre to centre).
            ink_a = np.argwhere(np.asarray(render(Scene((a,))), dtype=np.int64).sum(-1) < 765)
            ink_b = np.argwhere(np.asarray(render(Scene((b,))), dtype=np.int64).sum(-1) < 765)
            assert np.sqrt(((ink_a[:, None] - ink_b[None]) ** 2).sum(-1)).min() > MIN_GAP * WIDTH


def test_every_pair_of_shapes_finds_room_in_every_relation():
    # sample_scene raises when 100 tries cannot place a pair MIN_GAP apart (a large triangle reaches further up than
    # down from its centroid; placing it as if symmetric made rare pairs impossible).
    seen = set()
    for first, second in itertools.combinations_with_replacement(OUTLINES, 2):
        pair = Vocabulary(shapes=tuple({first, second}), colours=("red", "blue"))
        for index in range(40):
            scene, _ = sample(0, index, pair, two_object_fraction=1.0)
            seen.add((scene.objects[0].shape, scene.objects[1].shape, scene.relation))
    assert len(seen) > 0.8 * 6 * 6 * 4  # most of the 144 (first shape, second shape, relation) combinations


def test_closest_distance_from_edge_pixels_equals_the_brute_force_minimum():
    rng = np.random.default_rng(3)
    for _ in range(60):
        a = scipy.ndimage.binary_dilation(rng.uniform(size=(24, 24)) < 0.04, iterations=int(rng.integers(0, 3)))
        b = rng.uniform(size=(24, 24)) < 0.03
        # Disjoint and not empty: a in the left 14 columns, b in the right 10 (they may touch across the split).
        a[:, 14:], b[:, :14] = False, False
        a[0, 0], b[-1, -1] = True, True
        pixels_a, pixels_b = np.argwhere(a), np.argwhere(b)
        brute = np.sqrt(((pixels_a[:, None] - pixels_b[None]) ** 2).sum(-1)).min()
        assert closest_distance(a, b) == brute


def test_held_out_concepts_never_appear_and_required_ones_always_do(tmp_path):
    base = make_dataset(tmp_path / "base", 150, seed=0,
                        vocabulary=Vocabulary.restricted(exclude_shapes=["star"], exclude_colours=["purple"]))
    objects = [o for row in base for o in row["objects"]]
    assert {o["shape"] for o in objects} == {"circle", "square", "triangle", "hexagon", "cross"}
    assert "purple" not in {o["colour"] for o in objects} and len({o["colour"] for o in objects}) == 7
    assert not any("star" in row["text"] or "purple" in row["text"] for row in base)
    purple = np.asarray(PALETTE["purple"], dtype=np.float64)
    for row in base:  # nor in the pixels: nothing as close to purple as an antialiased edge of it
        pixels = np.asarray(Image.open(tmp_path / "base" / row["file_name"]), dtype=np.float64)
        assert np.linalg.norm(pixels - purple, axis=-1).min() > 40
    new = make_dataset(tmp_path / "new", 60, seed=1, vocabulary=Vocabulary.restricted(
        required_shapes=["star"], required_colours=["purple"]))
    assert all(any(o["shape"] == "star" or o["colour"] == "purple" for o in row["objects"]) for row in new)
    with pytest.raises(ValueError, match="excluded"):
        Vocabulary.restricted(exclude_shapes=["star"], required_shapes=["star"])
    with pytest.raises(ValueError, match="unknown shape dog"):
        Vocabulary.restricted(exclude_shapes=["dog"])


# ----------------------------------------------------------------------------------------------------------------------
# Detector on rendered ground truth


def detector_accuracy(triples) -> dict:
    """Per attribute and joint accuracy of detect_objects against the ground truth (objects matched by centroid)."""
    right = {"colour": [], "shape": [], "size": [], "position": [], "count": [], "relation": [], "image": []}
    for scene, _, image in triples:
        found = detect_objects(image)
        right["count"].append(len(found) == len(scene.objects))
        matched = [min(found, key=lambda d: (d.x - o.x) ** 2 + (d.y - o.y) ** 2) if found else None
                   for o in scene.objects]
        image_right = right["count"][-1]
        for truth, seen in zip(scene.objects, matched):
            for key, want, got in (("colour", truth.colour, seen and seen.colour),
                                   ("shape", truth.shape, seen and seen.shape),
                                   ("size", truth.size_name, seen and seen.size_name),
                                   ("position", truth.position, seen and seen.position)):
                right[key].append(want == got)
                image_right &= want == got
        if scene.relation is not None:
            dx, dy = matched[1].x - matched[0].x, matched[1].y - matched[0].y
            horizontal = abs(dx) > abs(dy)
            seen_relation = ("left of" if dx > 0 else "right of") if horizontal else ("above" if dy > 0 else "below")
            right["relation"].append(seen_relation == scene.relation)
            image_right &= right["relation"][-1]
        right["image"].append(image_right)
    return {key: float(np.mean(values)) for key, values in right.items()}


def test_detector_reads_rendered_ground_truth_at_least_99_percent_right():
    triples = rendered_set(500, seed=2024)
    assert sum(len(scene.objects) for scene, _, _ in triples) > 650  # both kinds of image are well represented
    accuracy = detector_accuracy(triples)
    assert min(accuracy.values()) >= 0.99, accuracy


def test_detector_is_rotation_invariant_on_turned_shapes():
    accuracy = detector_accuracy(rendered_set(150, seed=7, rotation=180.0))
    assert min(accuracy.values()) >= 0.99, accuracy


def test_detector_survives_noise_blur_and_an_off_white_background():
    rng = np.random.default_rng(0)
    noisy = []
    for scene, text, image in rendered_set(100, seed=5):
        pixels = np.asarray(image, dtype=np.float64) * 0.97 + rng.normal(0, 6, (64, 64, 3))
        pixels = scipy.ndimage.gaussian_filter(pixels, sigma=(0.7, 0.7, 0))
        noisy.append((scene, text, Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))))
    accuracy = detector_accuracy(noisy)
    assert min(accuracy.values()) >= 0.99, accuracy


def test_segmentation_reads_back_each_objects_exact_coverage():
    # The coverage α of every pixel, inverted from the antialiased colour, equals the renderer's exact coverage to
    # within the uint8 rounding of the colours (≤ 0.5 / 170 per channel; 0.004 measured), turned objects included.
    for scene, _, image in rendered_set(60, seed=8, rotation=90.0):
        segments = segment_objects(image)
        assert [found for found, _ in segments] == detect_objects(image)
        for truth in scene.objects:
            found, alpha = min(segments, key=lambda pair: (pair[0].x - truth.x) ** 2 + (pair[0].y - truth.y) ** 2)
            assert np.abs(alpha - coverage(truth, WIDTH, WIDTH)).max() < 0.01
            assert found.area == pytest.approx(alpha.sum() / WIDTH ** 2)


def test_connected_components_match_scipy_with_8_connectivity():
    rng = np.random.default_rng(1)
    for density in (0.2, 0.45, 0.6):
        mask = rng.uniform(size=(37, 53)) < density
        labels, count = label_components(mask)
        expected, expected_count = scipy.ndimage.label(mask, structure=np.ones((3, 3)))
        assert count == expected_count
        # Same partition, possibly numbered differently: each of our labels maps to exactly one of scipy's.
        pairs = set(zip(labels[mask].tolist(), expected[mask].tolist()))
        assert len(pairs) == count and (labels[~mask] == 0).all()


def test_specks_are_ignored_and_a_nearby_fragment_joins_its_object():
    circle = SceneObject("circle", "red", "large", "center", 0.5, 0.5, 0.4)
    pixels = np.array(render(Scene((circle,))))
    pixels[2:4, 2:4] = PALETTE["blue"]  # 4 px: noise
    right_edge = int(0.5 * WIDTH + 0.2 * WIDTH) + 1  # one white column beyond the circle
    pixels[30:34, right_edge + 1:right_edge + 5] = PALETTE["red"]  # 16 px fragment, 1 px gap
    found = detect_objects(pixels)
    assert [(o.colour, o.shape) for o in found] == [("red", "circle")]
    pixels[50:56, 50:56] = PALETTE["blue"]  # 36 px, far away: an object of its own
    assert [o.colour for o in detect_objects(pixels)] == ["red", "blue"]


# ----------------------------------------------------------------------------------------------------------------------
# Shapes added with register_shape


def heart(t: np.ndarray) -> np.ndarray:
    """The heart curve (point down, y downwards): t [N] in [0, 2π) -> [N, 2]."""
    return np.stack([16 * np.sin(t) ** 3, -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))],
                    axis=1)


def test_a_registered_heart_is_drawn_parsed_and_judged_right_on_99_percent_of_its_renders():
    with registered_shape("heart", heart):
        assert shape_names() == (*SHAPES, "heart")
        # Every image holds a heart, alone or in a pair with any built-in shape, in any wording of every template.
        with_hearts = Vocabulary(shapes=(*SHAPES, "heart"), required_shapes=("heart",))
        samples = [sample(40, index, with_hearts) for index in range(200)]
        triples = [(scene, text, render(scene)) for scene, text in samples]
        assert all("heart" in text for _, text, _ in triples)
        assert sum(scene.relation is not None for scene, _, _ in triples) > 50
        # Its outline was centred and scaled like the built-ins': 2 units on its larger side, centroid at the origin.
        outline = OUTLINES["heart"]
        assert np.ptp(outline, axis=0).max() == pytest.approx(2.0) and unit_area("heart") > 2
        accuracy = detector_accuracy(triples)
        assert min(accuracy.values()) >= 0.99, accuracy
        summary, _ = judge([image for _, _, image in triples], [text for _, text, _ in triples])
        assert summary["unparsed"] == 0 and summary["by_shape"]["heart"] >= 0.99, summary
        assert min(summary[key] for key in ("single_object", "two_object", "shape", "colour", "relation")) >= 0.99
        # Turned hearts too: the features it is told apart by do not depend on the turn.
        turned = [sample(41, index, with_hearts, rotation=180.0) for index in range(60)]
        assert detector_accuracy([(scene, text, render(scene)) for scene, text in turned])["shape"] >= 0.99
    # Gone again: the renderer, the parser and the judge know only the built-in shapes.
    assert shape_names() == SHAPES and "heart" not in OUTLINES
    with pytest.raises(CaptionError, match="names no shape"):
        parse_caption("a red heart")
    with pytest.raises(ValueError, match="unknown shape heart"):
        Vocabulary(shapes=("heart",))


def test_register_shape_refuses_caption_words_and_outlines_that_enclose_nothing():
    for name in ("circle", "red", "big", "left", "drawing", "Heart", "two words", ""):
        with pytest.raises(ValueError, match="word"):
            register_shape(name, heart)
    with pytest.raises(ValueError, match="encloses no area"):
        register_shape("line", lambda t: np.stack([np.cos(t), np.cos(t)], axis=1))
    with pytest.raises(ValueError, match=r"\[256, 2\]"):
        register_shape("blob", lambda t: np.cos(t))
    with pytest.raises(ValueError, match="not a registered shape"):
        unregister_shape("square")
    assert shape_names() == SHAPES


def test_ground_truth_and_detected_objects_share_their_common_fields():
    shared = [f.name for f in dataclasses.fields(WorldObject)]
    assert shared == ["shape", "colour", "size_name", "position", "x", "y", "size"]
    assert [f.name for f in dataclasses.fields(SceneObject)] == shared + ["rotation"]
    assert [f.name for f in dataclasses.fields(DetectedObject)] == shared + ["area"]
    truth = SceneObject("hexagon", "orange", "large", "top", 0.5, 0.25, 0.4)
    (seen,) = detect_objects(render(Scene((truth,))))
    assert isinstance(seen, WorldObject)
    assert [getattr(seen, name) for name in shared[:4]] == [getattr(truth, name) for name in shared[:4]]
    assert [getattr(seen, name) for name in shared[4:]] == pytest.approx([getattr(truth, name) for name in shared[4:]],
                                                                         abs=0.01)


# ----------------------------------------------------------------------------------------------------------------------
# Captions and scoring


def expected_from(scene: Scene, template: str) -> Expectation:
    """What a template says about a scene: size when it uses the sized noun phrase, position when {where}."""
    sized, placed = "_sized" in template, "{where}" in template
    return Expectation(tuple(ExpectedObject(o.shape, o.colour, o.size_name if sized else None,
                                            o.position if placed else None) for o in scene.objects), scene.relation)


def test_caption_parser_reads_every_template_and_wording_back():
    scenes = [scene for scene, _, _ in rendered_set(200, seed=9)]
    singles = [s for s in scenes if s.relation is None]
    pairs = [s for s in scenes if s.relation is not None]
    assert {o.position for s in singles for o in s.objects} == set(ANCHORS)
    assert {s.relation for s in pairs} == set(RELATION_WORDS)
    checked = 0
    for group, templates in ((singles, SINGLE_TEMPLATES), (pairs, PAIR_TEMPLATES)):
        for number, template in enumerate(templates):
            for wording in range(2):
                for scene in group:
                    text = caption(scene, number, wording)
                    assert parse_caption(text) == expected_from(scene, template), text
                    checked += 1
    assert checked == 2 * (len(singles) * len(SINGLE_TEMPLATES) + len(pairs) * len(PAIR_TEMPLATES))
    # Every phrasing of positions and relations occurred.
    assert all(len(words) == 2 for words in (*WHERE_WORDS.values(), *RELATION_WORDS.values()))


def test_caption_parser_takes_synonyms_and_rejects_what_it_cannot_read():
    assert parse_caption("A big red circle beneath a tiny blue star") == Expectation(
        (ExpectedObject("circle", "red", "large"), ExpectedObject("star", "blue", "small")), "below")
    assert parse_caption("an orange hexagon in the centre") == Expectation(
        (ExpectedObject("hexagon", "orange", None, "center"),))
    for text, reason in (("a red dog", "names no shape"), ("a red circle and a blue square", "more than one shape"),
                         ("a red blue circle", "more than one colour"),
                         ("a circle above a star below a cross", "more than one relation"),
                         ("a red circle to the left of the image", "names no shape")):
        with pytest.raises(CaptionError, match=reason):
            parse_caption(text)


def test_scorer_gives_full_marks_on_ground_truth_and_catches_each_kind_of_mistake():
    triples = rendered_set(120, seed=31)
    summary, judged = judge([image for _, _, image in triples], [text for _, text, _ in triples])
    for key in ("single_object", "two_object", "colour", "shape", "size", "position", "relation", "count"):
        assert summary[key] == 1.0, (key, summary)
    assert summary["images"] == 120 and summary["unparsed"] == 0
    assert set(summary["by_shape"]) == set(OUTLINES) and min(summary["by_shape"].values()) == 1.0

    red_circle = DetectedObject("circle", "red", "large", "left", 0.25, 0.5, 0.4, 0.1)
    blue_star = DetectedObject("star", "blue", "small", "right", 0.75, 0.5, 0.25, 0.02)
    score = score_image("a small red circle on the right", [red_circle])
    assert (score.colour, score.shape, score.size, score.position) == ([True], [True], [False], [False])
    assert score.correct  # single-object accuracy asks for colour and shape only
    assert not score_image("a blue circle", [red_circle]).correct
    assert not score_image("a red square", [red_circle]).correct
    assert score_image("a red circle to the left of a blue star", [blue_star, red_circle]).correct
    swapped = score_image("a red circle to the right of a blue star", [red_circle, blue_star])
    assert swapped.relation is False and not swapped.correct and swapped.colour == [True, True]
    missing = score_image("a red circle above a blue star", [red_circle])
    assert not missing.count and not missing.correct and missing.shape == [True, False]
    nothing = score_image("a red circle", [])
    assert nothing.colour == [False] and not nothing.count


def test_judging_nothing_or_only_unreadable_prompts_is_a_value_error_saying_so():
    with pytest.raises(ValueError, match="no images to judge"):
        judge([], [])
    image = rendered_set(1, seed=31)[0][2]
    with pytest.raises(ValueError, match="none of the 1 prompts is in the shapes vocabulary .*a photo of a dog"):
        judge([image], ["a photo of a dog"])


def test_held_out_prompts_are_reproducible_follow_the_vocabulary_and_differ_from_a_training_sequence():
    star_or_purple = Vocabulary.restricted(required_shapes=["star"], required_colours=["purple"])
    prompts = held_out_prompts(40, seed=0, vocabulary=star_or_purple)
    assert prompts == held_out_prompts(40, seed=0, vocabulary=star_or_purple)
    for prompt in prompts:
        objects = parse_caption(prompt).objects
        assert any(o.shape == "star" or o.colour == "purple" for o in objects), prompt
    training = [sample(0, index, star_or_purple)[1] for index in range(40)]
    assert sum(a == b for a, b in zip(prompts, training)) < 5


# ----------------------------------------------------------------------------------------------------------------------
# Files and command lines


def test_webdataset_shards_hold_the_same_samples_and_the_real_loaders_read_both_forms(tmp_path):
    rows = make_dataset(tmp_path / "set", 25, seed=5, shard_size=10)
    shards = sorted((tmp_path / "set" / "shards").glob("*.tar"))
    assert [p.name for p in shards] == ["shapes-00000.tar", "shapes-00001.tar", "shapes-00002.tar"]
    members = []
    for shard in shards:
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                members.append((member.name, tar.extractfile(member).read()))
    assert [name for name, _ in members] == [f"{i:06d}.{ext}" for i in range(25) for ext in ("png", "txt", "json")]
    for index, row in enumerate(rows):
        png, txt, meta = (data for _, data in members[3 * index:3 * index + 3])
        assert png == (tmp_path / "set" / row["file_name"]).read_bytes()
        assert txt.decode() == row["text"]
        assert json.loads(meta)["objects"] == row["objects"]
    report = SkipReport()
    from_shards = webdataset_items(webdataset_shards(str(tmp_path / "set" / "shards")), report)
    from_folder = imagefolder_items(tmp_path / "set", "text", report)
    assert [i.caption for i in from_shards] == [i.caption for i in from_folder] == [row["text"] for row in rows]
    assert all(i.read_bytes() == j.read_bytes() for i, j in zip(from_shards, from_folder))
    assert not report.counts


def test_command_lines_make_a_set_and_print_json_accuracies_with_a_grid(tmp_path, capsys):
    out = tmp_path / "tiny"
    assert shapes_command(["make", "--out", str(out), "--n", "10", "--seed", "2", "--exclude-colour", "black"]) == 0
    capsys.readouterr()
    grid = tmp_path / "grid.png"
    assert shapes_command(["judge", "--images", str(out), "--grid", str(grid)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == 10 and summary["single_object"] in (1.0, None) and summary["colour"] == 1.0
    assert "black" not in summary["by_colour"]
    with Image.open(grid) as image:
        assert image.width == 8 * 150 and image.height > 2 * 128  # two rows of labelled cells
    # Prompts from a PNG infotext when there is no metadata: scoring a relabelled copy finds the mistake.
    loose = tmp_path / "loose"
    loose.mkdir()
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a large green star\nNegative prompt: blurry\nSteps: 20, Sampler: Euler a, Seed: 1")
    render(Scene((SceneObject("star", "green", "large", "center", 0.5, 0.5, 0.4),))).save(loose / "a.png", pnginfo=info)
    (loose / "b.png").write_bytes((out / "000000.png").read_bytes())
    (loose / "b.txt").write_text("a pink circle above a pink square")
    assert [text for _, text in load_prompted_images(loose)] == ["a large green star",
                                                                "a pink circle above a pink square"]
    assert shapes_command(["judge", "--images", str(loose), "--grid", ""]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["single_object"] == 1.0 and summary["two_object"] == 0.0


def test_earlier_command_names_run_the_same_commands(tmp_path, capsys):
    import metrics.shapes
    import train.shapes
    import train.shapes_text

    # python -m train.shapes make == python -m shapes make (byte for byte), as a real process for the new name.
    subprocess.run([sys.executable, "-m", "shapes", "make", "--out", str(tmp_path / "new"), "--n", "4", "--seed", "6"],
                   check=True, capture_output=True, cwd=Path(__file__).resolve().parents[1])
    assert train.shapes.main(["make", "--out", str(tmp_path / "old"), "--n", "4", "--seed", "6"]) == 0
    for name in ["metadata.jsonl", "shards/shapes-00000.tar"] + [f"{i:06d}.png" for i in range(4)]:
        assert (tmp_path / "old" / name).read_bytes() == (tmp_path / "new" / name).read_bytes(), name
    # python -m metrics.shapes ARGS == python -m shapes judge ARGS.
    capsys.readouterr()
    assert metrics.shapes.main(["--images", str(tmp_path / "new"), "--grid", ""]) == 0
    earlier = capsys.readouterr().out
    assert shapes_command(["judge", "--images", str(tmp_path / "new"), "--grid", ""]) == 0
    assert json.loads(earlier) == json.loads(capsys.readouterr().out)
    # python -m train.shapes_text ARGS reaches python -m shapes text (its own usage error names the new command).
    with pytest.raises(SystemExit) as exit_info:
        train.shapes_text.main(["--data", "x"])
    assert exit_info.value.code == 2 and "python -m shapes text" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["make", "--out", "{tmp}/tiny", "--n", "3"], "is not empty"),
    (["make", "--out", "{tmp}/x", "--n", "3", "--exclude-shape", "dog"], "unknown shape dog"),
    (["make", "--out", "{tmp}/x", "--n", "0"], "must be positive"),
])
def test_make_usage_errors_exit_2_with_one_line(tmp_path, capsys, argv, message):
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "old.png").write_bytes(b"")
    with pytest.raises(SystemExit) as exit_info:
        shapes_command([a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in error and "Traceback" not in error


def test_scorer_usage_errors_exit_2_with_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for argv, message in ((["--images", str(tmp_path / "none")], "no such folder"),
                          (["--images", str(tmp_path / "empty")], "no images"),
                          (["--model", "default", "--prompts", "x.jsonl"], "--prompts goes with --images"),
                          (["--model", "default", "--lora-strength", "0.5"], "--lora-strength goes with --lora")):
        with pytest.raises(SystemExit) as exit_info:
            shapes_command(["judge", *argv])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
