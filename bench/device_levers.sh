#!/usr/bin/env bash
# Lever runs of our trainer through bench/vs_reference.py --ours-only, one queue per GPU, at once (GPUS, default
# "0 1": the GPU of each queue file in order).
# Each queue is a file of lines "NAME ROW [vs_reference.py options...]" (e.g. "compile 150M --set use_torch_compile=true",
# "parent 650M --trainer .baseline/train_fsdp2.py" for an A/B against another tree).
#   source .device/setup.sh && bash bench/device_levers.sh QUEUE0 QUEUE1
# With TORCH_LOGS=recompiles set by the caller, each lever's log counts the recompilations. Results: $OUT/levers.txt, one section per GPU;
# each run's files under LEVERS_WORK (default /tmp/levers), named g<GPU>_<NAME>.
set -u -o pipefail
W=${LEVERS_WORK:-/tmp/levers}; mkdir -p $W; OUT=${OUT:-/tmp/out}; mkdir -p $OUT; T0=$(date +%s); DEADLINE=${DEADLINE_S:-560}
queue() {  # queue GPU FILE
  local gpu=$1 name row
  while read -r name row rest; do
    [ -n "$name" ] || continue
    local left=$(( DEADLINE - ($(date +%s) - T0) ))
    [ "$left" -gt 60 ] || { echo "$name $row: skipped (time)" >> $W/levers_$gpu.txt; continue; }
    local run=g${gpu}_$name  # queues on several GPUs may use the same names: each run's files are its GPU's own
    # shellcheck disable=SC2086
    timeout $left python bench/vs_reference.py --gpus $gpu --ours-only --rows $row --timeout 240 --out $W/$run $rest \
      > $W/$run.txt 2>&1
    echo "$name $row ($rest): $(grep -h "^ours" $W/$run.txt) recompiles=$(grep -c "Recompiling" $W/$run/ours_$row.log 2>/dev/null)" \
      >> $W/levers_$gpu.txt
  done < "$2"
}
read -r -a GPU_LIST <<< "${GPUS:-0 1}"
[ $# -le ${#GPU_LIST[@]} ] || { echo "$# queue files for ${#GPU_LIST[@]} GPUs (GPUS=\"${GPU_LIST[*]}\")"; exit 2; }
rm -f $W/levers_*.txt  # a warm machine keeps /tmp: no results of an earlier call
i=0; for file in "$@"; do queue "${GPU_LIST[$i]}" "$file" & i=$((i + 1)); done; wait
for f in $W/levers_*.txt; do echo "== GPU ${f##*_}" | sed 's/\.txt$//'; cat "$f"; done > $OUT/levers.txt
tar czf $OUT/levers_logs.tgz -C $W . 2>/dev/null
cat $OUT/levers.txt
