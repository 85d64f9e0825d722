#!/usr/bin/env bash
# One device call: the side-by-side table against NVIDIA's recipe (theirs on GPU 0, ours on GPU 1, at once), an A/B
# of this tree against another checkout of ours (BASELINE, default .baseline, made with
# `git archive <commit> recipe hydra_config train_fsdp2.py train_ddp.py | tar -x -C .baseline`) and lever runs of ours.
# With 4 GPUs all three at once (A/B on GPU 2, levers on GPU 3); with 2, the A/B and levers after the table, on
# GPUs 1 and 0, for the time left (DEADLINE_S, default 560 s). Logs and tables end up in $OUT.
#   run: carry [".device", ".baseline"], command: source .device/setup.sh && bash bench/device_vs_reference.sh
set -u -o pipefail
W=/tmp/vr; mkdir -p $W; OUT=${OUT:-/tmp/out}; mkdir -p $OUT
BASELINE=${BASELINE:-.baseline}; T0=$(date +%s); DEADLINE=${DEADLINE_S:-560}
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader | tee $W/gpus.txt
NG=$(nvidia-smi -L | wc -l)
if [ "$NG" -ge 4 ]; then AB_GPU=2; LEVER_GPU=3; else AB_GPU=1; LEVER_GPU=0; fi
left() { echo $(( DEADLINE - ($(date +%s) - T0) )); }
python bench/vs_reference.py --gpus 0 1 --timeout 240 --out $W/side --docs docs/benchmarks.md > $W/side.txt 2>&1 &
[ "$NG" -ge 4 ] || wait
if [ -f $BASELINE/train_fsdp2.py ]; then
  timeout $(left) python bench/vs_reference.py --gpus $AB_GPU --ours-only --rows ${AB_ROWS:-650M 150M 8M 650M_fp8 3B 3B_fp8} \
    --trainer $BASELINE/train_fsdp2.py --timeout 240 --out $W/base > $W/base.txt 2>&1 &
fi
lever() {  # lever NAME ROW [--trainer X] [--set ...]
  local name=$1 row=$2; shift 2
  [ "$(left)" -gt 60 ] || { echo "lever $name $row: skipped (time)" >> $W/levers.txt; return; }
  timeout $(left) python bench/vs_reference.py --gpus $LEVER_GPU --ours-only --rows $row --timeout 200 --out $W/lev_$name "$@" \
    > $W/lev_$name.txt 2>&1
  echo "lever $name $row: $(grep -h "^ours" $W/lev_$name.txt)" >> $W/levers.txt
}
(
  lever compile 650M --set use_torch_compile=true dataset.pad_to_fixed=true
  lever noreshard 650M --set fsdp.reshard_after_forward=false
  lever tanh 650M --set model.activation=gelu_tanh
  lever ddp 650M --trainer train_ddp.py
  lever torch_compile 150M --set use_torch_compile=true dataset.pad_to_fixed=true
  lever workers4 150M --set dataset.num_workers=4
  lever workers4 8M --set dataset.num_workers=4
) &
wait
cp docs/benchmarks.md $OUT/benchmarks.md
tar czf $OUT/logs.tgz -C $W . 2>/dev/null
echo "== side by side"; tail -12 $W/side.txt
echo "== baseline (this tree's parent), ours only"; grep -h "^ours" $W/base.txt
echo "== levers"; cat $W/levers.txt
