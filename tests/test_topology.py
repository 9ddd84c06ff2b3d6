"""The learner topology and weight-sync cost on record: run.json, metrics.jsonl's `run` rows, report.md."""

import json

from trainer import topology
from trainer.ledger import read_records
from trainer.metrics import MetricsLog

TWO_HOSTS = [
    {"process_index": 1, "jax_processes": 2, "devices_per_process": 4, "devices": 8, "platform": "cpu",
     "mesh": {"data": 2, "fsdp": 2, "tensor": 2}, "host": "b"},
    {"process_index": 0, "jax_processes": 2, "devices_per_process": 4, "devices": 8, "platform": "cpu",
     "mesh": {"data": 2, "fsdp": 2, "tensor": 2}, "host": "a"},
]


def test_merge_orders_hosts_by_process():
    merged = topology.merge(TWO_HOSTS)
    assert merged == {"jax_processes": 2, "devices_per_process": 4, "devices": 8, "platform": "cpu",
                      "mesh": {"data": 2, "fsdp": 2, "tensor": 2}, "hosts": ["a", "b"]}


def test_one_run_row_per_topology_and_run_json_keeps_other_keys(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"constitution_hash": "abc"}))
    log = MetricsLog(tmp_path)
    first = topology.merge(TWO_HOSTS)
    topology.record(tmp_path, first, log)
    log.write("sl", 1, {"loss": 1.0})
    topology.record(tmp_path, first, log)  # a resumed session on the same hosts: nothing new
    one_host = {**first, "jax_processes": 1, "devices_per_process": 8, "hosts": ["a"]}
    topology.record(tmp_path, one_host, log)  # resumed on other hardware: said so
    log.close()
    rows = read_records(tmp_path / "metrics.jsonl")
    assert [(r["stage"], r["step"]) for r in rows] == [("run", 1), ("sl", 1), ("run", 2)]
    assert rows[0]["run/hosts"] == ["a", "b"] and rows[0]["run/mesh_fsdp"] == 2 and rows[2]["run/jax_processes"] == 1
    info = json.loads((tmp_path / "run.json").read_text())
    assert info["constitution_hash"] == "abc" and info["topology"]["hosts"] == ["a"]
    MetricsLog(tmp_path).close()  # reopening rebuilds tb/ from rows holding lists and strings


def test_report_lines_show_the_topology_and_the_sync_cost(tmp_path):
    log = MetricsLog(tmp_path, tensorboard=False)
    topology.record(tmp_path, topology.merge(TWO_HOSTS), log)
    for step, (nbytes, learner, driver, worker) in enumerate([(2**20, 0.5, 0.6, 0.1), (3 * 2**20, 1.5, 1.6, 0.3)], 1):
        log.write("ppo", step, {"sync_bytes": nbytes, "sync_learner_seconds": learner, "sync_seconds": driver,
                                "sync_worker_seconds": worker})
    text = "\n".join(topology.report_lines(tmp_path))
    assert "2 JAX process(es) × 4 cpu device(s) = 8 devices; learner mesh data 2 × fsdp 2 × tensor 2; hosts: a, b" in text
    assert "(mean of 2): 2.00 MiB; learner gather + object-store put 1.000 s (driver waited 1.100 s)" in text
    assert "0.200 s in all" in text
    assert topology.report_lines(tmp_path / "nothing") == []
