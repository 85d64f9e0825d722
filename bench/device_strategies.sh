#!/usr/bin/env bash
# One device call on 4 H200s (nvidia-h200-x4): the tree against the reference at 650M and 3B (GPUs 0 and 1) beside
# the context-parallel GPU tests (GPUs 2 and 3), then the single-GPU checks of this change on GPU 0, then FSDP2
# against Megatron-FSDP at 650M and 3B on all four GPUs (issue 19; with the one-GPU rows of the table: FSDP2's
# scaling, issue 14), then 15B if time is left. Stops starting work at DEADLINE_S (default 520 s). SIDE_ROWS (default
# "650M 3B") and FOUR_GPU_ROWS (default "650M 3B 15B") choose the rows: on 80 GB H100s "650M" and "650M 3B".
# ONLY_FOUR=1 runs the four-GPU part alone.
#   run: carry [".device"], command: source .device/setup.sh && bash bench/device_strategies.sh
# shellcheck disable=SC2086  # word splitting of the option strings ($PYTEST, $VS, $PROF, rows) is intended
set -u -o pipefail
OUT=${OUT:-/tmp/out}; W=/tmp/w; mkdir -p "$OUT" "$W"; T0=$(date +%s); DEADLINE=${DEADLINE_S:-520}
export PYTHONUNBUFFERED=1
left() { echo $(( DEADLINE - ($(date +%s) - T0) )); }
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader | tee "$W/gpus.txt"
PYTEST="python -m pytest -m gpu -s -q -p no:cacheprovider"
one_and_two_gpus() {
( python bench/vs_reference.py --gpus 0 1 --rows ${SIDE_ROWS:-650M 3B} --timeout 150 --out $W/side > $W/side.txt 2>&1
  budget=$(( $(left) - 260 ))  # the four-GPU part keeps 260 s
  if [ "$budget" -gt 60 ]; then
    CUDA_VISIBLE_DEVICES=0 timeout $budget $PYTEST tests/test_gpu.py -k "bf16_te_layers or te_backend or fp8_checkpoint or triton_rope" \
      > $W/gpu_single.txt 2>&1
  else
    echo "single-GPU tests skipped: $budget s left for them" > $W/gpu_single.txt
  fi ) &
( CUDA_VISIBLE_DEVICES=2,3 timeout 230 $PYTEST tests/test_gpu_multi.py -k "cp2_matches_cp1 or cp_resume" > $W/gpu_cp.txt 2>&1 ) &
wait
echo "phase 1 done at $(( $(date +%s) - T0 )) s"
}
four_gpus() {
VS="python bench/vs_reference.py --ours-only --nproc 4 --gpus 0 1 2 3 --timeout 110"
for row in ${FOUR_GPU_ROWS:-650M 3B 15B}; do for spec in "fsdp2 $row train_fsdp2.py" "mfsdp $row train_mfsdp.py"; do
  set -- $spec
  [ "$row" = 15B ] && [ "$1" = mfsdp ] && continue
  [ "$(left)" -gt 90 ] || { echo "$1 $2 x4: skipped (time)"; continue; }
  timeout $(left) $VS --rows $2 --trainer $3 --out $W/${1}_4gpu_$2 > $W/${1}_4gpu_$2.txt 2>&1
  echo "$1 $2 x4: $(grep -h '^ours' $W/${1}_4gpu_$2.txt)"
done; done | tee $W/strategies_4gpu.txt | tee -a $OUT/strategies_4gpu.txt
}
[ -n "${ONLY_FOUR:-}" ] || one_and_two_gpus
four_gpus
tar czf $OUT/logs.tgz -C $W . 2>/dev/null
{ grep -h -E "^ours|^theirs|^\| " $W/side.txt; echo "== single"; grep -v -i warn $W/gpu_single.txt | grep -E "^  |passed|failed|Error|skipped" ;
  echo "== cp"; grep -v -i warn $W/gpu_cp.txt | grep -E "^  |passed|failed|Error"; echo "== 4 GPUs"; cat $W/strategies_4gpu.txt; } \
  | cut -c1-250 | tee $OUT/summary.txt
echo "total $(( $(date +%s) - T0 )) s"
