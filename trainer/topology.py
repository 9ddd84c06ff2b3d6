"""Where a run's learner ran: JAX processes, devices per process, the mesh shape and the hosts.

    per_learner = ray.get([h.topology.remote() for h in learners])   # each learner: describe(rules)
    topology = merge(per_learner)
    record(run_dir, topology, metrics_log)

The record goes to three places: run.json (`"topology"`, the latest driver session's), metrics.jsonl
(a `stage: "run"` row, the run's first, and another whenever a resumed session runs on a different
topology: numbers measured on two shapes of hardware must be told apart) and report.md.
"""

from __future__ import annotations

import json
from pathlib import Path

from trainer.durable import write_atomic

RUN_FILE = "run.json"


def describe(rules) -> dict:
    """This learner process's view (call inside the learner, after jax.distributed is up)."""
    import socket

    import jax

    return {"process_index": jax.process_index(), "jax_processes": jax.process_count(),
            "devices_per_process": jax.local_device_count(), "devices": jax.device_count(),
            "platform": jax.devices()[0].platform, "mesh": {k: int(v) for k, v in rules.mesh.shape.items()},
            "host": socket.gethostname()}


def merge(per_learner: list[dict]) -> dict:
    """One record for the run from every learner process's `describe`."""
    ordered = sorted(per_learner, key=lambda t: t["process_index"])
    first = ordered[0]
    per_process = sorted({t["devices_per_process"] for t in ordered})
    return {"jax_processes": first["jax_processes"],
            "devices_per_process": per_process[0] if len(per_process) == 1 else [t["devices_per_process"] for t in ordered],
            "devices": first["devices"], "platform": first["platform"], "mesh": first["mesh"],
            "hosts": [t["host"] for t in ordered]}


def as_row(topology: dict) -> dict:
    """The metrics.jsonl fields (numbers as `run/...` so TensorBoard shows them; hosts as a list)."""
    row = {f"run/{k}": topology[k] for k in ("jax_processes", "devices_per_process", "devices", "platform", "hosts")}
    row.update({f"run/mesh_{axis}": size for axis, size in topology["mesh"].items()})
    return row


def record(run_dir: Path, topology: dict, metrics) -> None:
    """run.json's topology, and a `run` row in metrics.jsonl unless the last one says the same."""
    path = Path(run_dir) / RUN_FILE
    info = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    info["topology"] = topology
    write_atomic(path, json.dumps(info) + "\n")
    rows = metrics.records("run")
    fields = as_row(topology)
    if rows and all(rows[-1].get(k) == v for k, v in fields.items()):
        return
    metrics.write_row("run", len(rows) + 1, fields)


def report_lines(run_dir: Path) -> list[str]:
    """report.md's section: where the learner ran, and what moving its weights to the workers cost (nothing
    with rollout.colocated: its PPO rows say 0 bytes)."""
    from trainer.ledger import read_records

    path = Path(run_dir) / RUN_FILE
    topology = json.loads(path.read_text(encoding="utf-8")).get("topology") if path.is_file() else None
    ppo = [r for r in read_records(Path(run_dir) / "metrics.jsonl") if r.get("stage") == "ppo"]
    synced = [r for r in ppo if r.get("ppo/sync_bytes")]
    in_place = [r for r in ppo if r.get("ppo/sync_bytes") == 0]  # rollout.colocated: nothing moved
    if not topology and not synced and not in_place:
        return []
    lines = ["## Topology and weight sync", ""]
    if topology:
        mesh = " × ".join(f"{axis} {size}" for axis, size in topology["mesh"].items())
        lines += [f"{topology['jax_processes']} JAX process(es) × {topology['devices_per_process']} "
                  f"{topology['platform']} device(s) = {topology['devices']} devices; learner mesh {mesh}; hosts: "
                  f"{', '.join(topology['hosts'])}.", ""]
    if synced:
        def mean(key):
            return sum(r.get(key) or 0.0 for r in synced) / len(synced)

        lines += [f"Weight sync per PPO version (mean of {len(synced)}): {mean('ppo/sync_bytes') / 2**20:.2f} MiB; "
                  f"learner gather + object-store put {mean('ppo/sync_learner_seconds'):.3f} s (driver waited "
                  f"{mean('ppo/sync_seconds'):.3f} s); workers fetching and loading it "
                  f"{mean('ppo/sync_worker_seconds'):.3f} s in all.", ""]
    if in_place and not synced:
        lines += ["Weight sync per PPO version: none — the sampler ran in the learner process (rollout.colocated) "
                  "on the learner's own arrays (0 bytes moved).", ""]
    return lines
