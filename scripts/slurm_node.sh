#!/bin/bash
# One per node, started by slurm.sh through srun: torchrun with c10d rendezvous on the head node.
# torchrun runs in its own session, so a signal sent to this task does not kill it; USR1 and TERM are handed to the
# training processes (torchrun's children), which checkpoint at the next step boundary and exit 0.
set -u
cd "${SLURM_SUBMIT_DIR:-$PWD}" || exit 1
: "${NNODES:?}" "${NPROC:?}" "${HEAD:?}" "${MASTER_PORT:?}" "${RDZV_ID:?}" "${ENTRY:?}"

setsid "${PYTHON:-python3}" -m torch.distributed.run \
  --nnodes "$NNODES" --nproc_per_node "$NPROC" \
  --rdzv-backend c10d --rdzv-endpoint "$HEAD:$MASTER_PORT" --rdzv-id "$RDZV_ID" \
  "$ENTRY" "$@" &
torchrun_pid=$!

# shellcheck disable=SC2329  # invoked by the traps below
forward() {
  echo "esm2 node ${SLURM_NODEID:-?}: forwarding $1 to the training processes"
  pkill "-$1" -P "$torchrun_pid" || true
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

while true; do
  rc=0
  wait "$torchrun_pid" || rc=$?
  kill -0 "$torchrun_pid" 2>/dev/null || break  # gone: rc is its exit status (else a trapped signal woke us)
done
exit "$rc"
