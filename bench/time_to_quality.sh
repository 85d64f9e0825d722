#!/bin/bash
# Time to quality, ESM-2 35M on Swiss-Prot: our trainer and the transformers baseline loop (bench/hf_baseline.py),
# each on its own GPU of a 2-GPU machine, for the same training time, same data, same LR schedule and
# ~23k tokens per step. Both write validation loss against training seconds; bench/plot_ttq.py draws them.
#   source .device/setup.sh && bash bench/time_to_quality.sh start   # returns at once; the runs go on (setsid)
#   bash bench/time_to_quality.sh wait                                # blocks until both are done, copies results to $OUT
# shellcheck disable=SC2086
set -u -o pipefail
OUT=${OUT:-/tmp/out}; TTQ=/tmp/ttq; MIN=${MINUTES:-10}; DATA=.device/data
mkdir -p "$OUT" "$TTQ"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ "${1:-}" = start ]; then
  CUDA_VISIBLE_DEVICES=0 setsid nohup python3 bench/hf_baseline.py --size 35M --train $DATA/swissprot14_train_100k.fasta.xz \
    --val $DATA/swissprot14_val.fasta.gz --minutes "$MIN" --batch-seqs 64 --lr 4e-4 --warmup 500 --schedule-steps 20000 \
    --eval-every 300 --out $TTQ/hf.jsonl > $TTQ/hf.log 2>&1 < /dev/null &
  CUDA_VISIBLE_DEVICES=1 setsid nohup python3 train_ddp.py --config-name L1_8M model.size=35M model.backend=torch \
    grad_acc_steps=1 dataset.micro_batch_size=16 dataset.token_micro_batch_size=23296 optimizer.lr=4e-4 \
    lr_scheduler.warmup_steps=500 num_train_steps=20000 max_train_minutes="$MIN" validation.every_n_steps=1500 \
    log_every_n_steps=50 checkpoint.save_every_n_steps=0 checkpoint.save_final_checkpoint=false dataset.num_workers=2 \
    dataset.train_path=$DATA/swissprot14_train_100k.fasta.xz dataset.val_path=$DATA/swissprot14_val.fasta.gz \
    output_dir=$TTQ/ours > $TTQ/ours.log 2>&1 < /dev/null &
  sleep 5; echo "started: $(pgrep -fc 'hf_baseline.py|train_ddp.py') processes"
else
  while pgrep -f "hf_baseline.py|train_ddp.py" > /dev/null; do sleep 5; done
  cp $TTQ/hf.jsonl "$OUT/ttq_hf.jsonl"; cp $TTQ/ours/metrics.jsonl "$OUT/ttq_ours.jsonl"
  tail -c 3000 $TTQ/hf.log > "$OUT/ttq_hf.log"; tr '\r' '\n' < $TTQ/ours.log | grep -v "it/s\]$" | tail -c 3000 > "$OUT/ttq_ours.log"
  tail -2 "$OUT/ttq_hf.log"; grep -E "validation at|reached" "$OUT/ttq_ours.log" | tail -3
fi
