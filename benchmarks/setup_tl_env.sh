#!/usr/bin/env bash
# Create the virtual environment that benchmarks/bench_lens.py needs for its
# TransformerLens comparison: reslens (editable, from this checkout) + TransformerLens 4.3.0.
# TransformerLens is a benchmark-only tool, never a dependency of reslens.
#
#     bash benchmarks/setup_tl_env.sh            # creates /tmp/reslens-tl-venv
#     TL_VENV=path bash benchmarks/setup_tl_env.sh
#     /tmp/reslens-tl-venv/bin/python benchmarks/bench_lens.py
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${TL_VENV:-/tmp/reslens-tl-venv}"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3

"$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install --upgrade pip
# torch first and pinned: the CPU build (2.13.0+cpu) is the one reslens is measured with;
# an unpinned torch would let TransformerLens's resolver pull a multi-GB CUDA build.
$PIP install "torch==2.13.0"
$PIP install "transformer-lens==4.3.0" "torch==2.13.0"
# reslens itself without resolving its deps again, then its runtime deps.
$PIP install --no-deps -e "$REPO"
$PIP install transformers scikit-learn einops safetensors tqdm numpy "torch==2.13.0"
"$VENV/bin/python" -c "import torch, transformers, transformer_lens, reslens; print('torch', torch.__version__, '| transformers', transformers.__version__, '| transformer_lens ok | reslens ok')"
