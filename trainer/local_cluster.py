"""One Ray node of a multi-node cluster on this machine, every service on 127.0.0.1 (launch/local_multihost.sh).

    python -m trainer.local_cluster head --port 6379 --num-cpus 1 --temp-dir /tmp/cairl-local-x/ray
    python -m trainer.local_cluster node --address 127.0.0.1:6379 --num-cpus 1

Each call starts one node (the head first, then the others) and holds it until SIGTERM / SIGINT.
`ray start` cannot do this on Linux: with clusters enabled it replaces a loopback --node-ip-address
by the machine's routable address (so the nodes would listen on the network), and with them
disabled it refuses to start a second node. Ray's own local multi-node test helper
(ray.cluster_utils.Cluster) starts nodes this way, in one process; here each node is its own
process, started like a host's `ray start`, so the launch script reads like the real ones. The
processes of a node (raylet, its workers) inherit this process's environment, e.g. the fake device
count a simulated host should have.
"""

from __future__ import annotations

import argparse
import os
import signal
import threading

# Read by Ray when it is imported: keep every address on loopback (see above).
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"


def start_node(head: bool, port: int = 0, address: str = "", num_cpus: float = 1, temp_dir: str = ""):
    from ray._private.node import Node
    from ray._private.parameter import RayParams

    params = RayParams(node_ip_address="127.0.0.1", num_cpus=num_cpus, num_gpus=0, include_dashboard=False,
                       min_worker_port=0, max_worker_port=0)
    if head:
        params.update(gcs_server_port=port, temp_dir=temp_dir or None)
    else:
        params.update(gcs_address=address, node_manager_port=0, include_log_monitor=False)
        params.dashboard_agent_listen_port = None  # a free one, not the head's
    return Node(params, head=head, shutdown_at_exit=False, spawn_reaper=head)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.local_cluster", description=__doc__.split("\n")[0])
    parser.add_argument("role", choices=("head", "node"))
    parser.add_argument("--port", type=int, default=6379, help="head: the GCS port")
    parser.add_argument("--address", default="", help="node: the head's 127.0.0.1:PORT")
    parser.add_argument("--num-cpus", type=float, default=1)
    parser.add_argument("--temp-dir", default="", help="head: Ray session files")
    args = parser.parse_args(argv)
    if args.role == "node" and not args.address.startswith("127.0.0.1:"):
        parser.error("node: --address must be the head's 127.0.0.1:PORT")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    node = start_node(args.role == "head", args.port, args.address, args.num_cpus, args.temp_dir)
    print(f"ray {args.role} up at {node.gcs_address if args.role == 'head' else node.raylet_socket_name}", flush=True)
    stop.wait()
    node.kill_all_processes(check_alive=False, allow_graceful=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
