#!/bin/bash
# The 7B OP-block + SOAP run (configs/op7b.yaml) on 8 nodes x 8 H100: srun starts one torchrun
# per node, torchrun one rank per GPU, all meeting at a c10d rendezvous on the first node.
#
#   sbatch slurm/op7b.sh [section.key=value ...]
#   CONFIG=configs/pre7b.yaml sbatch slurm/op7b.sh                # the Pre-Norm + AdamW baseline
#   sbatch --nodes=4 slurm/op7b.sh train.global_batch=256          # fewer nodes: DP shrinks
#   OVERRIDES="optim.lr=2e-4 run.out_dir=runs/op7b_lr2e-4" sbatch slurm/op7b.sh
#
# Environment: CONFIG, OVERRIDES (space separated; arguments after the script come last),
# NPROC_PER_NODE (default: GPUs on the node), MASTER_PORT, PYTHON, OFS_ROOT (default: the submit
# directory), MAX_RESTARTS (torchrun --max-restarts, default 1 here), SRUN_CPUS_PER_TASK (default:
# the job's --cpus-per-task). Check the layout first: ofs-scale plan "$CONFIG" --gpus 64.
#
# Time limit and preemption: SLURM sends USR1 to every process of the step 300 s before the
# limit; the ranks agree on a step, finish it, write checkpoint step_NNNNNN, and rank 0 runs
# `scontrol requeue`. On preemption (SIGTERM, PreemptMode=REQUEUE) the ranks also checkpoint
# within the grace time and SLURM requeues the job itself. The requeued job resumes from the
# newest checkpoint in run.out_dir; logs are appended to the same output file.
#SBATCH --job-name=ofs-op7b
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=96
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --signal=USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

set -euo pipefail
cd "${OFS_ROOT:-${SLURM_SUBMIT_DIR:-.}}"

export CONFIG="${CONFIG:-configs/op7b.yaml}"
export NPROC_PER_NODE="${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}"

# NCCL: surface errors as exceptions instead of hangs; one CUDA work queue keeps TP
# communication ordered with compute; everything can be overridden from the submitting shell.
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
export TORCH_NCCL_BLOCKING_WAIT="${TORCH_NCCL_BLOCKING_WAIT:-0}"
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
# InfiniBand clusters (see docs/cluster.md; ask the admins, `ibstat` / `ip -br addr` show names):
# export NCCL_IB_HCA="${NCCL_IB_HCA:-mlx5}"                 # which HCAs NCCL uses (prefix match)
# export NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-^lo,docker}"  # bootstrap/TCP interface
# export NCCL_IB_GID_INDEX="${NCCL_IB_GID_INDEX:-3}"        # RoCE v2 needs the right GID index
# export NCCL_NET_GDR_LEVEL="${NCCL_NET_GDR_LEVEL:-PHB}"    # GPUDirect RDMA up to this distance
# export NCCL_DEBUG=INFO NCCL_DEBUG_SUBSYS=INIT,NET          # once: check NET/IB is chosen
# export TORCH_NCCL_BLOCKING_WAIT=1   # debugging hangs only: synchronous waits, slower
# torchrun restarts per node after a rank fails (resume from the newest checkpoint):
export MAX_RESTARTS="${MAX_RESTARTS:-1}"

export LAUNCH_NAME=op7b.sh
# shellcheck source=slurm/torchrun.sh
source slurm/torchrun.sh "$@"
