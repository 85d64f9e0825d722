#!/usr/bin/env bash
set -u; OUT=${OUT:-/tmp/out}; T0=$(date +%s)
P="python -m pytest -m gpu -q -s -p no:cacheprovider"
timeout 200 $P tests/test_gpu_multi.py -k "mfsdp" > $OUT/multi.txt 2>&1; echo "multi rc=$? $(( $(date +%s) - T0 ))s"
( CUDA_VISIBLE_DEVICES=0 timeout 230 $P tests/test_gpu.py -k "mfsdp" > $OUT/single_mfsdp.txt 2>&1; echo "single mfsdp rc=$? $(( $(date +%s) - T0 ))s" ) &
( CUDA_VISIBLE_DEVICES=1 timeout 120 $P tests/test_gpu.py -k "quant_stats" > $OUT/single_qs.txt 2>&1; echo "single qs rc=$? $(( $(date +%s) - T0 ))s"
  CUDA_VISIBLE_DEVICES=1 timeout 100 python bench/quant_stats_cost.py > $OUT/qs_cost.txt 2>&1; echo "cost rc=$? $(( $(date +%s) - T0 ))s" ) &
wait
for f in multi single_mfsdp single_qs qs_cost; do echo "=== $f"; grep -v -i "warn" $OUT/$f.txt | grep -E "passed|failed|Error|error|assert|FAILED|tokens|slowdown|^E " | head -25; done
