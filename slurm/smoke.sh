#!/bin/bash
# One CPU node: srun starts one torchrun, which starts NPROC_PER_NODE gloo ranks of
# `python -m ofs_scale.train` on configs/smoke.yaml. The same shape as slurm/op7b.sh, small enough
# for a laptop-size node; the SLURM tests submit it.
#
#   sbatch slurm/smoke.sh [section.key=value ...]
#   CONFIG=configs/smoke.yaml NPROC_PER_NODE=2 sbatch slurm/smoke.sh run.out_dir=runs/s1
#   MAX_RESTARTS=2 sbatch slurm/smoke.sh     # torchrun restarts failed ranks; they resume
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
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

export LAUNCH_NAME=smoke.sh
# shellcheck source=slurm/torchrun.sh
source slurm/torchrun.sh "$@"
