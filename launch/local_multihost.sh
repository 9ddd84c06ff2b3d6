#!/usr/bin/env bash
# Simulate a multi-host job on one machine: N processes, each with its own fake CPU devices,
# joined by jax.distributed over 127.0.0.1 (gloo collectives).
#   launch/local_multihost.sh 2 4 -- cairl train --config configs/demo.yaml
set -euo pipefail
if [[ $# -lt 4 || "$3" != "--" ]]; then
  echo "usage: $0 NUM_PROCESSES DEVICES_PER_PROCESS -- COMMAND..." >&2; exit 2
fi
num=$1; devices=$2; shift 3
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT INT TERM
for ((i = 0; i < num; i++)); do
  CAIRL_COORDINATOR="127.0.0.1:${port}" CAIRL_NUM_PROCESSES="$num" CAIRL_PROCESS_ID="$i" \
  JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=${devices}" \
    "$@" > >(sed "s/^/[process $i] /") 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
trap - EXIT
exit "$status"
