# Sourced by the sbatch scripts (after they cd to the repository and set CONFIG and
# NPROC_PER_NODE): srun starts one torchrun per node with c10d rendezvous on the first node of
# the allocation, running `python -m ofs_scale.train --config $CONFIG $OVERRIDES "$@"`.
# shellcheck shell=bash
export PYTHON="${PYTHON:-$(test -x .venv/bin/python && echo .venv/bin/python || echo python3)}"
MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
export MASTER_ADDR
export MASTER_PORT="${MASTER_PORT:-$((15000 + SLURM_JOB_ID % 20000))}"

echo "[${LAUNCH_NAME:-sbatch}] job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0} on" \
  "$SLURM_JOB_NODELIST: $SLURM_NNODES x $NPROC_PER_NODE ranks, rendezvous" \
  "$MASTER_ADDR:$MASTER_PORT, $CONFIG $*"

# SLURM 22.05+ no longer hands sbatch's --cpus-per-task to srun: without it the step gets one
# CPU per task and the ranks share it. Pass it explicitly (SRUN_CPUS_PER_TASK is what srun reads).
export SRUN_CPUS_PER_TASK="${SRUN_CPUS_PER_TASK:-${SLURM_CPUS_PER_TASK:-1}}"
# MAX_RESTARTS: torchrun restarts the node's ranks this often after one fails (default 0); the
# restarted ranks resume from the newest checkpoint in run.out_dir.
export MAX_RESTARTS="${MAX_RESTARTS:-0}"
echo "[${LAUNCH_NAME:-sbatch}] srun --cpus-per-task=$SRUN_CPUS_PER_TASK torchrun" \
  "--max-restarts=$MAX_RESTARTS"

# torchrun ignores USR1 (its default action would kill it and orphan the ranks); the ranks
# install their own handler. OVERRIDES (space separated) come before the script arguments.
# shellcheck disable=SC2086
srun --ntasks-per-node=1 --cpus-per-task="$SRUN_CPUS_PER_TASK" --kill-on-bad-exit=1 bash -c '
  trap "" USR1
  echo "[step] node $SLURM_NODEID: $SLURM_CPUS_PER_TASK cpus per task"
  exec "$PYTHON" -m torch.distributed.run \
    --nnodes="$SLURM_NNODES" --nproc_per_node="$NPROC_PER_NODE" --max-restarts="$MAX_RESTARTS" \
    --rdzv_id="$SLURM_JOB_ID" --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" \
    -m ofs_scale.train --config "$CONFIG" "$@"' bash ${OVERRIDES:-} "$@"
