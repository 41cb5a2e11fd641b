"""`python -m metrics.protocol`: the seed plan, the chunks per rank, resuming after a kill, and the evaluation."""
import json

import pytest

import metrics.evaluate as evaluate
from metrics import protocol
from sample.images import read_infotext
from sample_helpers import one_thread  # noqa: F401  (autouse fixture)
from test_metrics_evaluate import PixelFeatures

FAST = ["--steps", "2", "--width", "32", "--height", "32", "--no-progress"]


def test_every_image_has_its_seed_and_prompt_and_each_chunk_one_rank():
    assert protocol.image_plan(["a", "b"], 5, 10) == [(0, "a", 10), (1, "b", 11), (2, "a", 12), (3, "b", 13),
                                                        (4, "a", 14)]
    # 7 images in chunks of 2 over 3 ranks: chunk c (images 2c, 2c+1) to rank c mod 3; together each image once.
    chunks = [protocol.rank_chunks(7, 2, rank, 3) for rank in range(3)]
    assert [[list(c) for c in rank] for rank in chunks] == [[[0, 1], [6]], [[2, 3]], [[4, 5]]]


def test_a_killed_run_continues_and_gives_the_uninterrupted_images(tmp_path, monkeypatch, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    argv = ["--prompts", str(prompts), "--images", "5", "--chunk-size", "2", "--seed", "3", *FAST]
    assert protocol.main([*argv, "--outdir", str(tmp_path / "whole")]) == 0
    whole = {p.name: p.read_bytes() for p in (tmp_path / "whole" / "images").iterdir()}
    assert sorted(whole) == [f"{n:06d}.png" for n in range(5)]
    info = read_infotext(tmp_path / "whole" / "images" / "000003.png")
    assert info.startswith("a blue square\n") and "Seed: 6," in info
    # A run killed after 2 images: the rerun writes only the other 3, and the folder is the uninterrupted one.
    (tmp_path / "cut" / "images").mkdir(parents=True)
    for name in ("000000.png", "000001.png"):
        (tmp_path / "cut" / "images" / name).write_bytes(whole[name])
    written = []
    real_save = protocol.save_png
    monkeypatch.setattr(protocol, "save_png", lambda image, path, info: written.append(path) or
                        real_save(image, path, info))
    assert protocol.main([*argv, "--outdir", str(tmp_path / "cut")]) == 0
    assert sorted(p.rsplit("/", 1)[1] for p in written) == ["000002.png", "000003.png", "000004.png"]
    assert {p.name: p.read_bytes() for p in (tmp_path / "cut" / "images").iterdir()} == whole
    # Then it scores the folder with metrics.evaluate (a stand-in Inception here) and writes the report.
    (tmp_path / "weights.pth").write_bytes(b"stand-in")
    monkeypatch.setattr(evaluate, "load_inception", lambda path: PixelFeatures())
    capsys.readouterr()
    assert protocol.main([*argv, "--outdir", str(tmp_path / "cut"), "--real", str(tmp_path / "whole" / "images"),
                          "--inception-weights", str(tmp_path / "weights.pth")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["metrics"]["fd_inception_unofficial"] == pytest.approx(0.0, abs=1e-6)  # the same images
    assert result["counts"] == {"fake": 5, "real": 5} and (tmp_path / "cut" / "evaluation.html").is_file()


def test_protocol_mistakes_are_one_line_errors(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("\n")
    assert protocol.main(["--prompts", str(tmp_path / "empty.txt"), "--outdir", str(tmp_path), *FAST]) == 2
    assert "holds no prompt" in capsys.readouterr().err
    (tmp_path / "p.txt").write_text("x\n")
    assert protocol.main(["--prompts", str(tmp_path / "p.txt"), "--outdir", str(tmp_path), "--steps", "0"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
