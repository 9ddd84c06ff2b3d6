#!/usr/bin/env bash
# One cairl run on a Cloud TPU VM slice: (optionally) create the slice, copy this checkout to every worker
# and install it, start the Ray head on worker 0 and Ray on the other workers, then run ONE `cairl train`
# on worker 0. Its learner group puts one learner on each worker (learner.hosts = the slice's hosts;
# learner 0 on worker 0 through the slice's TPU-<type>-head resource), joined by jax.distributed.
#   launch/tpu_vm.sh --name my-v4 --zone us-central2-b --accelerator v4-16 [--create [--queued]] \
#       -- --config configs/smollm2-cai.yaml run.runs_dir=/mnt/shared/runs
# Options: --dry-run (print every command, run none), --version RUNTIME (default tpu-ubuntu2204-base),
#   --chips-per-host K (default 4), --hosts N (only for --dry-run; otherwise read from the slice).
# The run directory must be on storage every worker shares (the learners save checkpoints together).
# Ray listens on the workers' internal addresses (the VPC), never on external ones; it authenticates
# with a token made here and copied to the workers (owner-only). No dashboard.
set -euo pipefail

name="" zone="" accelerator="" version=tpu-ubuntu2204-base chips=4 hosts=2 create=0 queued=0 dry_run=0
usage() { echo "usage: $0 [--dry-run] --name NAME --zone ZONE --accelerator TYPE [--create [--queued]] -- CAIRL_TRAIN_ARGS..." >&2; exit 2; }
while [[ $# -gt 0 ]]; do
  case $1 in
    --name) name=${2:?}; shift 2 ;;
    --zone) zone=${2:?}; shift 2 ;;
    --accelerator) accelerator=${2:?}; shift 2 ;;
    --version) version=${2:?}; shift 2 ;;
    --chips-per-host) chips=${2:?}; shift 2 ;;
    --hosts) hosts=${2:?}; shift 2 ;;
    --create) create=1; shift ;;
    --queued) queued=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; break ;;
    *) usage ;;
  esac
done
[[ -n $name && -n $zone && -n $accelerator && $# -gt 0 ]] || usage

show() { printf '+'; printf ' %q' "$@"; printf '\n'; }
run() { show "$@"; [[ $dry_run == 1 ]] || "$@"; }
tpu=(gcloud compute tpus tpu-vm)
on() {  # run a shell command on TPU worker $1 ("all": every worker); shown as the remote shell reads it
  local worker=$1; shift
  echo "$(show "${tpu[@]}" ssh "$name" --zone "$zone" --worker="$worker") --command \"$*\""
  [[ $dry_run == 1 ]] || "${tpu[@]}" ssh "$name" --zone "$zone" --worker="$worker" --command "$*"
}

if [[ $create == 1 && $queued == 1 ]]; then
  run gcloud compute tpus queued-resources create "$name" --node-id "$name" --zone "$zone" \
    --accelerator-type "$accelerator" --runtime-version "$version"
  echo "$(show gcloud compute tpus queued-resources describe "$name" --zone "$zone" --format='value(state.state)')  # until ACTIVE"
  if [[ $dry_run == 0 ]]; then
    until [[ $(gcloud compute tpus queued-resources describe "$name" --zone "$zone" --format='value(state.state)') == ACTIVE ]]; do
      sleep 30
    done
  fi
elif [[ $create == 1 ]]; then
  run "${tpu[@]}" create "$name" --zone "$zone" --accelerator-type "$accelerator" --version "$version"
fi

# The slice's workers, in worker order: worker 0's internal address is the Ray head's.
describe=("${tpu[@]}" describe "$name" --zone "$zone" --format='value(networkEndpoints[].ipAddress)')
if [[ $dry_run == 1 ]]; then
  show "${describe[@]}"
  head_ip=HEAD_IP
else
  IFS=';, ' read -r -a ips <<< "$("${describe[@]}")"
  hosts=${#ips[@]} head_ip=${ips[0]}
fi

# This checkout (committed files only) and a fresh Ray token, on every worker.
bundle=$(mktemp -d)
trap 'rm -rf "$bundle"' EXIT
run git archive --format=tar.gz -o "$bundle/cairl.tar.gz" HEAD
if [[ $dry_run == 0 ]]; then
  (umask 077; python3 -c 'import secrets; print(secrets.token_hex(32))' > "$bundle/ray_token")
fi
run "${tpu[@]}" scp "$bundle/cairl.tar.gz" "$bundle/ray_token" "$name:" --zone "$zone" --worker=all
on all "chmod 600 ~/ray_token && mkdir -p ~/cairl && tar -xzf ~/cairl.tar.gz -C ~/cairl && cd ~/cairl && python3 -m venv .venv && .venv/bin/pip install -q -e '.[tpu]'"

auth="RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=\$HOME/ray_token"
on 0 "$auth ~/cairl/.venv/bin/ray start --head --node-ip-address=$head_ip --port=6379 --include-dashboard=false --disable-usage-stats"
for ((w = 1; w < hosts; w++)); do
  on "$w" "$auth ~/cairl/.venv/bin/ray start --address=$head_ip:6379 --disable-usage-stats"
done
train=$(printf ' %q' "$@")
on 0 "cd ~/cairl && $auth .venv/bin/cairl train$train ray.address=$head_ip:6379 learner.hosts=$hosts 'learner.resources={TPU: $chips}' learner.head_resource=TPU-$accelerator-head"
