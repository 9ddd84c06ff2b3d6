"""`cairl train` over two simulated hosts (launch/local_multihost.sh: two Ray nodes on 127.0.0.1 with 4 fake
CPU devices each, one learner per node joined by jax.distributed) equals one host with 8 devices."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from trainer.ledger import read_records

pytestmark = [pytest.mark.multiprocess, pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
# One mesh over 8 devices either way; the batches must split over its 4 batch shards (data × fsdp).
# Adam's eps at 1e-6 (the stage learning rates as configured): with 1e-8, a weight whose gradient is ~0
# moves by about ±lr on the sign of rounding noise, so two correct runs summing in another order could
# differ by lr per update; a larger eps keeps the update proportional to the gradient there.
SAME_RUN = ["model.mesh={data: 2, fsdp: 2, tensor: 2}", "sl.batch_size=4", "rm.batch_size=4",
            *(f"{key}={{learning_rate: {lr}, decay: constant, eps: 1.0e-6}}" for key, lr in (
                ("sl.optimizer", 1e-5), ("rm.optimizer", 2e-5), ("ppo.policy_optimizer", 1e-5),
                ("ppo.value_optimizer", 5e-5)))]


def _env(**extra) -> dict:
    venv_bin = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": f"{venv_bin}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT),
            "PYTHON": sys.executable, "CAIRL": f"{sys.executable} -m trainer.cli", **extra}


def multihost_command(tiny_model, runs: Path, *overrides, hosts=2) -> list[str]:
    """launch/local_multihost.sh with 4 fake devices per host, training configs/tiny.yaml on the tiny model."""
    return ["bash", str(ROOT / "launch" / "local_multihost.sh"), "--hosts", str(hosts), "--devices-per-host", "4",
            "--", "--config", str(ROOT / "configs" / "tiny.yaml"), f"model.source={tiny_model}",
            f"run.runs_dir={runs}", *overrides]


def multihost(tiny_model, runs: Path, *overrides, hosts=2, timeout=1500) -> subprocess.CompletedProcess:
    return subprocess.run(multihost_command(tiny_model, runs, *overrides, hosts=hosts), cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def one_host(tiny_model, runs: Path, *overrides) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "trainer.cli", "train", "--config", str(ROOT / "configs" / "tiny.yaml"),
         f"model.source={tiny_model}", f"run.runs_dir={runs}", *overrides], cwd=ROOT,
        env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu"),
        capture_output=True, text=True, timeout=1500)


def _exported(run_dir: Path) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(run_dir / "hf" / "model.safetensors"))


def _rows(run_dir: Path) -> list[tuple]:
    rows = read_records(run_dir / "metrics.jsonl")
    keys = [(r["stage"], r["step"]) for r in rows]
    assert len(keys) == len(set(keys)), keys  # one row per (stage, step)
    return keys


@pytest.fixture(scope="module")
def single_dir(tiny_model, tmp_path_factory):
    """The reference: one process with 8 devices."""
    runs = tmp_path_factory.mktemp("single")
    single = one_host(tiny_model, runs, *SAME_RUN)
    assert single.returncode == 0, single.stderr[-4000:]
    return runs / "tiny"


def test_a_mesh_smaller_than_the_hosts_fails_before_training(tiny_model, tmp_path):
    proc = multihost(tiny_model, tmp_path, "model.mesh={data: 2}", timeout=600)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "model.mesh data 2 × fsdp 1 × tensor 1 = 2 devices" in proc.stderr and "Traceback" not in proc.stderr
    run_dir = tmp_path / "tiny"
    assert list((run_dir / "checkpoints").iterdir()) == [] and not (run_dir / "stages.json").exists()


def test_learner_hosts_the_cluster_cannot_give_fail_within_the_join_timeout(tiny_model, tmp_path):
    # Two CPU-only Ray nodes, learners asking for a GPU each: the placement group can never be placed.
    proc = multihost(tiny_model, tmp_path, "learner.resources={GPU: 1}", "learner.join_timeout_s=15", timeout=600)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "learner.hosts = 2 needs 2 Ray nodes" in proc.stderr and "'GPU': 1.0" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert list((tmp_path / "tiny" / "checkpoints").iterdir()) == []


def test_two_hosts_killed_mid_ppo_resume_and_equal_one_host_with_eight_devices(tiny_model, single_dir, tmp_path):
    """One host's learner killed inside PPO stops the whole run (exit 2, no learner left behind); the resumed run
    ends equal to one process with 8 devices, and its files describe the two hosts. One test, since a two-host
    run costs minutes here: the uninterrupted part is the run up to the kill and from the resume on."""
    import signal
    import time

    from test_pipeline import check_finished_run
    from test_run_faults import _learner_pids

    run_dir = tmp_path / "tiny"
    log = (tmp_path / "driver.log").open("w")
    proc = subprocess.Popen(multihost_command(tiny_model, tmp_path, *SAME_RUN), cwd=ROOT, env=_env(), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 900
        while not [r for r in read_records(run_dir / "metrics.jsonl") if r.get("stage") == "ppo"]:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "driver.log").read_text()[-3000:]
            time.sleep(0.2)
        learners = sorted(_learner_pids(proc.pid))  # this run's: other tests' runs have learners too
        assert len(learners) == 2
        os.kill(learners[-1], signal.SIGKILL)  # one host's learner, as the kernel's OOM killer would
        assert proc.wait(timeout=180) == 2, (tmp_path / "driver.log").read_text()[-4000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    output = (tmp_path / "driver.log").read_text()
    assert "learner" in output and "resume with cairl train --resume" in output and "Traceback" not in output
    for _ in range(40):  # no learner left behind once the nodes have stopped
        if not _learner_pids(proc.pid):
            break
        time.sleep(0.25)
    assert _learner_pids(proc.pid) == []

    resumed = multihost(tiny_model, tmp_path, *SAME_RUN)
    assert resumed.returncode == 0, resumed.stdout[-4000:] + resumed.stderr[-4000:]
    check_finished_run(run_dir)  # every stage ran, each prompt and (stage, step) once
    assert _rows(run_dir) == _rows(single_dir)
    want, got = _exported(single_dir), _exported(run_dir)
    assert want.keys() == got.keys()
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=1e-5, rtol=0, err_msg=name)

    topology = json.loads((run_dir / "run.json").read_text())["topology"]
    assert topology["jax_processes"] == 2 and topology["devices_per_process"] == 4 and topology["devices"] == 8
    assert topology["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2} and len(topology["hosts"]) == 2
    first = read_records(run_dir / "metrics.jsonl")[0]
    assert first["stage"] == "run" and first["run/jax_processes"] == 2 and first["run/mesh_tensor"] == 2
    assert json.loads((single_dir / "run.json").read_text())["topology"]["jax_processes"] == 1
    report = (run_dir / "report.md").read_text()
    assert "2 JAX process(es) × 4 cpu device(s) = 8 devices" in report and "Weight sync per PPO version" in report
    ppo = [r for r in read_records(run_dir / "metrics.jsonl") if r["stage"] == "ppo"]
    assert all(r["ppo/sync_bytes"] > 0 and r["ppo/sync_learner_seconds"] > 0 for r in ppo)
    assert not (run_dir / "driver.lock").exists()
