#!/usr/bin/env bash
# The GPU check, in one command:   bash scripts/gpu-check.sh            (needs a CUDA device; ~5 min on one GPU)
#                                  bash scripts/gpu-check.sh --dry-run  (CPU only, tiny; what the test suite runs)
#
# 1. the loss tests on CUDA (DISTILL_TEST_DEVICE=cuda: the tests of tests/student/test_losses*.py that take the
#    `device` fixture, see tests/student/conftest.py);
# 2. benchmarks/loss.py --device cuda (bf16; soft CE vs megatron-core's hard CE, and the output layer + loss
#    variants with the fused one): writes the `cuda` entries of benchmarks/results/loss.json, keeps the CPU ones;
# 3. benchmarks/train.py on CUDA (a training step soft vs hard, fused vs unfused): its report becomes the `cuda`
#    key of benchmarks/results/train.json;
# 4. a short bf16 training of the embedded default student at TP=1 through `python -m student.train` (megatron-core
#    DDP + distributed optimizer), its checkpoint resumed on the CPU path and back (scripts/gpu_check.py): the
#    `cuda` key of benchmarks/results/gpu_check.json.
#
# --dry-run does the same on the CPU at tiny sizes and writes only into a temporary folder: steps 1 and 4 run (the
# device tests on the CPU; training legs A and B, float32), steps 2 and 3 are printed and their scripts compiled
# and checked for the flags used (CI runs both benchmarks in their own tests). Every step runs even after one fails; the exit
# status is non-zero when any failed. DISTILL_SKIP_VENV=1 uses the Python on PATH instead of scripts/env.sh's
# .venv (a GPU machine with its own CUDA torch and megatron-core 0.16.1, where the pinned CPU venv can't be built).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
DRY=0
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY=1 ;;
        -h | --help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "usage: bash scripts/gpu-check.sh [--dry-run]" >&2; exit 2 ;;
    esac
done
if [ "${DISTILL_SKIP_VENV:-0}" != 1 ]; then
    # shellcheck source=scripts/env.sh
    source "$ROOT/scripts/env.sh" || exit 2
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
if [ "$DRY" = 1 ]; then
    DEVICE=cpu
    RESULTS="$WORK/results"
    mkdir -p "$RESULTS"
    cp benchmarks/results/*.json "$RESULTS"/ 2>/dev/null
else
    DEVICE=cuda
    RESULTS="$ROOT/benchmarks/results"
    if ! python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
        echo "error: torch sees no CUDA device (torch $(python -c 'import torch; print(torch.__version__)')); run with --dry-run on a CPU" >&2
        exit 2
    fi
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
fi

FAILED=()
step() {  # step NAME TIMEOUT_S COMMAND...: run one step under a time limit, remember a failure, go on
    local name="$1" limit="$2" started=$SECONDS
    shift 2
    echo "==> [$name] $*"
    local runner=(timeout --kill-after=10 "$limit")
    declare -F "$1" >/dev/null && runner=()  # a shell function (its commands are short)
    if "${runner[@]}" "$@"; then
        echo "<== [$name] ok ($((SECONDS - started)) s)"
    else
        echo "<== [$name] FAILED (exit $?, $((SECONDS - started)) s)" >&2
        FAILED+=("$name")
    fi
}
flags_exist() {  # flags_exist SCRIPT FLAG...: the script compiles and declares every flag the GPU run passes
    local script="$1"
    shift
    python -m py_compile "$script" || return 1
    for flag in "$@"; do
        grep -q -- "\"$flag\"" "$script" || { echo "$script declares no $flag" >&2; return 1; }
    done
    echo "would run: python $script $* ..."
}

step loss-tests 300 env DISTILL_TEST_DEVICE="$DEVICE" python -m pytest -q -p no:cacheprovider tests/student/test_losses*.py
if [ "$DRY" = 1 ]; then
    step loss-benchmark 120 flags_exist benchmarks/loss.py --device
    step train-benchmark 120 flags_exist benchmarks/train.py --out
    step train-check 600 python scripts/gpu_check.py train-check "$WORK/train" --device cpu --tiny
else
    step loss-benchmark 300 python benchmarks/loss.py --device cuda --out "$RESULTS/loss.json"
    step train-benchmark 300 python benchmarks/train.py --out "$WORK/train_cuda.json"
    if [ -f "$WORK/train_cuda.json" ]; then
        step train-benchmark-merge 60 python scripts/gpu_check.py merge "$WORK/train_cuda.json" "$RESULTS/train.json" cuda
    fi
    step train-check 420 python scripts/gpu_check.py train-check "$WORK/train" --device cuda
fi
if [ -f "$WORK/train/train_check.json" ]; then
    step train-check-merge 60 python scripts/gpu_check.py merge "$WORK/train/train_check.json" "$RESULTS/gpu_check.json" "$DEVICE"
fi

if [ "${#FAILED[@]}" -gt 0 ]; then
    echo "gpu-check: FAILED steps: ${FAILED[*]}" >&2
    exit 1
fi
echo "gpu-check: all steps passed$([ "$DRY" = 1 ] && echo " (dry run: nothing under benchmarks/results was written)")"
