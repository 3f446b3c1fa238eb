#!/usr/bin/env bash
# Creates .venv (if missing), installs torch and the test/demo dependencies, and builds
# miss_ext against that torch. Sourced by scripts/test.sh and scripts/demo.sh; safe to re-run.
#
# Environment:
#   MISS_VENV          where the virtualenv lives (default: <repo>/.venv)
#   MISS_TORCH         torch requirement (default: torch==2.14.1, the version CI tests)
#   FORCE_CUDA         1: build the CUDA kernels (needs CUDA_HOME), 0: CPU only; default:
#                      CUDA when torch has CUDA and a toolkit is found (/usr/local/cuda here)
#   TORCH_CUDA_ARCH_LIST  GPU architectures to compile for (default "8.0;9.0" when unset)
#   MAX_JOBS           parallel compile jobs (default 2)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${MISS_VENV:-$repo/.venv}"
python="${PYTHON:-python3}"

# pip, without the "Location ... is ignored" lines this machine's pip configuration prints;
# pip's own exit status is kept (pipefail), so a failed install or build stops the script.
quiet_pip() {
  pip --disable-pip-version-check "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }
}

if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating virtualenv $venv"
  "$python" -m venv "$venv"
fi
# shellcheck disable=SC1091
source "$venv/bin/activate"

echo "[setup] installing ${MISS_TORCH:-torch==2.14.1} and the test dependencies"
quiet_pip install -q "${MISS_TORCH:-torch==2.14.1}" ninja packaging "setuptools>=64" wheel \
  pytest numpy expecttest hypothesis peft safetensors transformers
python -c "import torch" # fail here, clearly, if torch did not install

if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
export MAX_JOBS="${MAX_JOBS:-2}"

echo "[setup] building miss_ext (FORCE_CUDA=${FORCE_CUDA:-auto}, CUDA_HOME=${CUDA_HOME:-none})"
start=$(date +%s)
quiet_pip install -q --no-build-isolation --no-deps -e "$repo"
python -c "import miss_ext; print('[setup] miss_ext built in', $(( $(date +%s) - start )), 's; CUDA kernels:', miss_ext.has_cuda_kernels())"
