#!/usr/bin/env bash
# One device call on 4 H200s (nvidia-h200-x4): where the 650M/3B step time goes on both sides, the measurements
# issue 19 owes, and 15B on four GPUs (issue 14).
#   Phase A, one job per GPU at once: GPU 0 profiles the reference (bench/profile_reference.py), GPU 1 profiles our
#   trainer (profiler.enabled=true) and then times it unprofiled, GPU 2 the cost of quantization statistics at 650M
#   (bench/quant_stats_cost.py), GPU 3 train_mfsdp.py at the matched rows (bench/vs_reference.py --trainer).
#   Phase B, all four GPUs: 15B BF16 and FP8 block scaling under FSDP2 (bench/vs_reference.py --nproc 4).
#   run: carry [".device"], command: source .device/setup.sh && bash bench/device_profiles_issue19.sh
# shellcheck disable=SC2086  # word splitting of the option strings ($PYTEST, $VS, $PROF, rows) is intended
set -u -o pipefail
OUT=${OUT:-/tmp/out}; W=/tmp/w; mkdir -p "$OUT" "$W"; T0=$(date +%s)
export PYTHONUNBUFFERED=1
DATA=.device/data/swissprot14_train_100k.fasta.xz
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader | tee "$W/gpus.txt"
pack() { tar czf "$OUT/logs.tgz" --exclude=parquet --exclude=site -C "$W" . 2>/dev/null; }
VS="python bench/vs_reference.py --ours-only --timeout 200"
PROF="profiler.enabled=true profiler.start_step=10 profiler.num_steps=3"

# ---------------------------------------------------------------- phase A
( timeout 330 python bench/profile_reference.py --rows 650M 3B --gpu 0 --timeout 160 --out $W/reference_profile \
    > $W/reference_profile.txt 2>&1 ) &
( for row in 650M 3B; do
    timeout 150 $VS --gpus 1 --rows $row --set $PROF profiler.dir=$W/our_profile/$row --out $W/our_profile_runs
  done > $W/our_profile.txt 2>&1
  timeout 200 $VS --gpus 1 --rows 650M 3B --out $W/fsdp2_1gpu > $W/fsdp2_1gpu.txt 2>&1 ) &
( CUDA_VISIBLE_DEVICES=2 timeout 330 python bench/quant_stats_cost.py --config L1_650M --steps 30 --warmup 10 --freqs 10 1 \
    --set dataset.train_path=$DATA dataset.val_path=null grad_acc_steps=1 dataset.micro_batch_size=48 \
    dataset.token_micro_batch_size=49152 > $W/quant_stats_cost_650M.txt 2>&1 ) &
( timeout 330 $VS --gpus 3 --rows 650M 3B --trainer train_mfsdp.py --out $W/mfsdp_1gpu > $W/mfsdp_1gpu.txt 2>&1 ) &
wait
echo "phase A done at $(( $(date +%s) - T0 )) s"; pack

# ---------------------------------------------------------------- phase B
LEFT=$(( 560 - ($(date +%s) - T0) ))
[ $LEFT -gt 90 ] && timeout $LEFT $VS --nproc 4 --gpus 0 1 2 3 --rows 15B 15B_fp8 --timeout 220 --out $W/fsdp2_4gpu_15B \
  > $W/fsdp2_4gpu_15B.txt 2>&1
pack
for f in reference_profile our_profile fsdp2_1gpu quant_stats_cost_650M mfsdp_1gpu fsdp2_4gpu_15B; do
  echo "=================== $f"; grep -v -i "warn" $W/$f.txt 2>/dev/null | tail -60
done > $OUT/summary.txt
for f in $W/our_profile/*/summary_rank0.txt; do echo "=================== ours: $f"; cat "$f"; done >> $OUT/summary.txt
cut -c1-200 $OUT/summary.txt | grep -v "^  .*x[0-9]" | tail -150
echo "total $(( $(date +%s) - T0 )) s"
