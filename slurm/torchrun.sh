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

# torchrun ignores USR1 (its default action would kill it and orphan the ranks); the ranks
# install their own handler. OVERRIDES (space separated) come before the script arguments.
# shellcheck disable=SC2086
srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c '
  trap "" USR1
  exec "$PYTHON" -m torch.distributed.run \
    --nnodes="$SLURM_NNODES" --nproc_per_node="$NPROC_PER_NODE" --max_restarts=0 \
    --rdzv_id="$SLURM_JOB_ID" --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" \
    -m ofs_scale.train --config "$CONFIG" "$@"' bash ${OVERRIDES:-} "$@"
