"""Kill `cairl train` (SIGKILL) between stages and inside the PPO stage, resume, and check the
finished run is whole and consistent: every stage done once, every prompt uid and every PPO
iteration recorded exactly once, PPO continued from its checkpoint."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from pipeline_fixtures import NO_EVAL, ROOT, run_train, train_command
from test_pipeline import check_finished_run
from trainer.ledger import read_records

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def start_and_kill_when(model_dir, runs_dir, condition, *overrides, timeout=600):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(train_command(model_dir, runs_dir, *overrides), cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if condition():
                os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray processes it started
                proc.wait()
                return
            assert proc.poll() is None, "the run finished before the kill point"
            time.sleep(0.05)
        raise AssertionError("kill point never reached")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _stages(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "stages.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def test_killed_between_stages_then_resumed(tiny_model, tmp_path):
    run_dir = tmp_path / "tiny"
    start_and_kill_when(tiny_model, tmp_path, lambda: _stages(run_dir).get("label", {}).get("done"), NO_EVAL)
    assert _stages(run_dir)["sl"]["done"]
    labels_before = read_records(run_dir / "samples" / "labels.jsonl")
    run_train(tiny_model, tmp_path, NO_EVAL)
    check_finished_run(run_dir, evaluated=False)
    assert read_records(run_dir / "samples" / "labels.jsonl") == labels_before  # not redone


def test_killed_inside_ppo_then_resumed(tiny_model, tmp_path):
    run_dir = tmp_path / "tiny"

    def after_two_ppo_iterations():
        steps = [m["step"] for m in read_records(run_dir / "metrics.jsonl") if m.get("stage") == "ppo"]
        return len(steps) >= 2

    start_and_kill_when(tiny_model, tmp_path, after_two_ppo_iterations)
    assert not _stages(run_dir).get("ppo", {}).get("done")
    checkpoints = sorted(int(p.name) for p in (run_dir / "checkpoints" / "ppo").iterdir() if p.name.isdigit())
    assert checkpoints and checkpoints[-1] >= 1  # PPO had checkpointed inside the stage
    run_train(tiny_model, tmp_path, f"--resume={run_dir}")
    stages, metrics = check_finished_run(run_dir)
    # The resumed PPO restored its β and step: iteration numbers continue, none repeated.
    assert [m["step"] for m in metrics if m["stage"] == "ppo"] == [1, 2, 3]
