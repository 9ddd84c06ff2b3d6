#!/usr/bin/env bash
# A multi-host run simulated on this machine: N Ray nodes on 127.0.0.1, each with K fake CPU devices,
# and ONE `cairl train` whose learner group spans them (learner.hosts=N: one learner per node, joined
# by jax.distributed over loopback, gloo collectives). This is how the multi-host path is tested.
#   launch/local_multihost.sh --hosts 2 --devices-per-host 4 -- --config configs/tiny.yaml [key=value ...]
# Options: --dry-run (print every command, run none), --cpus-per-host C (Ray CPUs per node, default 1).
# Environment: CAIRL (the cairl command, default "cairl"), RAY (default "ray"), PYTHON (the Python that has
# cairl and Ray, default "python3").
# Nothing listens beyond 127.0.0.1; Ray authenticates with a token private to this run, removed at exit.
set -euo pipefail

hosts=2 devices=4 cpus=1 dry_run=0
usage() { echo "usage: $0 [--dry-run] --hosts N --devices-per-host K [--cpus-per-host C] -- CAIRL_TRAIN_ARGS..." >&2; exit 2; }
while [[ $# -gt 0 ]]; do
  case $1 in
    --hosts) hosts=${2:?}; shift 2 ;;
    --devices-per-host) devices=${2:?}; shift 2 ;;
    --cpus-per-host) cpus=${2:?}; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; break ;;
    *) usage ;;
  esac
done
[[ $# -gt 0 && $hosts =~ ^[1-9][0-9]*$ && $devices =~ ^[1-9][0-9]*$ ]] || usage
read -r -a cairl <<< "${CAIRL:-cairl}"
ray=${RAY:-ray}
python=${PYTHON:-python3}

show() { printf '+'; printf ' %q' "$@"; printf '\n'; }
run() { show "$@"; [[ $dry_run == 1 ]] || "$@"; }

if [[ $dry_run == 1 ]]; then
  port=PORT tmp=/tmp/cairl-local-XXXX
else
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  tmp=$(mktemp -d /tmp/cairl-local-XXXX)  # short: Ray's socket paths live under it
  python3 -c 'import secrets; print(secrets.token_hex(32))' > "$tmp/auth_token"
  chmod 600 "$tmp/auth_token"
fi
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$tmp/auth_token
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0  # `ray status` and the driver: keep loopback addresses as they are

nodes=()  # pids of the node processes: stopping one stops its node
cleanup() {
  for pid in "${nodes[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${nodes[@]}"; do wait "$pid" 2>/dev/null || true; done
  [[ $dry_run == 1 ]] || rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# One process per simulated host, each holding one Ray node on 127.0.0.1 (trainer/local_cluster.py says
# why not `ray start`), with that host's fake devices in the environment its Ray workers inherit.
node_env=(env JAX_PLATFORMS=cpu "XLA_FLAGS=--xla_force_host_platform_device_count=$devices")
start_node() {
  show "${node_env[@]}" "$python" -m trainer.local_cluster "$@"
  [[ $dry_run == 1 ]] && return
  "${node_env[@]}" "$python" -m trainer.local_cluster "$@" > "$tmp/node-${#nodes[@]}.log" 2>&1 &
  nodes+=($!)
}
wait_for_nodes() {  # until the cluster lists $1 live nodes
  echo "$(show "$ray" status --address "127.0.0.1:$port")  # repeated until $1 node(s) are up"
  [[ $dry_run == 1 ]] && return
  for _ in $(seq 120); do
    for n in "${!nodes[@]}"; do
      if ! kill -0 "${nodes[$n]}" 2>/dev/null; then
        echo "$0: Ray node $n exited:" >&2; tail -n 20 "$tmp/node-$n.log" >&2; exit 1
      fi
    done
    if [[ $("$ray" status --address "127.0.0.1:$port" 2>/dev/null | grep -c '^ *1 node_') -ge $1 ]]; then return; fi
    sleep 1
  done
  echo "$0: the local Ray cluster did not reach $1 nodes; logs in $tmp" >&2; exit 1
}

# The Ray head first, then one more node per host; no dashboard.
start_node head --port="$port" --num-cpus="$cpus" --temp-dir="$tmp/ray"
wait_for_nodes 1
for ((i = 1; i < hosts; i++)); do
  start_node node --address="127.0.0.1:$port" --num-cpus="$cpus"
done
wait_for_nodes "$hosts"
run "${cairl[@]}" train "$@" "ray.address=127.0.0.1:$port" "learner.hosts=$hosts"
