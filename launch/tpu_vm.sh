#!/usr/bin/env bash
# Run the learner on every worker of a Cloud TPU VM slice (one process per host; JAX detects the slice).
#   launch/tpu_vm.sh my-v5e-32 us-west4-a configs/run.yaml [key=value ...]
# Prerequisites: `gcloud` authenticated, the slice created, this repository checked out at $REPO on each worker
# (or pass REPO_URL to clone it). Checkpoints should go to a bucket path (runs/… on gs://) shared by all hosts.
set -euo pipefail
if [[ $# -lt 3 ]]; then echo "usage: $0 TPU_NAME ZONE CONFIG [overrides...]" >&2; exit 2; fi
tpu=$1; zone=$2; config=$3; shift 3
repo=${REPO:-cairl}
setup="cd ~/$repo && python3 -m venv .venv && .venv/bin/pip install -q -e '.[tpu]'"
run="cd ~/$repo && .venv/bin/cairl train --config $config $*"
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command "$setup"
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command "$run"
