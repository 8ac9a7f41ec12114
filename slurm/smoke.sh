#!/bin/bash
# One CPU node: srun starts one torchrun, which starts NPROC_PER_NODE gloo ranks of
# `python -m ofs_scale.train` on configs/smoke.yaml. The same shape as slurm/op7b.sh, small enough
# for a laptop-size node; the SLURM tests submit it.
#
#   sbatch slurm/smoke.sh [section.key=value ...]
#   CONFIG=configs/smoke.yaml NPROC_PER_NODE=2 sbatch slurm/smoke.sh run.out_dir=runs/s1
#
# Before the time limit SLURM sends USR1 to every process of the step: the ranks finish the
# current step, write checkpoint step_NNNNNN, and rank 0 requeues the job, which resumes from it.
#SBATCH --job-name=ofs-smoke
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=2
#SBATCH --time=00:30:00
#SBATCH --signal=USR1@60
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

set -euo pipefail
cd "${OFS_ROOT:-${SLURM_SUBMIT_DIR:-.}}"

export CONFIG="${CONFIG:-configs/smoke.yaml}"
export NPROC_PER_NODE="${NPROC_PER_NODE:-2}"
export PYTHON="${PYTHON:-$(test -x .venv/bin/python && echo .venv/bin/python || echo python3)}"
export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
export MASTER_PORT="${MASTER_PORT:-$((15000 + SLURM_JOB_ID % 20000))}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

echo "[smoke.sh] job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0} on $SLURM_JOB_NODELIST:" \
  "$SLURM_NNODES x $NPROC_PER_NODE ranks, rendezvous $MASTER_ADDR:$MASTER_PORT, $CONFIG $*"

# torchrun ignores USR1 (its default action would kill it and orphan the ranks); the ranks
# install their own handler. OVERRIDES (space separated) come before the script arguments.
# shellcheck disable=SC2086
srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c '
  trap "" USR1
  exec "$PYTHON" -m torch.distributed.run \
    --nnodes="$SLURM_NNODES" --nproc_per_node="$NPROC_PER_NODE" --max_restarts=0 \
    --rdzv_id="$SLURM_JOB_ID" --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" \
    -m ofs_scale.train --config "$CONFIG" "$@"' bash ${OVERRIDES:-} "$@"
