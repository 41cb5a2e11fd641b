"""The benchmark commands' shared option handling (benchmarks/common.py) and the GPU script's fail-fast checks; the
benchmarks themselves are measured by running them (docs/BENCHMARKS.md), not here."""
import argparse
import importlib
import os
import subprocess
from pathlib import Path

import pytest
import torch

from benchmarks import common

REPO_ROOT = Path(__file__).resolve().parents[1]
GPU = {"preset": "sd15", "dtype": "fp16", "size": 512}
CPU = {"preset": "tiny", "dtype": "fp32", "size": 64}


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench")
    parser.add_argument("--steps", type=int, default=20)
    return common.parse_benchmark_args(parser, list(argv), dtypes=("fp32", "fp16"), repeat=3, gpu=GPU, cpu=CPU)


def test_unset_options_take_the_defaults_of_the_device_and_given_ones_stay():
    args = parse("--device", "cpu", "--size", "32")
    assert (args.preset, args.dtype, args.size, args.repeat, args.steps) == ("tiny", "fp32", 32, 3, 20)


@pytest.mark.parametrize("argv, message", [
    (["--device", "cpu", "--size", "30"], "--size must be a positive multiple of 8, got 30"),
    (["--device", "cpu", "--repeat", "0"], "--repeat must be at least 1, got 0"),
    (["--device", "cpu", "--dtype", "bf16"], "invalid choice: 'bf16'"),
])
def test_bad_options_exit_2_with_the_reason(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        parse(*argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_asking_for_cuda_without_a_gpu_says_so(capsys):
    with pytest.raises(SystemExit):
        parse("--device", "cuda")
    assert "torch sees no CUDA GPU; use --device cpu" in capsys.readouterr().err


def test_a_child_gets_back_exactly_the_options_that_were_set():
    args = argparse.Namespace(preset="tiny", threads=None, gradient_checkpointing=True, checkpointing_off=False,
                              size=64)
    assert common.forwarded(args, "preset", "threads", "gradient_checkpointing", "checkpointing_off", "size") == [
        "--preset", "tiny", "--gradient-checkpointing", "--size", "64"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_gpu_script_without_a_gpu_exits_2_with_one_line_before_running_anything(tmp_path):
    result = subprocess.run(["bash", str(REPO_ROOT / "benchmarks" / "gpu.sh"), str(tmp_path / "results")],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "TRITON_INTERPRET": ""})
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "benchmarks/gpu.sh: needs a CUDA GPU, and torch sees none (torch.cuda.is_available() is False)"]
    assert result.stdout == "" and not (tmp_path / "results").exists()


def test_gpu_script_refuses_an_unknown_step_before_anything_else(tmp_path):
    result = subprocess.run(["bash", str(REPO_ROOT / "benchmarks" / "gpu.sh"), str(tmp_path / "results"), "models",
                             "txt2image"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "benchmarks/gpu.sh: unknown step txt2image; the steps: cuda_tests kernels_bench kernel_self_check models "
        "txt2img txt2img_compiled"]
    assert not (tmp_path / "results").exists()


def test_gpu_script_refuses_the_triton_interpreter(tmp_path):
    result = subprocess.run(["bash", str(REPO_ROOT / "benchmarks" / "gpu.sh")], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert result.returncode == 2 and "TRITON_INTERPRET is set" in result.stderr


@pytest.mark.parametrize("name", ["models", "sampler_overhead", "txt2img", "train_step", "kernel_self_check",
                                  "data_stream", "realtime"])
def test_benchmark_commands_import_and_show_their_help(capsys, name):
    command = importlib.import_module(f"benchmarks.{name}")
    with pytest.raises(SystemExit) as exit_info:
        command.main(["--help"])
    assert exit_info.value.code == 0 and f"python -m benchmarks.{name}" in capsys.readouterr().out
