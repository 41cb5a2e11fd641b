"""The commands: python -m sample.txt2img / img2img / pnginfo — outputs named like A1111 with the infotext embedded,
and every user mistake reported as one line with exit status 2."""
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sample import cli, img2img, pnginfo, txt2img
from sample.images import read_infotext
from sample_helpers import one_thread  # noqa: F401  (autouse fixture)

FAST = ["--steps", "2", "--width", "32", "--height", "32", "--no-progress"]
REPO = Path(__file__).resolve().parent.parent


def test_txt2img_writes_a1111_named_pngs_grid_and_zip(tmp_path, capsys):
    assert txt2img.main(["a red circle", *FAST, "--seed", "7", "--batch-size", "2", "--grid", "--zip",
                         "--outdir", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    names = [os.path.basename(line) for line in out.splitlines()]
    assert names == ["00000-7-a red circle.png", "00001-8-a red circle.png", "grid-0000.png", "00000-7-8.zip"]
    assert err == ""
    infotext = read_infotext(tmp_path / "00001-8-a red circle.png")
    assert infotext.startswith("a red circle\n") and "Seed: 8," in infotext
    assert Image.open(tmp_path / "grid-0000.png").size == (64, 32)
    with zipfile.ZipFile(tmp_path / "00000-7-8.zip") as archive:
        assert archive.namelist() == ["00000-7-a red circle.png", "00001-8-a red circle.png"]
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]  # atomic writes leave no temporaries
    # Numbering continues after the files already there.
    assert txt2img.main(["a:b/c", *FAST, "--seed", "3", "--outdir", str(tmp_path)]) == 0
    assert os.path.basename(capsys.readouterr().out.strip()) == "00002-3-a_b_c.png"


def test_pnginfo_prints_the_stored_infotext_and_its_fields(tmp_path, capsys):
    txt2img.main(["a (red:1.2) circle", *FAST, "--seed", "1", "--negative-prompt", "blurry", "--outdir",
                  str(tmp_path)])
    path = capsys.readouterr().out.strip()
    assert pnginfo.main([path]) == 0
    assert capsys.readouterr().out.strip() == read_infotext(path)
    assert pnginfo.main([path, "--json"]) == 0
    assert '"Negative prompt": "blurry"' in capsys.readouterr().out
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    assert pnginfo.main([str(tmp_path / "plain.png")]) == 1
    assert "no generation parameters" in capsys.readouterr().err


def test_img2img_with_a_mask(tmp_path, capsys):
    Image.new("RGB", (32, 32), (200, 40, 40)).save(tmp_path / "init.png")
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    mask.save(tmp_path / "mask.png")
    assert img2img.main(["a blue square", "--init-image", str(tmp_path / "init.png"), "--mask",
                         str(tmp_path / "mask.png"), "--denoising-strength", "0.6", *FAST, "--seed", "2",
                         "--outdir", str(tmp_path / "out")]) == 0
    infotext = read_infotext(capsys.readouterr().out.strip())
    assert "Denoising strength: 0.6" in infotext and "Mask blur: 4" in infotext


def _write_garbage(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"this is not an image")
    return str(tmp_path / "broken.png")


@pytest.mark.parametrize("command, argv, message", [
    (txt2img, ["x", "--steps", "0"], "steps must be an integer >= 1, got 0"),
    (txt2img, ["x", "--width", "60"], "width must be a positive multiple of 8 pixels, got 60"),
    (txt2img, ["x", "--sampler", "Euler z"], "unknown sampler 'Euler z'; valid: Euler a, Euler, LMS"),
    (txt2img, ["x", "--scheduler", "Wavy"], "unknown schedule type 'Wavy'; valid: Automatic, Uniform"),
    (txt2img, ["x", "--model", "missing.safetensors"], "--model: file not found: missing.safetensors"),
    (txt2img, ["x", "--vae", "missing.pt"], "VAE file not found: missing.pt"),
    (txt2img, ["x", "--lora-dir", "no_such_folder"], "--lora-dir: folder not found"),
    (txt2img, ["x", "--restore-faces"], "face-restoration weights"),
    (img2img, ["--init-image", "missing.png"], "image not found: missing.png"),
    (img2img, ["--init-image", "BROKEN"], "cannot read image"),
])
def test_user_mistakes_exit_2_with_one_line(tmp_path, capsys, command, argv, message):
    argv = [_write_garbage(tmp_path) if a == "BROKEN" else a for a in argv]
    status = command.main([*FAST, *argv, "--outdir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert len([line for line in err if "error" in line]) == 1 and message in err[-1]
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")


@pytest.mark.parametrize("argv, message", [
    (["x", "--cfg-scale", "abc"], "argument --cfg-scale: invalid float value: 'abc'"),
    (["x", "--steps", "2.5"], "argument --steps: invalid int value: '2.5'"),
    ([], "give either a prompt or --from-file PROMPTS.txt"),
])
def test_malformed_arguments_exit_2_without_the_usage_text(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        txt2img.main(argv)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"python -m sample.txt2img: error: {message}\n"


def test_readme_command_runs_as_a_module(tmp_path):
    """`python -m sample.txt2img "a red circle" --outdir ...` in a fresh interpreter, as the README's first command."""
    completed = subprocess.run([sys.executable, "-m", "sample.txt2img", "a red circle", "--outdir", str(tmp_path),
                                "--seed", "1", "--no-progress"], cwd=REPO, capture_output=True, text=True,
                               timeout=300)
    assert completed.returncode == 0, completed.stderr
    assert completed.stderr == ""
    (path,) = completed.stdout.splitlines()
    assert os.path.basename(path) == "00000-1-a red circle.png" and Image.open(path).size == (64, 64)


@pytest.mark.parametrize("flags, compile", [([], False), (["--compile"], True),
                                            (["--compile", "max-autotune"], "max-autotune")])
def test_compile_flag_reaches_generate(tmp_path, monkeypatch, flags, compile):
    seen = []

    def recording_generate(*args, compile, **kwargs):
        seen.append(compile)
        raise cli.GenerationError("stopped after recording the compile argument")

    monkeypatch.setattr(cli, "generate", recording_generate)
    assert txt2img.main(["x", *FAST, *flags, "--outdir", str(tmp_path)]) == 1
    assert seen == [compile]


@pytest.mark.parametrize("precision, dtype", [("auto", "float32"), ("full", "float32"), ("half", "float16"),
                                              ("bf16", "bfloat16")])
def test_precision_flag_sets_the_weights_dtype_on_the_cpu(tmp_path, monkeypatch, precision, dtype):
    seen = []

    def recording_generate(model, *args, **kwargs):
        seen.append(str(model.model.dtype).removeprefix("torch."))
        raise cli.GenerationError("stopped after recording the model's dtype")

    monkeypatch.setattr(cli, "generate", recording_generate)
    assert txt2img.main(["x", *FAST, "--precision", precision, "--device", "cpu", "--outdir", str(tmp_path)]) == 1
    assert seen == [dtype]


def test_bf16_images_match_float32_ones(tmp_path, capsys):
    """bfloat16 weights (8-bit mantissa) with float32 sampling: the same picture within a few levels of 255."""
    images = []
    for precision in ("full", "bf16"):
        assert txt2img.main(["a red circle", "--steps", "4", "--sampler", "Euler", "--seed", "5", "--no-progress",
                             "--precision", precision, "--outdir", str(tmp_path / precision)]) == 0
        images.append(np.asarray(Image.open(capsys.readouterr().out.strip()), dtype=np.int16))
    difference = np.abs(images[0] - images[1])
    assert difference.mean() < 1.0 and difference.max() <= 16
