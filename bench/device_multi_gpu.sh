#!/bin/bash
# Multi-GPU checks in one device call on 4 H200s (nvidia-h200-x4): context parallelism (issue 6), FP8 recipe state
# across ranks and single-GPU TE checks (issue 5), FSDP2 scaling of 650M (issue 7). Phase A runs independent
# jobs side by side on separate GPUs; phase B uses all four GPUs, one job at a time, for everything that is timed.
#   source .device/setup.sh && bash bench/device_multi_gpu.sh
# shellcheck disable=SC2086  # word splitting of $PYTEST / $COMMON / $LONG / $spec is intended
set -u -o pipefail
OUT=${OUT:-/tmp/out}; LOGS=/tmp/logs; mkdir -p "$OUT" "$LOGS"
pack() { tar czf "$OUT/logs.tgz" -C "$LOGS" . ; }  # $OUT returns at most 8 files: logs travel as one archive
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$LOGS/gpu.txt"
python3 -c "import transformer_engine as te, torch, transformers; print('torch', torch.__version__, 'te', te.__version__, 'transformers', transformers.__version__, 'gpus', torch.cuda.device_count())" | tee -a "$LOGS/gpu.txt"
PYTEST="python3 -m pytest -m gpu -s -q -p no:cacheprovider"
DATA=.device/data
last() {  # the last metrics record of a run: tokens/s/GPU, MFU, peak memory
  python3 -c "import json,sys; r=[json.loads(x) for x in open(sys.argv[1]) if '\"loss\"' in x][-1]; print(f\"{sys.argv[2]}: step {r['step']}, loss {r['loss']:.4f}, {r['tokens_per_second_per_gpu']:,.0f} tokens/s/GPU, {r['tflops_per_gpu']:.1f} TFLOP/s/GPU, MFU {r['mfu']:.1%}, peak memory {r['max_memory_gb']:.1f} GB\")" "$1/metrics.jsonl" "$2"
}

# ---------------------------------------------------------------- phase A: independent jobs on separate GPUs
(CUDA_VISIBLE_DEVICES=0,1 timeout 300 $PYTEST tests/test_gpu_multi.py > "$LOGS/multi_2gpu.log" 2>&1) &
(CUDA_VISIBLE_DEVICES=2 timeout 300 $PYTEST tests/test_gpu.py -k "not l1_8m" > "$LOGS/single_gpu.log" 2>&1) &
(CUDA_VISIBLE_DEVICES=3 timeout 330 $PYTEST tests/test_gpu.py -k "l1_8m" > "$LOGS/l1_8m_fp8.log" 2>&1) &
python3 bench/long_sequences.py --source $DATA/swissprot14_train_100k.fasta.xz --length 131070 --count 8 --out /tmp/long128k.fasta
wait
grep -h -E "passed|failed|error" "$LOGS"/multi_2gpu.log "$LOGS"/single_gpu.log "$LOGS"/l1_8m_fp8.log | tail -6
grep -h -E "^  (cp=|L0_sanity|CP resume|FP8|quantized|L1_8M|  FP8)" "$LOGS"/*.log; pack

# ---------------------------------------------------------------- phase B: all four GPUs
timeout 150 $PYTEST tests/test_gpu_multi.py -k "4-2 or 4-4" > "$LOGS/multi_4gpu.log" 2>&1; grep -E "^  L0_sanity|passed|failed" "$LOGS/multi_4gpu.log"; pack

COMMON="checkpoint.save_every_n_steps=0 checkpoint.save_final_checkpoint=false checkpoint.save_final_model=false dataset.val_path=null"
# Long sequences, 650M: cp=1 on one GPU at 128k tokens (out of memory), then cp=4 on four GPUs at 128k.
LONG="--config-name L1_650M model.backend=te grad_acc_steps=1 num_train_steps=4 log_every_n_steps=1 lr_scheduler.warmup_steps=2 dataset.micro_batch_size=1 dataset.num_workers=0 $COMMON"
for spec in "1 131072 long128k" "4 131072 long128k"; do
  set -- $spec
  timeout 150 python3 -m torch.distributed.run --standalone --nproc_per_node=$1 train_cp.py $LONG cp_size=$1 dataset.max_seq_length=$2 \
    dataset.train_path=/tmp/$3.fasta output_dir=/tmp/cp$1_$2 > "$LOGS/cp$1_$2.log" 2>&1
  echo "exit $? for cp=$1 at $2 tokens"
  grep -m1 -o "OutOfMemoryError: CUDA out of memory.*allocated by PyTorch" "$LOGS/cp$1_$2.log" | cut -c1-400
  [ -f /tmp/cp$1_$2/metrics.jsonl ] && last /tmp/cp$1_$2 "650M cp=$1, one sequence of $2 tokens per step"
  cp /tmp/cp$1_$2/metrics.jsonl "$LOGS/cp$1_$2_metrics.jsonl" 2>/dev/null; pack
done 2>&1 | tee "$LOGS/long_context.txt"

# FSDP2 scaling, 650M (te, BF16): the same per-GPU work (2 x 32,768-token micro-batches per step) on 1 and 4 GPUs.
for n in 1 4; do
  timeout 120 python3 -m torch.distributed.run --standalone --nproc_per_node=$n train_fsdp2.py --config-name L1_650M model.backend=te grad_acc_steps=2 \
    num_train_steps=12 log_every_n_steps=4 lr_scheduler.warmup_steps=4 dataset.train_path=$DATA/swissprot14_train_100k.fasta.xz \
    dataset.num_workers=2 $COMMON output_dir=/tmp/scale$n > "$LOGS/scale_$n.log" 2>&1
  last /tmp/scale$n "650M FSDP2 x $n"; cp /tmp/scale$n/metrics.jsonl "$LOGS/scale_${n}_metrics.jsonl"; pack
done | tee "$LOGS/scaling.txt"
pack

