#!/usr/bin/env bash
# Multi-node GPU training under SLURM: one process per node (each sees its node's GPUs), started by
# srun. `loopus train` reads SLURM_NTASKS / SLURM_PROCID / SLURM_STEP_NODELIST and calls
# jax.distributed.initialize with the first node as coordinator (port $LOOPUS_COORDINATOR_PORT).
#
#   sbatch --nodes=4 train/launch_slurm.sh train/qwen3_8b.yaml [key=value ...] [--resume]
#
# checkpoint.dir and output.dir must be on a file system every node shares.
#SBATCH --job-name=loopus-train
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=48:00:00
#SBATCH --output=loopus-train-%j.out
set -euo pipefail
CONFIG=${1:?usage: sbatch launch_slurm.sh CONFIG.yaml [overrides...] [--resume]}
shift
export LOOPUS_COORDINATOR_PORT=${LOOPUS_COORDINATOR_PORT:-12355}
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
cd "${SLURM_SUBMIT_DIR:-.}"
srun --ntasks-per-node=1 --kill-on-bad-exit=1 .venv/bin/loopus train --config "$CONFIG" "$@"
