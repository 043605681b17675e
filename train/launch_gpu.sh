#!/usr/bin/env bash
# One GPU host (one or more GPUs, one process: the mesh spans every local GPU).
#
#   train/launch_gpu.sh train/qwen3_1.7b.yaml [key=value ...] [--resume]
#   CUDA_VISIBLE_DEVICES=0 train/launch_gpu.sh train/smollm2_cpu.yaml
#
# Install once with: python -m venv .venv && .venv/bin/pip install -e '.[gpu]'
set -euo pipefail
CONFIG=${1:?usage: launch_gpu.sh CONFIG.yaml [overrides...] [--resume]}
shift
cd "$(dirname "$0")/.."
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
exec .venv/bin/loopus train --config "$CONFIG" "$@"
