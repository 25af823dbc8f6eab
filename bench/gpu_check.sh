#!/usr/bin/env bash
# bench/gpu_check.sh: every CUDA path of wmdd, checked and timed in one run (at most ~8 minutes on an
# H100/H200). docs/gpu.md says what each number means and what it is compared with.
#
# Usage, from anywhere (it runs in the repository root):
#   bash bench/gpu_check.sh [--out DIR] [--wheels DIR] [--budget SECONDS] [--python PY] [--cpu]
#                           [--only STEP,STEP] [--keep-work] [--fail-step STEP[=timeout]]
#
#   --out DIR       where the results go (default: $OUT when set, else runs/gpu_check in the repository)
#   --wheels DIR    wheel folder holding POT (default: the first of .whl, shared/wheels, ../wheels)
#   --budget S      seconds for the whole run (default 540); a step never runs past it
#   --python PY     the Python that has torch (default: .venv/bin/python if present, else python3)
#   --cpu           hide the GPU (CUDA_VISIBLE_DEVICES=): the CPU run the test makes
#   --only LIST     run these steps only (the others are recorded "skipped: not selected")
#   --keep-work     keep the scratch folder (run directories, synthetic.pt files)
#   --fail-step S   for tests: step S fails on purpose (exit code 3), or times out with S=timeout
#
# On the lent GPU machine, through the device tool: one call, timeout_s 570, carry [".whl"]:
#   bash bench/gpu_check.sh --out "$OUT" --wheels .whl
#
# That machine has torch (python3, Python 3.12) but no POT and no internet. Prepare the wheel folder
# here first, for its Python (numpy and scipy, POT's own needs, are already there):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary :all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl pot
# The script runs `pip install --no-index --find-links DIR pot` only when `import ot` fails.
#
# Steps, in order (each under its own `timeout`; a failed step is recorded "FAILED rc=N" and the next
# one runs). The steps marked (GPU) print "skipped: no CUDA" without a GPU; the others then run at a
# tiny size.
#   env               versions, the GPU, the kernels before the build
#   wheels            POT from the wheel folder when it is missing
#   build             wmdd._C with CUDA kernels, TORCH_CUDA_ARCH_LIST = the GPU's capability (GPU)
#   pytest_gpu        pytest -m gpu, then tests/test_kernels.py on the new build     (GPU)
#   recover_bench     bench/bench_recover.py: released loop vs ours on the same inputs, 50 iterations
#   flops             FLOPs of one recover iteration at ResNet-18, 224 px, batch 100
#   recover_imagenet  ResNet-18, 224 px, batch 100: released loop (ported) and recover.py, fp32 and bf16
#                     (ms per iteration, peak memory, TFLOP/s, loss and gradient agreement) (GPU)
#   barycenter        batched Sinkhorn barycenters, 1000 x 1300 x 512, k = 50 (CPU: 10 x 50 x 16, k = 5)
#   torchrun          recover with 2 ranks against 1 process (GPU: NCCL on one GPU, gloo if NCCL refuses)
#
# Output: DIR/gpu_check.txt, every number as "step.key = value" under one "[step] ok (N s)",
# "[step] skipped: ..." or "[step] FAILED rc=N ..." line per step; DIR/gpu_check.log, every program's
# full output. Exit code: 0 when every step is ok or skipped, 1 when a step failed, 2 on bad input.
set -u

STEPS="env wheels build pytest_gpu recover_bench flops recover_imagenet barycenter torchrun"

die() {  # bad input: a message and exit code 2
    echo "gpu_check: $*" >&2
    exit 2
}

usage() {
    sed -n '2,/^set -u/p' "$0" | sed -e '/^set -u/d' -e 's/^# \{0,1\}//'
}

known_step() {
    case " $STEPS " in *" $1 "*) return 0 ;; esac
    return 1
}

REPO="$(cd -- "$(dirname -- "$0")/.." && pwd)"
OUT_DIR="${OUT:-$REPO/runs/gpu_check}"
WHEELS=""
BUDGET=540
PY=""
FORCE_CPU=0
ONLY=""
KEEP_WORK=0
FAIL_SPECS=""

while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --cpu) FORCE_CPU=1; shift; continue ;;
        --keep-work) KEEP_WORK=1; shift; continue ;;
        --out|--wheels|--budget|--python|--only|--fail-step)
            [ $# -ge 2 ] || die "$1 needs a value (--help lists the options)" ;;
        *) die "unknown argument '$1' (--help lists the options)" ;;
    esac
    case "$1" in
        --out) OUT_DIR="$2" ;;
        --wheels) WHEELS="$2" ;;
        --budget) BUDGET="$2" ;;
        --python) PY="$2" ;;
        --only) ONLY="$ONLY $(printf '%s' "$2" | tr ',' ' ')" ;;
        --fail-step) FAIL_SPECS="$FAIL_SPECS $2" ;;
    esac
    shift 2
done

case "$BUDGET" in
    ''|*[!0-9]*) die "--budget must be a whole number of seconds, got '$BUDGET'" ;;
esac
[ "$BUDGET" -ge 30 ] || die "--budget $BUDGET is too short: give it at least 30 seconds"
for s in $ONLY; do
    known_step "$s" || die "--only: no step '$s' (steps: $STEPS)"
done
for spec in $FAIL_SPECS; do
    known_step "${spec%%=*}" || die "--fail-step: no step '${spec%%=*}' (steps: $STEPS)"
    case "$spec" in *=*) [ "${spec#*=}" = timeout ] || die "--fail-step: '$spec' (use STEP or STEP=timeout)" ;; esac
done
if [ -n "$WHEELS" ] && [ ! -d "$WHEELS" ]; then
    die "--wheels $WHEELS is not a folder (docs/gpu.md says how to prepare it)"
fi
command -v timeout >/dev/null 2>&1 || die "needs the 'timeout' command (GNU coreutils)"

if ! mkdir -p -- "$OUT_DIR" 2>/dev/null || [ ! -d "$OUT_DIR" ] || [ ! -w "$OUT_DIR" ]; then
    die "cannot create or write the output folder '$OUT_DIR'"
fi
OUT_DIR="$(cd -- "$OUT_DIR" && pwd)"
[ -n "$WHEELS" ] && WHEELS="$(cd -- "$WHEELS" && pwd)"

cd "$REPO" || die "cannot enter $REPO"
HELPER="$REPO/bench/gpu_check.py"

if [ -z "$PY" ]; then
    if [ -x "$REPO/.venv/bin/python" ]; then PY="$REPO/.venv/bin/python"; else PY=python3; fi
fi
command -v "$PY" >/dev/null 2>&1 || die "--python $PY: no such program"
if [ "$FORCE_CPU" -eq 1 ]; then
    export CUDA_VISIBLE_DEVICES=""
fi
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
HAS_CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null | tail -n 1)
case "$HAS_CUDA" in
    1) DEV=cuda ;;
    0) DEV=cpu ;;
    *) die "$PY cannot import torch (pass --python with the Python that has it)" ;;
esac

if [ -n "$WHEELS" ]; then
    WHEEL_DIRS=("$WHEELS")
else
    WHEEL_DIRS=("$REPO/.whl" "$REPO/shared/wheels" "$(dirname -- "$REPO")/wheels")
fi

RESULT="$OUT_DIR/gpu_check.txt"
LOG="$OUT_DIR/gpu_check.log"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/wmdd_gpu_check.XXXXXX")" || die "cannot make a scratch folder"
cleanup() {
    if [ "$KEEP_WORK" -eq 1 ]; then echo "scratch folder kept: $WORK"; else rm -rf -- "$WORK"; fi
}
trap cleanup EXIT

START=$(date +%s)
DEADLINE=$((START + BUDGET))
now_ms() { date +%s%3N; }
T_START=$(now_ms)
seconds_since() {  # seconds (one decimal) since a now_ms value
    local ms=$(( $(now_ms) - $1 ))
    printf '%d.%d' $((ms / 1000)) $(((ms % 1000) / 100))
}

N_OK=0; N_SKIP=0; N_FAIL=0
record() { printf '%s\n' "$*" >> "$RESULT"; }
status() {  # status NAME TEXT: the step's line, in the file and on stdout
    printf '[%s] %s\n' "$1" "$2" | tee -a "$RESULT"
}

selected() {
    [ -z "$ONLY" ] && return 0
    case " $ONLY " in *" $1 "*) return 0 ;; esac
    return 1
}

forced_failure() {
    local spec
    for spec in $FAIL_SPECS; do
        if [ "${spec%%=*}" = "$1" ]; then
            case "$spec" in *=timeout) echo timeout ;; *) echo fail ;; esac
            return
        fi
    done
    echo none
}

run_step() {  # run_step NAME KIND(gpu|any) TIMEOUT COMMAND...
    local name=$1 kind=$2 limit=$3 left rc t0 secs line log
    shift 3
    if ! selected "$name"; then
        status "$name" "skipped: not selected"; N_SKIP=$((N_SKIP + 1)); return
    fi
    if [ "$kind" = gpu ] && [ "$HAS_CUDA" -eq 0 ]; then
        status "$name" "skipped: no CUDA"; N_SKIP=$((N_SKIP + 1)); return
    fi
    left=$((DEADLINE - $(date +%s)))
    if [ "$left" -lt 20 ]; then
        status "$name" "skipped: time budget spent (--budget $BUDGET)"; N_SKIP=$((N_SKIP + 1)); return
    fi
    [ "$limit" -gt $((left - 5)) ] && limit=$((left - 5))
    case "$(forced_failure "$name")" in
        timeout) set -- sleep 3600; limit=2 ;;
        fail) set -- "$PY" "$HELPER" fail --code 3 ;;
    esac
    echo "... $name (at most $limit s)"
    log="$WORK/step_$name.log"
    t0=$(now_ms)
    timeout --kill-after=15 "$limit" "$@" > "$log" 2>&1 < /dev/null
    rc=$?
    secs=$(seconds_since "$t0")
    { printf '\n===== %s: %s\n' "$name" "$*"; cat "$log"; printf '===== %s: exit code %d, %s s\n' "$name" "$rc" "$secs"; } >> "$LOG"
    if [ "$rc" -eq 0 ]; then
        line="ok ($secs s)"; N_OK=$((N_OK + 1))
    elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        line="FAILED rc=$rc (timeout after $limit s)"; N_FAIL=$((N_FAIL + 1))
    else
        line="FAILED rc=$rc ($secs s)"; N_FAIL=$((N_FAIL + 1))
    fi
    status "$name" "$line"
    grep '^@@ ' "$log" | sed "s/^@@ /$name./" >> "$RESULT"
    if [ "$rc" -ne 0 ]; then  # the end of its output, for a first look
        grep -v '^@@ ' "$log" | grep -v '^ *$' | tail -n 6 | sed 's/^/    | /' >> "$RESULT"
    fi
}

: > "$RESULT" || die "cannot write $RESULT"
: > "$LOG" || die "cannot write $LOG"
record "# wmdd GPU check (bench/gpu_check.sh); docs/gpu.md explains every line"
record "started: $(date -u +%Y-%m-%dT%H:%M:%SZ)  host: $(hostname 2>/dev/null || echo unknown)  mode: $DEV"
record "commit: $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)  python: $PY  budget: $BUDGET s"
echo "gpu_check: mode $DEV, results in $RESULT"

run_step env              any 60  "$PY" "$HELPER" env
run_step wheels           any 120 "$PY" "$HELPER" wheels "${WHEEL_DIRS[@]}"
run_step build            gpu 420 "$PY" "$HELPER" build --jobs 16
run_step pytest_gpu       gpu 300 "$PY" "$HELPER" pytest
run_step recover_bench    any 180 "$PY" "$HELPER" recover-bench --device "$DEV"
run_step flops            any 60  "$PY" "$HELPER" flops
run_step recover_imagenet gpu 300 "$PY" "$HELPER" recover-imagenet --device cuda --work "$WORK/recover_imagenet"
run_step barycenter       any 180 "$PY" "$HELPER" barycenter --device "$DEV"
run_step torchrun         any 300 "$PY" "$HELPER" torchrun --device "$DEV" --work "$WORK/torchrun"

record "summary: $N_OK ok, $N_SKIP skipped, $N_FAIL failed; $(seconds_since "$T_START") s"
echo
cat "$RESULT"
[ "$N_FAIL" -eq 0 ] || exit 1
exit 0
