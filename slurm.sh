#!/bin/bash
# ESM-2 training on N nodes x 8 GPUs under Slurm: one torchrun per node (srun), c10d rendezvous on the first node.
#
#   sbatch --nodes 4 slurm.sh --config-name L1_650M dataset.train_path=/shared/uniref50/train \
#     dataset.micro_batch_size=32 grad_acc_steps=2    # 32,768 tokens x 2 x 32 GPUs = 2.1 M tokens per step
#
# Everything after the script name is passed to the trainer (hydra overrides). Environment knobs:
#   ENTRY=train_fsdp2.py        trainer (train_ddp.py, train_fsdp2.py)
#   GPUS_PER_NODE=8             processes per node
#   OUTPUT_DIR=...              run directory on a shared file system (metrics, checkpoints, final model);
#                               default $SLURM_SUBMIT_DIR/outputs/$SLURM_JOB_NAME. A requeued job finds its checkpoints
#                               there and resumes (checkpoint.resume_from_checkpoint=true is always passed).
#   MASTER_PORT=29500           rendezvous port on the first node
#   CONTAINER_IMAGE=...         optional: run inside an enroot/pyxis container (e.g. a .sqsh built from ./Dockerfile)
#   CONTAINER_MOUNTS=...        optional: pyxis --container-mounts (data, checkpoints, this checkout)
#
# Preemption and time limits: Slurm sends USR1 to this batch shell 120 s before the end (--signal=B:USR1@120).
# We forward it through srun to every node's launcher, which hands it to the training processes; they save a
# checkpoint at the next step boundary and exit 0. The job then requeues itself and resumes from that checkpoint.
#
#SBATCH --job-name=esm2
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=96
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

set -euo pipefail

# --- NCCL / EFA (uncomment what your cluster needs) ----------------------------------------------------------
# export NCCL_DEBUG=WARN
# export NCCL_SOCKET_IFNAME=^lo,docker       # interfaces NCCL may use for bootstrap
# export NCCL_IB_HCA=mlx5                     # InfiniBand adapters
# export FI_PROVIDER=efa                      # AWS EFA (with the aws-ofi-nccl plugin)
# export FI_EFA_USE_DEVICE_RDMA=1
# export NCCL_NVLS_ENABLE=0                   # NVLink SHARP off where multicast is not supported
# export TORCH_NCCL_ASYNC_ERROR_HANDLING=1

SUBMIT_DIR=${SLURM_SUBMIT_DIR:-$PWD}
export ENTRY=${ENTRY:-train_fsdp2.py}
export NPROC=${GPUS_PER_NODE:-8}
export NNODES=${SLURM_NNODES:-1}
export MASTER_PORT=${MASTER_PORT:-29500}
mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")  # not `| head -1`: SIGPIPE under pipefail
export HEAD=${nodes[0]:?no hosts in SLURM_JOB_NODELIST}
export RDZV_ID=${SLURM_JOB_ID:-esm2}
OUTPUT_DIR=${OUTPUT_DIR:-$SUBMIT_DIR/outputs/${SLURM_JOB_NAME:-esm2}}
mkdir -p "$OUTPUT_DIR"

container_args=()
if [ -n "${CONTAINER_IMAGE:-}" ]; then
  container_args=(--container-image="$CONTAINER_IMAGE" --container-workdir="$SUBMIT_DIR")
  [ -n "${CONTAINER_MOUNTS:-}" ] && container_args+=(--container-mounts="$CONTAINER_MOUNTS")
fi

echo "esm2: $NNODES node(s) x $NPROC processes, rendezvous $HEAD:$MASTER_PORT, output $OUTPUT_DIR, job ${SLURM_JOB_ID:-?}"

preempted=0
srun_pid=""
# shellcheck disable=SC2329  # invoked by the trap below
on_usr1() {
  preempted=1
  echo "esm2: USR1 (time limit or preemption): asking the trainers to checkpoint and stop"
  [ -n "$srun_pid" ] && kill -USR1 "$srun_pid" 2>/dev/null || true
}
trap on_usr1 USR1

srun --kill-on-bad-exit=1 --ntasks-per-node=1 "${container_args[@]}" \
  bash "$SUBMIT_DIR/scripts/slurm_node.sh" "output_dir=$OUTPUT_DIR" checkpoint.resume_from_checkpoint=true "$@" &
srun_pid=$!
while true; do
  rc=0
  wait "$srun_pid" || rc=$?
  kill -0 "$srun_pid" 2>/dev/null || break  # gone: rc is its exit status (else a trapped signal woke us)
done

if [ "$preempted" = 1 ] && [ "$rc" = 0 ]; then
  echo "esm2: checkpoint written; requeueing job ${SLURM_JOB_ID:-?} to resume"
  scontrol requeue "${SLURM_JOB_ID:?}"
fi
exit "$rc"
