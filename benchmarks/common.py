"""What the benchmark commands share: their common options, the reference packages they compare against, the child
processes that keep each side's peak-memory reading apart, and the timers and memory readers.

The benchmarks compare against the test oracles (diffusers, k-diffusion), so they live in the checkout beside tests/,
never in an installed package, and reach the oracle bridges in tests/ (oracles.py, sample_helpers.py) from here.
"""
import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
INSTALL_HINT = "install the test extras: pip install -e '.[test]' && pip install --no-deps -r tests/oracles-no-deps.txt"


def parse_benchmark_args(parser: argparse.ArgumentParser, argv: list[str] | None, *, dtypes: Iterable[str],
                         repeat: int, gpu: dict, cpu: dict) -> argparse.Namespace:
    """Add the options every model benchmark takes (--preset, --device, --dtype, --size, --repeat and the hidden
    --child of its subprocesses) to `parser`, parse `argv`, and fill --preset, --dtype and --size left unset from `gpu`
    or `cpu` (dicts with those three keys) by the device. Usage errors exit 2 with one line."""
    def default(name: str) -> str:
        return f"{gpu[name]} on a GPU, {cpu[name]} on the CPU" if gpu[name] != cpu[name] else str(gpu[name])

    parser.add_argument("--preset", help=f"model preset (default: {default('preset')})")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda or cpu (default: cuda when torch sees a GPU)")
    parser.add_argument("--dtype", choices=list(dtypes), help=f"precision (default: {default('dtype')})")
    parser.add_argument("--size", type=int, help=f"image size in pixels (default: {default('size')})")
    parser.add_argument("--repeat", type=int, default=repeat, help=f"timed runs per measurement (default {repeat})")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    on_gpu = args.device.startswith("cuda")
    for name, value in (gpu if on_gpu else cpu).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if on_gpu and not torch.cuda.is_available():
        parser.error(f"--device {args.device} was asked for, but torch sees no CUDA GPU; use --device cpu")
    if args.size <= 0 or args.size % 8:
        parser.error(f"--size must be a positive multiple of 8, got {args.size}")
    if args.repeat < 1:
        parser.error(f"--repeat must be at least 1, got {args.repeat}")
    return args


def forwarded(args: argparse.Namespace, *names: str) -> list[str]:
    """The command-line options `names` (attribute names) with their values in `args`, to hand to a child process;
    booleans become bare flags, unset options are left out."""
    options = []
    for name in names:
        value = getattr(args, name)
        flag = "--" + name.replace("_", "-")
        if value is True:
            options.append(flag)
        elif value not in (None, False):
            options += [flag, str(value)]
    return options


def require_reference(parser: argparse.ArgumentParser, *modules: str) -> None:
    """Exit 2 with one line when a reference package the benchmark compares against is not installed."""
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        parser.error(f"the benchmark compares against {', '.join(missing)}, which is not installed: {INSTALL_HINT}")


def use_test_oracles() -> None:
    """Put tests/ on sys.path so the oracle bridges there (oracles.py, sample_helpers.py, sampler_oracles.py) import."""
    tests = str(REPO_ROOT / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)


def run_child(parser: argparse.ArgumentParser, module: str, *child_args: str) -> dict:
    """Run `python -m <module> --child <child_args>` from the checkout and return the JSON object its last line holds;
    a failed child ends the benchmark with its error output."""
    done = subprocess.run([sys.executable, "-m", module, "--child", *child_args], cwd=REPO_ROOT, capture_output=True,
                          text=True)
    if done.returncode:
        parser.exit(1, f"{parser.prog}: the child run `{' '.join(child_args)}` failed:\n{done.stderr[-2000:]}\n")
    return json.loads(done.stdout.strip().splitlines()[-1])


def print_child_result(result: dict) -> int:
    """What a child process prints: one JSON line, read back by run_child."""
    print(json.dumps(result))
    return 0


def median_seconds(fn: Callable[[], object], device: str, repeat: int) -> float:
    """Median wall-clock seconds of fn() over `repeat` runs after one warm-up, CUDA work included."""
    fn()
    times = []
    for _ in range(repeat):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def reset_peak_rss() -> None:
    # Linux: writing 5 to clear_refs resets the process's peak resident set (VmHWM) to the current one, so the next
    # reading covers only what follows (model construction before it would otherwise dominate the peak).
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_memory(device: str) -> int:
    """Start a peak-memory reading on `device` (CUDA allocator, or the process's RSS on the CPU); returns the baseline
    that peak_memory_above subtracts."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    reset_peak_rss()
    return current_rss_bytes()


def peak_memory_above(device: str, baseline: int) -> int:
    """Peak bytes on `device` since reset_peak_memory, above its baseline."""
    return (torch.cuda.max_memory_allocated() if device.startswith("cuda") else peak_rss_bytes()) - baseline
