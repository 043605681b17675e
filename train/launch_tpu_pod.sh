#!/usr/bin/env bash
# Train on a Cloud TPU pod slice: the same command on every worker (gcloud ... ssh --worker=all).
# JAX finds the other workers itself (jax.distributed.initialize() without arguments, chosen because
# TPU_WORKER_HOSTNAMES names more than one host); each worker reads only its share of the data.
#
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a train/launch_tpu_pod.sh train/qwen3_1.7b.yaml [key=value ...] [--resume]
#
# Assumes the repository is cloned at $REPO_DIR on every worker (first run: SETUP=1 installs it) and
# that checkpoint.dir / output.dir point to storage every worker shares (a gs:// bucket via gcsfuse,
# or NFS): orbax writes one checkpoint from all workers together.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}
REPO_DIR=${REPO_DIR:-'~/loopus-jax'}
CONFIG=${1:?usage: launch_tpu_pod.sh CONFIG.yaml [overrides...] [--resume]}
shift
ARGS=$(printf ' %q' "$@")

SETUP_CMD=""
if [[ "${SETUP:-0}" == "1" ]]; then
  SETUP_CMD="cd $REPO_DIR && python3 -m venv .venv && .venv/bin/pip install -q -e '.[tpu]' &&"
fi

gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG --worker=all --command="
  set -e; $SETUP_CMD cd $REPO_DIR &&
  .venv/bin/loopus train --config $CONFIG $ARGS 2>&1 | tee -a train_\$(hostname).log"
