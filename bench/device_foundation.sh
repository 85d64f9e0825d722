#!/bin/bash
# The foundation issues' GPU checks in one device call (see docs/numerics.md and docs/benchmarks.md):
#   GPU tests, L0_sanity on one GPU, 200 steps of L1_8M on Swiss-Prot, GELU numerics of the trained 8M model.
# Run from the checkout root on the device machine, after `bash ../shared/device/prepare.sh --data` here:
#   source .device/setup.sh && bash bench/device_foundation.sh
set -u -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformer_engine as te, transformers; print('torch', torch.__version__, 'te', te.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
timeout 200 python3 -m pytest -m gpu -s -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/gpu_tests.log" | grep -v -E "^\s*$|Warning|warn"
STEPS=${L1_STEPS:-200}
# torch backend + DDP: measured fastest for 8M on an H200 (docs/benchmarks.md); TE is 2.6x slower at this size.
python3 "train_${STRATEGY:-ddp}.py" --config-name L1_8M num_train_steps="$STEPS" model.backend="${BACKEND:-torch}" \
  dataset.train_path=.device/data/swissprot14_train_100k.fasta.xz dataset.val_path=.device/data/swissprot14_val.fasta.gz \
  output_dir=/tmp/l1_8m validation.every_n_steps=100 log_every_n_steps=10 checkpoint.save_every_n_steps=0 \
  dataset.num_workers=2 2>&1 | tr '\r' '\n' | grep -v -E "it/s\]$|Warning" | tee "$OUT/l1_8m.log" | tail -8
cp /tmp/l1_8m/metrics.jsonl "$OUT/l1_8m_metrics.jsonl" 2>/dev/null
python3 bench/gelu_numerics.py --model /tmp/l1_8m/final_model --val .device/data/swissprot14_val.fasta.gz 2>&1 | tee "$OUT/gelu.txt" | tail -8
