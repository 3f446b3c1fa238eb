#!/usr/bin/env bash
# The GPU suite: one command for the device machine (H200; Python 3.12 as python3, torch 2.11
# cu130, nvcc, ninja, pytest, peft; no network). It builds miss_ext from source, runs the CUDA
# tests, then the layer benchmark at the GPU targets' sizes (DESIGN.md): tokens=8192,
# in=out=4096, r=64, bf16 (bf16 model with fp32 adapter, PEFT's default, and bf16 adapter), one
# fp32 case and one MLP-shaped case (in=4096, out=11008). Candidates: frozen Linear, PEFT MiSS,
# ours (kernels), PEFT LoRA; not ours on the reference backend (--no-reference): it builds every
# dropout mask with NumPy on the host, ~1.7 s a call at these sizes, ~6 min in all.
#
#   device tool:    bash benchmarks/gpu_suite.sh                  ($OUT is the tool's)
#   a GPU box:      OUT=some/dir bash benchmarks/gpu_suite.sh     (default benchmarks/results/gpu)
#   dry run, CPU:   MISS_GPU_SUITE_DRY_RUN=1 bash benchmarks/gpu_suite.sh   (tests/test_gpu_suite_dry_run.py)
#
# Files under $OUT: 7 (the tool brings back 8 at most), named after the device, DEV (from
# torch.cuda.get_device_name, "NVIDIA H200" -> h200; "cpu" in the dry run): DEV_suite.log (build,
# tests, benchmark output) and DEV_layer_{bf16,fp32,mlp}_TxIxO.{json,md}, rewritten after every
# case (--save-each-case), so a phase cut short, or a lease, leaves the cases that finished.
#
# Time budget on an H200: an ESTIMATE; nothing here has run on a GPU yet.
#   phase           estimate  timeout  how estimated
#   probe, smi        ~10 s    90+15   torch import 1.7 s here, plus the CUDA context's start
#   build             ~90 s     150    CUDA build (TORCH_CUDA_ARCH_LIST=9.0) measured here, 2 cores, 1 job, under
#                                      CI load: 8 compile units, 159 s in all, the longest 37 s (.cu: 23-25 s).
#                                      Known: ~5 min with 2 jobs, i.e. ~600 core-s. 16 cores run all 8 units at
#                                      once: ~600/8 = 75 s (the measured longest unit says ~40 s), + ~15 s pip
#   CUDA tests        ~60 s     100    test_cuda_integration on the CPU takes 14 s here; test_cuda.py's ~106 small
#                                      cases with opcheck (test_opcheck: 8 s here); + ~30 s of cold Triton compiles
#   bench bf16        ~35 s      60    10 cases + 6 merges, ~0.6 s host setup each at full size (measured here),
#                                      + ~8 s imports and CUDA start; GPU work is small: a bf16 8192x4096x4096 GEMM
#                                      is ~0.4 ms at ~700 TFLOP/s, 2x(3+20) timed calls x <=5 candidates a case
#   bench fp32        ~25 s      45    3 cases + 3 merges; an fp32 GEMM ~5.5 ms at ~50 TFLOP/s: ~2 s a case
#   bench mlp         ~20 s      35    3 cases at out=11008, no merges
#   total             ~4 min    400    SUITE_LIMIT: no phase runs past it, so under 7 min even if all time out
set -uo pipefail  # no -e: a failed or timed-out phase is reported, and the next runs where that makes sense
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${OUT:-$REPO/benchmarks/results/gpu}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) && cd "$REPO" || exit 1
DRY=${MISS_GPU_SUITE_DRY_RUN:-0}
SUITE_LIMIT=400  # seconds from the start; each phase's timeout is cut to what is left of it
PY=${PYTHON:-$(command -v python3 || command -v python)}  # the image has python3, maybe no python
[ -n "$PY" ] || { echo "gpu_suite: no python3 or python on PATH; set PYTHON"; exit 1; }
export PYTHONUNBUFFERED=1 FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}  # ninja's parallel compile jobs: one per core
if [ "$DRY" = 1 ]; then DEVICE=cpu; else DEVICE=cuda; fi
LOG=/dev/null status=0
STARTED=$(mktemp) && touch -d '1 second ago' "$STARTED"  # files newer than this: this run wrote them
stamp() { echo "[gpu_suite $(date +%H:%M:%S) +${SECONDS}s] $*" | tee -a "$LOG"; }

# shellcheck disable=SC2317  # (run by the trap below)
finish() {  # on every exit: list what this run wrote; more than the tool's 8 files is an error
  local rc=$? files f
  mapfile -t files < <(find "$OUT" -type f -newer "$STARTED" | sort)
  stamp "wrote ${#files[@]} file(s) under $OUT (the device tool brings back 8 at most):"
  for f in "${files[@]}"; do echo "  ${f#"$OUT"/} ($(stat -c %s "$f") bytes)"; done
  ((${#files[@]} <= 8)) || { echo "gpu_suite: ERROR: more than 8 files under $OUT"; rc=1; }
  rm -f "$STARTED"
  echo "[gpu_suite] done in ${SECONDS}s, exit $rc"
  exit "$rc"
}
trap finish EXIT

# phase NAME CAP LINES CMD...: CMD under `timeout` (CAP seconds, cut to what is left of
# SUITE_LIMIT), its output appended to the log and its last LINES lines shown (+1: all). A
# failure or timeout is reported and sets the exit status; returns CMD's status (124: timeout).
phase() {
  local name=$1 secs=$2 lines=$3 rc
  shift 3
  ((secs > SUITE_LIMIT - SECONDS)) && secs=$((SUITE_LIMIT - SECONDS))
  if ((secs < 5)); then stamp "SKIPPED $name: the suite's ${SUITE_LIMIT} s are spent"; status=1; return 124; fi
  stamp "$name (timeout ${secs} s)"
  timeout -k 10 "$secs" "$@" 2>&1 | tee -a "$LOG" | tail -n "$lines"
  rc=${PIPESTATUS[0]}
  case $rc in
    0) ;;
    124 | 137) echo | tee -a "$LOG"; stamp "TIMED OUT: $name after ${secs} s (what it wrote is kept)"; status=1 ;;
    *) stamp "FAILED: $name (exit $rc)"; status=1 ;;
  esac
  return "$rc"
}

# The device name every file carries ("NVIDIA H200" -> h200), and the versions, in one probe.
probe='import re, sys, torch
if sys.argv[1] == "cuda" and not torch.cuda.is_available(): sys.exit("gpu_suite: torch sees no CUDA GPU")
name = torch.cuda.get_device_name(0) if sys.argv[1] == "cuda" else "cpu"
dev = re.sub(r"[^a-z0-9]+", "_", name.lower().replace("nvidia", "")).strip("_")
print(dev, f"({name}): python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}")'
info=$(timeout 90 "$PY" -c "$probe" "$DEVICE") || { stamp "FAILED: the device probe ($PY)"; exit 1; }
DEV=${info%% *}
LOG=$OUT/${DEV}_suite.log
: >"$LOG"
stamp "device $info; $PY; MAX_JOBS=$MAX_JOBS; dry run: $DRY"
smi=$(timeout 15 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1)
stamp "nvidia-smi: ${smi:-none}"

# CUDA_HOME, found explicitly: torch's own guess strips two levels off `command -v nvcc`, so a
# wrapper at /usr/local/bin/nvcc gives /usr/local, which has no cuda_runtime.h: the link fails.
# A CUDA_HOME set by the caller wins if it is a toolkit; then /usr/local/cuda; then real nvcc's.
nvcc_home=
command -v nvcc >/dev/null && nvcc_home=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
toolkit=
for home in "${CUDA_HOME:-}" /usr/local/cuda "$nvcc_home"; do
  if [ -n "$home" ] && [ -x "$home/bin/nvcc" ] && [ -e "$home/include/cuda_runtime.h" ]; then toolkit=$home; break; fi
done
if [ -n "$toolkit" ]; then
  export CUDA_HOME=$toolkit
  stamp "CUDA toolkit: $CUDA_HOME, nvcc $("$CUDA_HOME/bin/nvcc" --version | grep -o 'release [0-9.]*')"
elif [ "$DRY" = 1 ]; then
  stamp "CUDA toolkit: none found (the dry run does not build)"
else
  stamp "FAILED: no CUDA toolkit: neither \$CUDA_HOME, /usr/local/cuda nor the real nvcc's directory has"
  stamp "bin/nvcc and include/cuda_runtime.h; set CUDA_HOME"
  exit 1
fi

# Build from source (an editable install: the tests and benchmarks import it). The dry run
# builds nothing: it uses the miss_ext that already imports here (CPU kernels only).
if [ "$DRY" = 1 ]; then
  stamp "dry run: from-source build skipped; using the miss_ext that already imports"
else
  phase build 150 15 "$PY" -m pip install --no-build-isolation --no-deps --no-index --disable-pip-version-check -e . || exit 1
fi
check='import sys, miss_ext
kernels = miss_ext.has_cuda_kernels()
print("miss_ext", miss_ext.__file__, "CUDA kernels:", kernels)
sys.exit(0 if kernels or sys.argv[1] == "cpu" else "gpu_suite: this build has no CUDA kernels")'
phase "import check" 60 3 "$PY" -c "$check" "$DEVICE" || exit 1  # nothing after it can run without

# MISS_INTEGRATION_DEVICE is set, not inherited: cuda here; cpu in the dry run, where
# test_cuda.py skips and test_cuda_integration.py runs its logic on the CPU.
phase "CUDA tests" 100 25 env MISS_INTEGRATION_DEVICE="$DEVICE" \
  "$PY" -m pytest tests/test_cuda.py tests/test_cuda_integration.py -q -rfE -p no:cacheprovider

if [ "$DRY" = 1 ]; then  # tiny sizes, one round: checks the phases, the names and the file count
  T=64 I=64 O=64 MLP=176 R=8 MINI=4 RUNS=(--repeats 1 --warmup 0)
else
  T=8192 I=4096 O=4096 MLP=11008 R=64 MINI=16 RUNS=(--repeats 20 --warmup 3)
fi
bench() {  # bench NAME CAP ARGS...: one bench_layer run, writing DEV_layer_NAME.json and .md
  local name=${DEV}_layer_$1 cap=$2
  shift 2
  phase "bench $name" "$cap" +1 "$PY" benchmarks/bench_layer.py --device "$DEVICE" --r "$R" --mini-r "$MINI" \
    "${RUNS[@]}" --no-reference --save-each-case --out-dir "$OUT" --name "$name" "$@"
}
bench "bf16_${T}x${I}x${O}" 60 --tokens "$T" --in "$I" --out "$O" --dtypes bf16-fp32,bf16
bench "fp32_${T}x${I}x${O}" 45 --tokens "$T" --in "$I" --out "$O" --dtypes fp32 --dropouts 0
bench "mlp_${T}x${I}x${MLP}" 35 --tokens "$T" --in "$I" --out "$MLP" --dtypes bf16-fp32 --dropouts 0 --no-merge
exit "$status"
