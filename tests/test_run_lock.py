"""One driver per run directory (trainer/run_lock.py), with real processes holding and contending for the lock."""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.run_lock import LOCK_FILE, RunLock, RunLockedError

ROOT = Path(__file__).resolve().parents[1]

# Takes the lock, says so (or prints the refusal), then holds it until stdin closes.
HOLD = """
import sys
from trainer.run_lock import RunLock, RunLockedError
try:
    lock = RunLock.acquire(sys.argv[1])
except RunLockedError as err:
    print("REFUSED", err, flush=True)
    sys.exit(3)
print("HELD", flush=True)
sys.stdin.read()
lock.release()
"""


def _holder(run_dir: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture
def held(tmp_path):
    run_dir = tmp_path / "runs" / "r"
    proc = _holder(run_dir)
    assert proc.stdout.readline().strip() == "HELD", proc.stderr.read()
    yield run_dir, proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_a_second_driver_is_refused_naming_host_and_pid(held):
    run_dir, proc = held
    with pytest.raises(RunLockedError) as err:
        RunLock.acquire(run_dir)
    message = str(err.value)
    assert f"pid {proc.pid}" in message and socket.gethostname() in message and str(run_dir) in message
    assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] == proc.pid  # untouched

    proc.stdin.close()  # the holder finishes and releases: the directory is free again
    assert proc.wait(timeout=30) == 0
    assert not (run_dir / LOCK_FILE).exists()
    RunLock.acquire(run_dir).release()


def test_the_lock_of_a_killed_driver_is_taken_over(held):
    run_dir, proc = held
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] == proc.pid  # left behind by the dead driver
    lock = RunLock.acquire(run_dir)
    assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (run_dir / LOCK_FILE).exists()


def test_a_lock_from_another_host_is_never_taken_over(tmp_path):
    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": "node-7.example", "pid": 1, "started": 0}))
    with pytest.raises(RunLockedError, match=r"host node-7.example, pid 1\b.*delete .*driver.lock"):
        RunLock.acquire(tmp_path)


def test_drivers_starting_together_leave_exactly_one_holder(tmp_path):
    run_dir = tmp_path / "r"
    procs = [_holder(run_dir) for _ in range(4)]
    try:
        first = [p.stdout.readline().strip().split(" ", 1)[0] for p in procs]
        assert sorted(first) == ["HELD", "REFUSED", "REFUSED", "REFUSED"], first
        winner = procs[first.index("HELD")]
        assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] == winner.pid
    finally:
        for p in procs:
            if p.poll() is None:
                p.stdin.close()
                p.wait(timeout=30)


def test_cairl_train_on_a_held_run_dir_exits_2_and_writes_nothing(held, tmp_path):
    from pipeline_fixtures import write_tiny_model
    from test_config import _assert_clean_failure, _run_cli

    run_dir, proc = held
    model = write_tiny_model(tmp_path / "model")
    before = sorted(p.name for p in run_dir.iterdir())
    result = _run_cli(["train", "--config", str(ROOT / "configs" / "tiny.yaml"), f"model.source={model}",
                       f"run.runs_dir={run_dir.parent}", f"run.name={run_dir.name}"], tmp_path)
    _assert_clean_failure(result, "in use by another cairl train driver", f"pid {proc.pid}")
    assert sorted(p.name for p in run_dir.iterdir()) == before == [LOCK_FILE]
