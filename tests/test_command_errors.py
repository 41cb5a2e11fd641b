"""Every command's `main` on hostile or careless input: the exit status is 2, stderr is one line naming the problem,
and no traceback is printed (issue 23). Files are built per case in tmp_path; nothing here generates more than a
32x32 image of the default model."""
import struct
import zlib

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, safe_open, save_file

import ldm
from metrics import compare, evaluate, shapes
from metrics.human import __main__ as human
from sample import img2img, pnginfo, txt2img
from sample_helpers import one_thread  # noqa: F401  (autouse fixture)
from train import __main__ as train

FAST = ["--steps", "1", "--width", "32", "--height", "32", "--no-progress"]


def _tiny_model_file(path, metadata_changes: dict | None = None, trim_key_ending: str | None = None) -> str:
    """The tiny preset saved by ldm.save_model, then one metadata value changed or one tensor cut one element
    short."""
    torch.manual_seed(0)
    ldm.save_model(ldm.create_model("tiny"), path)
    with safe_open(str(path), "pt") as opened:
        metadata = opened.metadata()
    weights = load_file(str(path))
    if trim_key_ending:
        key = next(key for key in weights if key.endswith(trim_key_ending))
        weights[key] = weights[key][:-1].contiguous()
    save_file(weights, str(path), metadata={**metadata, **(metadata_changes or {})})
    return str(path)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(path, width: int, height: int, extra_chunks: bytes = b"") -> str:
    """A PNG whose header claims width x height (a decompression bomb when large), with one tiny IDAT."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + extra_chunks
            + _png_chunk(b"IDAT", zlib.compress(b"\0" * 4)) + _png_chunk(b"IEND", b""))
    path.write_bytes(data)
    return str(path)


def _ztxt_bomb(path) -> str:
    """A 1x1 PNG whose `parameters` zTXt chunk inflates to 50 MB (50 kB on disk)."""
    chunk = _png_chunk(b"zTXt", b"parameters\0\0" + zlib.compress(b"a" * 50_000_000, 9))
    return _png(path, 1, 1, chunk)


def _file_under_a_file(tmp_path) -> str:
    (tmp_path / "a-file").write_text("x")
    return str(tmp_path / "a-file" / "out")


# (command, argv builder taking tmp_path, the part of the message that names the problem)
CASES = {
    "clip skip beyond the model": (txt2img, lambda t: ["x", *FAST, "--clip-skip", "12"],
                                   "clip_skip 12 is beyond this model's text encoder: it allows 1 to 4"),
    "size the UNet cannot halve": (txt2img, lambda t: ["x", *FAST, "--width", "72"],
                                   "width 72 does not fit this model"),
    "steps beyond the noise levels": (txt2img, lambda t: ["x", *FAST, "--steps", "5000"],
                                      "steps must be between 1 and 1000"),
    "batch count beyond the limit": (txt2img, lambda t: ["x", *FAST, "--batch-count", "1000"],
                                     "batch_count must be between 1 and 100"),
    "hires upscaler that is not in the folder": (
        txt2img, lambda t: ["x", *FAST, "--hires", "--hr-upscaler", "4x-UltraSharp", "--upscalers-dir", str(t)],
        "unknown hires upscaler '4x-UltraSharp'; valid: Latent, Latent (nearest), None, Lanczos, Nearest"),
    "hires upscaler file of an unknown layout": (
        txt2img, lambda t: ["x", *FAST, "--hires", "--hr-upscaler", "m", "--upscalers-dir",
                            str(_tiny_model_file(t / "m.safetensors")).rsplit("/", 1)[0]],
        "hr_upscaler: m.safetensors: not a known upscaler model"),
    "5000 nested parentheses": (txt2img, lambda t: ["(" * 5000, *FAST], "nest more than 100 deep"),
    "5000 nested prompt edits": (txt2img, lambda t: ["[a:" * 2000, *FAST], "nest more than 100 deep"),
    "scale factor that is not a number": (
        txt2img, lambda t: ["x", *FAST, "--model", _tiny_model_file(t / "m.safetensors", {"ldm.scale_factor": "abc"})],
        "m.safetensors"),
    "negative resolution": (  # no --width / --height: the model's resolution is the size
        txt2img, lambda t: ["x", "--steps", "1", "--no-progress", "--model",
                            _tiny_model_file(t / "m.safetensors", {"ldm.resolution": "-64"})], "-64"),
    "unknown prediction": (
        txt2img, lambda t: ["x", *FAST, "--model", _tiny_model_file(t / "m.safetensors", {"ldm.prediction": "x"})],
        "m.safetensors"),
    "mis-shaped weight": (
        txt2img, lambda t: ["x", *FAST, "--model",
                            _tiny_model_file(t / "m.safetensors", trim_key_ending="final_layer_norm.weight")],
        "m.safetensors"),
    "outdir under a file": (txt2img, lambda t: ["x", *FAST, "--outdir", _file_under_a_file(t)], "cannot write there"),
    "outdir that cannot be created": (txt2img, lambda t: ["x", *FAST, "--outdir", "/proc/no-such/out"],
                                      "--outdir /proc/no-such/out: cannot write there"),
    "init image that is a decompression bomb": (
        img2img, lambda t: ["--init-image", _png(t / "bomb.png", 100_000, 100_000), *FAST], "cannot read image"),
    "pnginfo on a decompression bomb": (pnginfo, lambda t: [_png(t / "bomb.png", 100_000, 100_000)],
                                        "cannot read image"),
    "pnginfo on a 50 MB zTXt chunk": (pnginfo, lambda t: [_ztxt_bomb(t / "text.png")], "cannot read image"),
    "pnginfo on a missing file": (pnginfo, lambda t: [str(t / "missing.png")], "image not found"),
    "train with a missing config": (train, lambda t: ["--config", str(t / "missing.toml")], "missing.toml"),
    "train with an unknown option": (train, lambda t: ["--bogus"], "unrecognized arguments: --bogus"),
    "metrics.compare with a step count that is not a number": (
        compare, lambda t: ["--prompts", "p.txt", "--steps", "abc"], "argument --steps: invalid int value: 'abc'"),
    "metrics.shapes without a source": (shapes, lambda t: ["--n", "3"], "one of the arguments --images --model"),
    "metrics.human without a command": (human, lambda t: [], "the following arguments are required: command"),
    "metrics.compare with a missing prompts file": (
        compare, lambda t: ["--prompts", str(t / "missing.txt"), "--model", "a=default", "--model", "b=default",
                            "--outdir", str(t / "c")], "missing.txt"),
    "metrics.evaluate with a missing folder": (
        evaluate, lambda t: ["--real", str(t / "missing"), "--fake", str(t / "missing2"), "--report", ""],
        "--inception-weights"),
    "metrics.shapes with a missing folder": (shapes, lambda t: ["--images", str(t / "missing")], "missing"),
    "metrics.human report on a missing study": (human, lambda t: ["report", "--db", str(t / "missing.sqlite")],
                                                "missing.sqlite"),
}


def _run(command, argv) -> int:
    try:
        return command.main(argv)
    except SystemExit as exit_:  # argparse's parser.exit / parser.error
        return exit_.code


@pytest.mark.parametrize("case", list(CASES))
def test_user_errors_exit_2_with_one_line_and_no_traceback(case, tmp_path, capsys):
    command, build_argv, message = CASES[case]
    status = _run(command, build_argv(tmp_path))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert message in lines[0] and "error:" in lines[0]


def test_a_prompt_of_undecodable_argv_bytes_is_saved_with_replacement_characters(tmp_path, capsys):
    prompt = b"a red \xff circle".decode("utf-8", "surrogateescape")  # how Python hands such argv to main
    assert txt2img.main([prompt, *FAST, "--seed", "1", "--outdir", str(tmp_path)]) == 0
    (path,) = capsys.readouterr().out.splitlines()
    assert path.endswith("00000-1-a red \ufffd circle.png")
    assert Image.open(path).info["parameters"].startswith("a red \ufffd circle\n")


def test_an_unwritable_outdir_is_refused_before_any_model_is_loaded(tmp_path, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the output folder was checked")

    monkeypatch.setattr("sample.cli.default_model", no_loading)
    assert txt2img.main(["x", *FAST, "--outdir", _file_under_a_file(tmp_path)]) == 2
