#!/usr/bin/env bash
# Everything a CUDA GPU can tell this project, in two runs of under 10 minutes each on an H200 (measured 2026-12-04):
#   1. the CUDA tests (`pytest -m cuda`): the Triton kernels within 2x of PyTorch's own error at full SD shapes, the
#      SD1.5 UNet through them, LDM_KERNELS=auto's self-check accepting them;
#   2. python -m kernels.bench: the kernels against every SDPA backend (flash, efficient, cuDNN, math), SD1.5/SD2/SDXL;
#   3. python -m benchmarks.kernel_self_check: the one-time cost of auto's self-check and race, and the race's gain;
#   4. python -m benchmarks.models: UNet forward and VAE decode against diffusers (fp16);
#   5. python -m benchmarks.txt2img: 20-step SD1.5 txt2img at 512x512 against diffusers' pipeline (fp16);
#   6. the same with ours compiled (torch.compile + CUDA graphs) against diffusers eager.
# Each step has its own time limit, so one that hangs cannot eat the others' time; its row then says so.
#
#     bash benchmarks/gpu.sh [results folder, default gpu-results] [step ...]
#
# Steps: cuda_tests kernels_bench kernel_self_check models txt2img txt2img_compiled (default: all of them, about 14
# minutes at their limits; naming some runs only those into the same folder). On a machine lent for 10 minutes a call:
#     bash benchmarks/gpu.sh gpu-results cuda_tests kernels_bench kernel_self_check      # limits: 360 s
#     bash benchmarks/gpu.sh gpu-results models txt2img txt2img_compiled                # limits: 480 s
# Prints a Markdown section to paste into docs/BENCHMARKS.md (also written to <folder>/summary.md, with each step's
# full log beside it). Run from a checkout with the test extras installed (README, set-up command 2).
set -uo pipefail
cd "$(dirname "$0")/.."
results=${1:-gpu-results}
shift $(($# > 0 ? 1 : 0))
all_steps="cuda_tests kernels_bench kernel_self_check models txt2img txt2img_compiled"
selected=${*:-$all_steps}
for name in $selected; do
    case " $all_steps " in *" $name "*) ;; *) echo "benchmarks/gpu.sh: unknown step $name; the steps: $all_steps" >&2
                                             exit 2 ;; esac
done

fail() {
    echo "benchmarks/gpu.sh: $1" >&2
    exit 2
}

# Non-GPU prerequisites first, so a wrong machine or environment fails in seconds, before any model is built.
python -c "import torch" 2>/dev/null || fail "python cannot import torch; install the project first (see README)"
python - <<'EOF' || exit 2
import importlib.util, sys
missing = [name for name in ("pytest", "triton", "diffusers", "transformers", "open_clip")
           if importlib.util.find_spec(name) is None]
if missing:
    sys.exit(f"benchmarks/gpu.sh: {', '.join(missing)} not installed; install the test extras: "
             "pip install -e '.[test]' && pip install --no-deps -r tests/oracles-no-deps.txt")
EOF
[ -z "${TRITON_INTERPRET:-}" ] || fail "TRITON_INTERPRET is set: the GPU run needs compiled kernels; unset it"
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || fail "needs a CUDA GPU, and torch sees none (torch.cuda.is_available() is False)"

mkdir -p "$results" || fail "cannot create the results folder $results"
summary="$results/summary.md"
machine=$(python -c "import torch, triton; p = torch.cuda.get_device_properties(0); \
print(f'{p.name} ({p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}), torch {torch.__version__}, ' \
      f'CUDA {torch.version.cuda}, Triton {triton.__version__}')") || fail "cannot read the GPU's properties"

# step NAME SECONDS COMMAND...: run COMMAND with a time limit, its stdout (the tables) into $results/NAME.log and its
# stderr (progress bars, warnings) into $results/NAME.err; the outcome in $status, and failures counted.
failures=0
step() {
    local name=$1 limit=$2
    shift 2
    case " $selected " in *" $name "*) ;; *) status="not run (not selected)"; return ;; esac
    echo "== $name: $* (limit ${limit}s)" >&2
    local start=$SECONDS
    timeout "$limit" "$@" >"$results/$name.log" 2>"$results/$name.err"
    local code=$?
    local took=$((SECONDS - start))
    case $code in
        0) status="ok, ${took}s" ;;
        124) status="TIMED OUT after ${limit}s" ;;
        *) status="FAILED (exit $code, ${took}s; see $results/$name.err)" ;;
    esac
    [ "$code" -eq 0 ] || failures=$((failures + 1))
    echo "   $status" >&2
}

# Budgets (s) sum to 840; the set-up above takes seconds. Measured on an H200 with 16 CPU cores: the CUDA tests 112 s,
# the kernel bench 54 s, the compiled txt2img 112 s; the benchmarks that build SD1.5 with random weights on the CPU
# once per side and measurement (models, txt2img, the self-check) ran past 50-90 s, so they get more. The CUDA tests and
# the kernel bench take each autotune table's first candidate (compiling every candidate for every shape would not
# fit); Triton's disk cache then serves the later steps. Every step builds its models from scratch, on the GPU where it
# can, so none depends on another's success. The CUDA tests are collected from the files that hold them only (a test
# module whose oracle is not installed there would stop the whole collection), in 8 processes when pytest-xdist is
# installed, since compiling the kernels for each shape is most of their time.
export LDM_KERNELS_AUTOTUNE=0
parallel=$(python -c "import importlib.util as u; print('-n 8' if u.find_spec('xdist') else '')")
# shellcheck disable=SC2046,SC2086  # the file list and the xdist option are meant to split into words
step cuda_tests 150 python -m pytest -q -p no:cacheprovider -m cuda $parallel $(grep -l "mark\.cuda" tests/test_*.py)
tests_status=$status
step kernels_bench 90 python -m kernels.bench --rep-ms 50
kernels_status=$status
step kernel_self_check 120 python -m benchmarks.kernel_self_check
self_check_status=$status
step models 180 python -m benchmarks.models --dtype fp16 --skip-load
models_status=$status
step txt2img 150 python -m benchmarks.txt2img --rounds 1 --repeat 3
txt2img_status=$status
step txt2img_compiled 150 python -m benchmarks.txt2img --rounds 1 --repeat 3 --compile
compiled_status=$status

{
    echo "## GPU run, $(date -u +%Y-%m-%d) (\`bash benchmarks/gpu.sh\`)"
    echo
    echo "Machine: $machine. LDM_KERNELS_AUTOTUNE=0 (each kernel's first tile configuration)."
    echo
    echo "| step | command | outcome |"
    echo "| --- | --- | --- |"
    tests_tail=$(tail -n 1 "$results/cuda_tests.log" 2>/dev/null)
    echo "| CUDA tests | \`python -m pytest -m cuda\` | $tests_status: $tests_tail |"
    echo "| kernels vs SDPA | \`python -m kernels.bench --rep-ms 50\` | $kernels_status |"
    echo "| self-check cost | \`python -m benchmarks.kernel_self_check\` | $self_check_status |"
    echo "| UNet / VAE vs diffusers | \`python -m benchmarks.models --dtype fp16 --skip-load\` | $models_status |"
    echo "| txt2img vs diffusers | \`python -m benchmarks.txt2img --rounds 1 --repeat 3\` | $txt2img_status |"
    echo "| compiled txt2img vs diffusers eager | \`python -m benchmarks.txt2img --rounds 1 --repeat 3 --compile\` |" \
         "$compiled_status |"
    for name in kernels_bench kernel_self_check models txt2img txt2img_compiled; do
        [ -f "$results/$name.log" ] || continue
        echo
        echo "### $name"
        echo
        echo '```'
        cat "$results/$name.log"
        echo '```'
    done
} | tee "$summary"
[ "$failures" -eq 0 ] || { echo "benchmarks/gpu.sh: $failures step(s) did not finish; see $results/" >&2; exit 1; }
