#!/usr/bin/env bash
# The declared minimums, run: a throw-away venv with transformers at pyproject.toml's minimum runs a tiny
# harvest → train → eval through the `sae` command. torch is installed at $TORCH (default: the version the README's
# set-up installs; the oldest CPU build a package registry serves here), so set TORCH=2.4.0 where older wheels can
# be installed to check the torch minimum too. Prints the versions it ran and "minimums ok"; about 2 minutes
# after the install (6 minutes on a 2-core machine).
# Usage: bash scripts/check_minimums.sh [venv folder, default a temporary one]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${1:-$(mktemp -d)/venv}"
work="$(mktemp -d)"
transformers_min=$(sed -n 's/^ *"transformers>=\([0-9.]*\)".*/\1/p' "$root/pyproject.toml")
[ -n "$transformers_min" ] || { echo "pyproject.toml declares no transformers minimum" >&2; exit 1; }
python3 -m venv "$venv"
. "$venv/bin/activate"
pip install -q "torch==${TORCH:-2.13.0}" "transformers==$transformers_min" -e "$root"
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
cd "$work"
export OMP_NUM_THREADS=1 WANDB_MODE=disabled
python -c "from sae import tiny; tiny.llama('model')"
sae harvest model=model "hooks=[blocks.1.hook_resid_post]" max_tokens=20000 context_size=64 out=cache
sae train cache=cache out=runs "saes=[{architecture: topk, k: 8, expansion_factor: 4, hook: blocks.1.hook_resid_post}]"
sae eval "saes=[runs]" cache=cache out=eval lm_loss_contexts=4
test -s eval/eval.json
echo "minimums ok"
