#!/usr/bin/env bash
# One device call that checks a tree before it lands: the side-by-side table against NVIDIA's recipe (theirs on GPU 0,
# ours on GPU 1; ROWS, default "8M 150M 650M 650M_fp8"; ROWS=none skips it), then the multi-GPU tests and the single-GPU tests
# (SINGLE_K and MULTI_K select among them; default all but the 300-step FP8-vs-BF16 run). With 4 GPUs the tests run on GPUs 2-3
# beside the table; LEVERS=FILE (a bench/device_levers.sh queue) then runs on GPU 2 beside the single-GPU tests on GPU 3,
# before the multi-GPU tests. REPEATS=N runs each side of the table N times (medians, the sides trading GPUs). Stops
# starting work at DEADLINE_S (default 540 s). Results in $OUT: side.txt,
# gpu_tests.txt, benchmarks.md (the table written in), levers.txt, logs.tgz.
#   run: carry [".device"], command: source .device/setup.sh && bash bench/device_check.sh
set -u -o pipefail
W=/tmp/check; mkdir -p $W; OUT=${OUT:-/tmp/out}; mkdir -p $OUT; T0=$(date +%s); DEADLINE=${DEADLINE_S:-540}
left() { echo $(( DEADLINE - ($(date +%s) - T0) )); }
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader | tee $W/gpus.txt
NG=$(nvidia-smi -L | wc -l)
SINGLE_K=${SINGLE_K:-not l1_8m_fp8}; MULTI_K=${MULTI_K:-}
single() {  # single GPU
  [ "$(left)" -gt 60 ] && CUDA_VISIBLE_DEVICES=$1 timeout $(left) python -m pytest -m gpu -s -q -p no:cacheprovider \
    -k "$SINGLE_K" tests/test_gpu.py tests/test_model.py 2>&1 | grep -v -E "Warning:|warn\(" > $W/gpu_single.txt
}
multi() {  # multi GPUS
  [ "$(left)" -gt 60 ] && CUDA_VISIBLE_DEVICES=$1 timeout $(left) python -m pytest -m gpu -s -q -p no:cacheprovider \
    -k "$MULTI_K" tests/test_gpu_multi.py 2>&1 | grep -v -E "Warning:|warn\(" > $W/gpu_multi.txt
}
tests() {  # tests GPUS (two)
  local gpus=$1
  if [ -n "${LEVERS:-}" ]; then
    GPUS=${gpus%%,*} DEADLINE_S=$(left) bash bench/device_levers.sh "$LEVERS" & single ${gpus##*,} & wait
    cp $OUT/levers.txt $W/ 2>/dev/null
  else
    single ${gpus%%,*}
  fi
  multi $gpus
}
if [ "${ROWS:-}" = none ]; then echo "side-by-side table skipped (ROWS=none)" > $W/side.txt; else
  python bench/vs_reference.py --gpus 0 1 --rows ${ROWS:-8M 150M 650M 650M_fp8} --repeats ${REPEATS:-1} --timeout 200 --out $W/side \
    --docs docs/benchmarks.md > $W/side.txt 2>&1 &
fi
if [ "$NG" -ge 4 ]; then tests 2,3 & wait; else wait; tests 0,1; fi
{ echo "== multi-GPU tests"; cat $W/gpu_multi.txt 2>/dev/null; echo "== single-GPU tests (-k '$SINGLE_K')"; cat $W/gpu_single.txt 2>/dev/null; } \
  > $OUT/gpu_tests.txt
[ -f $W/levers.txt ] && { echo "== levers"; cat $W/levers.txt; }
cp $W/side.txt $OUT/side.txt; cp docs/benchmarks.md $OUT/benchmarks.md; tar czf $OUT/logs.tgz -C $W . 2>/dev/null
tail -12 $W/side.txt; grep -h -E "passed|failed|error" $OUT/gpu_tests.txt | tail -5; echo "total $(( $(date +%s) - T0 )) s"
