#!/usr/bin/env bash
# Runs the CPU test suite against another torch: a virtualenv with that torch, a miss_ext wheel
# (CPU kernels and the CUDA emulator) built from a clean copy of this checkout, or one given,
# installed into it like a user's pip install, and pytest started outside the checkout so that
# the installed package is the one tested.
#
# The library uses the LibTorch stable ABI only, so one wheel built against the oldest torch it
# supports (2.11) serves every newer one. CI builds it once, on torch 2.11.0 (the GPU
# machine's version), and installs that same file for torch 2.13.0+cpu and, minimal, 2.14.1:
#
#   MISS_WHEEL_OUT=dist scripts/test_other_torch.sh 2.11.0 [pytest args...]
#   MISS_PREBUILT_WHEEL=dist/miss_ext-0.1.0-cp310-abi3-linux_x86_64.whl scripts/test_other_torch.sh 2.13.0+cpu
#   MISS_MINIMAL=1 MISS_PREBUILT_WHEEL=... scripts/test_other_torch.sh 2.14.1
#
# MISS_MINIMAL=1: a user's install without extras. The virtualenv gets torch, pytest and the
# build tools only; miss_ext is built as a wheel and installed with its declared dependencies
# (so pip must find numpy and safetensors in its metadata); an adapter is saved and loaded;
# then the suite runs, where everything that needs peft, transformers or the demo's packages
# must skip, not fail.
#
# Environment:
#   MISS_OTHER_VENV   the virtualenv (default: <repo>/.venv-torch<version>, with -minimal for
#                     MISS_MINIMAL=1); reused when present
#   MISS_MINIMAL      1: the minimal install above (default 0)
#   MISS_PREBUILT_WHEEL  a miss_ext wheel to install instead of building one
#   MISS_WHEEL_OUT    a directory the built wheel is copied to (to install it elsewhere)
#   PYTHON            interpreter for a new virtualenv (default: python3)
#   MAX_JOBS          parallel compile jobs (default 2)
set -euo pipefail

if [ $# -lt 1 ]; then
  echo "usage: $0 TORCH_VERSION [pytest args...]" >&2
  exit 2
fi
torch_version="$1"
shift
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
minimal="${MISS_MINIMAL:-0}"
venv="${MISS_OTHER_VENV:-$repo/.venv-torch$torch_version$([ "$minimal" = 1 ] && echo -minimal)}"
start=$SECONDS
say() { echo "[other-torch $torch_version +$((SECONDS - start))s] $*"; }

quiet_pip() {
  python -m pip --disable-pip-version-check "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }
}

if [ ! -x "$venv/bin/python" ]; then
  say "creating virtualenv $venv"
  "${PYTHON:-python3}" -m venv "$venv"
fi
# shellcheck disable=SC1091
source "$venv/bin/activate"
# This machine's pip configuration caps torch at the versions on its disk; the cap is lifted
# for this one install, never in the configuration itself. An empty PIP_CONSTRAINT does not
# override the configuration's constraint file (pip 24); an empty constraints file does.
if [ "$minimal" = 1 ]; then
  say "installing torch==$torch_version, pytest and the build tools (minimal: no extras)"
  PIP_CONSTRAINT=/dev/null quiet_pip install -q "torch==$torch_version" ninja "setuptools>=77" wheel pytest
else
  say "installing torch==$torch_version and the test dependencies"
  PIP_CONSTRAINT=/dev/null quiet_pip install -q "torch==$torch_version" ninja packaging "setuptools>=77" wheel \
    pytest numpy peft safetensors transformers
fi
python -c "import torch, sys; v = torch.__version__; sys.exit(v != sys.argv[1] and v.split('+')[0] != sys.argv[1] and f'torch {v} is installed, not {sys.argv[1]}')" "$torch_version"

# A clean copy (tracked and untracked-but-not-ignored files): no build/ or _C*.so from a build
# against another torch can leak into this one.
work="$(mktemp -d "${TMPDIR:-/tmp}/miss-other-torch.XXXXXX")"
trap 'rm -rf "$work"' EXIT
(cd "$repo" && git ls-files -z -co --exclude-standard | xargs -0 cp --parents -t "$work")
mkdir "$work/run"
if [ -n "${MISS_PREBUILT_WHEEL:-}" ]; then
  wheel_file="$(cd "$(dirname "$MISS_PREBUILT_WHEEL")" && pwd)/$(basename "$MISS_PREBUILT_WHEEL")"
  say "not building: installing the prebuilt $(basename "$wheel_file")"
else
  say "building a miss_ext wheel (CPU kernels and the CUDA emulator) against torch $(python -c 'import torch; print(torch.__version__)')"
  FORCE_CUDA=0 MISS_WITH_EMULATOR=1 MAX_JOBS="${MAX_JOBS:-2}" \
    quiet_pip wheel -q --no-build-isolation --no-deps "$work" -w "$work/dist"
  wheel_file="$(ls "$work"/dist/miss_ext-*.whl)"
  say "built $(basename "$wheel_file"): $(du -k "$wheel_file" | cut -f1) KiB"
  if [ -n "${MISS_WHEEL_OUT:-}" ]; then
    mkdir -p "$MISS_WHEEL_OUT"
    cp "$wheel_file" "$MISS_WHEEL_OUT/"
    say "copied to $MISS_WHEEL_OUT/"
  fi
fi
# A reused virtualenv may hold an earlier miss_ext of the same version, which pip would keep.
quiet_pip uninstall -q -y miss_ext
if [ "$minimal" = 1 ]; then
  say "installing $(basename "$wheel_file") with its dependencies, no extras"
  PIP_CONSTRAINT=/dev/null quiet_pip install -q "$wheel_file"
else
  quiet_pip install -q --no-deps "$wheel_file"
fi
cd "$work/run"  # neither the checkout nor the copy: tests import the installed miss_ext
python -c "import miss_ext, os; print('[other-torch] testing', os.path.dirname(miss_ext.__file__))"
if [ "$minimal" = 1 ]; then
  python -m pip list --disable-pip-version-check 2>/dev/null | grep -iE "^(torch|numpy|safetensors|peft|transformers) " || true
  # What a user without extras does: an adapter saved and loaded back, with the same outputs.
  python - <<'EOF'
import torch
from torch import nn
from miss_ext import MissConfig, MissModel, get_miss_model

def base():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))

model = get_miss_model(base(), MissConfig(r=4, target_modules=["0", "2"]))
with torch.no_grad():
    for _, layer in model.miss_layers():
        layer.miss_block["default"].normal_()
model.save_pretrained("adapter")
x = torch.randn(5, 16)
loaded = MissModel.from_pretrained(base(), "adapter")
assert torch.equal(loaded(x), model(x)), "the loaded adapter computes something else"
print("[other-torch] minimal install: adapter saved and loaded, same outputs")
EOF
fi
say "running the test suite"
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
python -m pytest "$work/tests" -q -p no:cacheprovider "$@"
say "done"
