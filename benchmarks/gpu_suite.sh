#!/usr/bin/env bash
# The GPU suite: one command for the device machine (H100/H200; Python 3.12, torch 2.11 cu130,
# nvcc, ninja, peft; no network). It builds miss_ext from source there, runs the CUDA tests,
# then the layer benchmark at the GPU targets' sizes (DESIGN.md): tokens=8192, in=out=4096,
# r=64, bf16 (model bf16 with fp32 adapter, PEFT's default, and bf16 adapter), one fp32 case,
# and one MLP-shaped case (in=4096, out=11008). Prints the ratio tables and writes JSON,
# markdown and the test log under $OUT (default: benchmarks/results/gpu). Budget: < 8 min.
#
#   device tool:  bash benchmarks/gpu_suite.sh
#   a GPU box:    OUT=benchmarks/results/gpu bash benchmarks/gpu_suite.sh
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-benchmarks/results/gpu}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
status=0
stamp() { echo "[gpu_suite $(date +%H:%M:%S)] $*"; }

stamp "device: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -1)"
stamp "python $(python --version 2>&1), torch $(python -c 'import torch; print(torch.__version__, torch.version.cuda)')"
stamp "building miss_ext from source"
if ! python -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"
  stamp "BUILD FAILED"
  exit 1
fi
python -c "import miss_ext; assert miss_ext.has_cuda_kernels(), 'no CUDA kernels in the build'; print('CUDA kernels: yes')" || exit 1

stamp "CUDA tests"
python -m pytest tests/test_cuda.py tests/test_cuda_integration.py -q -rfE -p no:cacheprovider 2>&1 | tee "$OUT/cuda_tests.log" | tail -25
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

bench() {
  stamp "bench_layer $*"
  python benchmarks/bench_layer.py --device cuda --repeats 20 --warmup 3 --out-dir "$OUT" "$@" || status=1
}
bench --tokens 8192 --in 4096 --out 4096 --r 64 --dtypes bf16-fp32,bf16 --name gpu_layer_bf16_8192x4096x4096
bench --tokens 8192 --in 4096 --out 4096 --r 64 --dtypes fp32 --dropouts 0 --name gpu_layer_fp32_8192x4096x4096
bench --tokens 8192 --in 4096 --out 11008 --r 64 --dtypes bf16-fp32 --dropouts 0 --no-merge \
  --name gpu_layer_mlp_8192x4096x11008
stamp "done (status $status)"
exit $status
