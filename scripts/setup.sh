#!/usr/bin/env bash
# One-time set-up on a fresh machine: PyTorch (the CPU build where no GPU is present), then this project and its
# test dependencies. Idempotent: re-running it installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! $PY -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    $PY -m pip install --quiet torch
  else
    # A plain `pip install torch` pulls the CUDA build (several GB); the CPU build is what a CPU machine needs.
    $PY -m pip install --quiet torch==2.13.0
  fi
fi
$PY -m pip install --quiet -e ".[dev]"
$PY -c "import torch, transformers, hydra, torchdata, datasets; print('ready: torch', torch.__version__, '| transformers', transformers.__version__)"
