"""Run-state files under faults: torn metric lines, steps logged again after a resume, TensorBoard as a
view of metrics.jsonl, durable replaces, and a disk that refuses a write."""

import json
import os
import resource
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from models.errors import UserError
from tb_events import scalar_events
from trainer.durable import DiskFullError, append_line, write_atomic
from trainer.ledger import read_records
from trainer.metrics import MetricsLog
from trainer.pipeline_state import StageRecord

ROOT = Path(__file__).resolve().parents[1]


def _rows(path: Path) -> list[tuple[str, int]]:
    return [(r["stage"], r["step"]) for r in read_records(path)]


def test_torn_metrics_tail_is_cut_on_open_and_later_rows_survive(tmp_path):
    log = MetricsLog(tmp_path, tensorboard=False)
    log.write("sl", 1, {"loss": 2.0})
    log.close()
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"stage": "sl", "step": 2, "sl/lo')  # killed mid-write
    log = MetricsLog(tmp_path, tensorboard=False)
    log.write("sl", 2, {"loss": 1.5})
    log.write("sl", 3, {"loss": 1.0})
    assert _rows(tmp_path / "metrics.jsonl") == [("sl", 1), ("sl", 2), ("sl", 3)]


def test_a_resumed_stage_logging_old_steps_again_leaves_one_row_each_in_jsonl_and_tensorboard(tmp_path):
    log = MetricsLog(tmp_path)
    for step in (1, 2, 3):
        log.write("sl", step, {"loss": 3.0 - step})
    log.write("rm_eval", 0, {"accuracy": 0.5})
    log.write("rm", 1, {"loss": 0.7})
    log.close()
    # Killed after rm step 1; rm resumes from its step-0 checkpoint and sl from its step-2 one (a kill inside sl
    # in another run): both log their steps again.
    log = MetricsLog(tmp_path)
    log.write("sl", 3, {"loss": 0.25})
    log.write("rm_eval", 0, {"accuracy": 0.5})
    log.write("rm", 1, {"loss": 0.6})
    log.write("rm", 2, {"loss": 0.5})
    log.close()
    rows = _rows(tmp_path / "metrics.jsonl")
    assert sorted(rows) == sorted({("sl", 1), ("sl", 2), ("sl", 3), ("rm_eval", 0), ("rm", 1), ("rm", 2)})
    assert read_records(tmp_path / "metrics.jsonl")[2]["sl/loss"] == 0.25
    events = Counter((tag, step) for tag, step, _ in scalar_events(tmp_path / "tb"))
    assert set(events.values()) == {1}, events
    assert set(events) == {("sl/loss", 1), ("sl/loss", 2), ("sl/loss", 3), ("rm_eval/accuracy", 0),
                           ("rm/loss", 1), ("rm/loss", 2)}
    assert dict(((t, s), v) for t, s, v in scalar_events(tmp_path / "tb"))[("rm/loss", 1)] == pytest.approx(0.6)


def test_tensorboard_rows_past_the_record_are_dropped_on_reopen(tmp_path):
    log = MetricsLog(tmp_path)
    log.write("ppo", 1, {"kl": 0.1})
    log.write("ppo", 2, {"kl": 0.2})
    log.close()
    log = MetricsLog(tmp_path)
    log.truncate("ppo", 1)  # PPO resumed from iteration 1
    log.close()
    assert [(t, s) for t, s, _ in scalar_events(tmp_path / "tb")] == [("ppo/kl", 1)]


def test_write_atomic_replaces_and_leaves_no_temporary(tmp_path):
    StageRecord(tmp_path).update("sl", done=True)
    StageRecord(tmp_path).update("label", pairs=3)
    assert json.loads((tmp_path / "stages.json").read_text()) == {"label": {"pairs": 3}, "sl": {"done": True}}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stages.json"]


def _limited(limit_bytes: int, code: str) -> subprocess.CompletedProcess:
    """Run `code` in a child whose file-size limit is `limit_bytes` (EFBIG past it: a full disk, as a process sees it)."""
    limit = f"import resource\nresource.setrlimit(resource.RLIMIT_FSIZE, ({limit_bytes}, {limit_bytes}))\n"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"}
    return subprocess.run([sys.executable, "-c", limit + code], env=env, capture_output=True, text=True, timeout=120,
                          cwd=ROOT)


def test_disk_full_while_writing_metrics_is_a_clear_error_and_the_file_stays_whole(tmp_path):
    code = f"""
from trainer.metrics import MetricsLog
from trainer.durable import DiskFullError
log = MetricsLog({str(tmp_path)!r}, tensorboard=False)
try:
    for step in range(1, 10000):
        log.write("sl", step, {{"loss": 1.0 / step, "grad_norm": 2.0}})
except DiskFullError as err:
    print("DISK FULL", err)
"""
    done = _limited(4000, code)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "DISK FULL" in done.stdout and "metrics.jsonl" in done.stdout and "--resume" in done.stdout
    data = (tmp_path / "metrics.jsonl").read_bytes()
    assert data.endswith(b"\n") and len(data) <= 4000
    steps = [s for _, s in _rows(tmp_path / "metrics.jsonl")]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) > 10
    # Space back: the run continues where the record ends.
    log = MetricsLog(tmp_path, tensorboard=False)
    log.write("sl", len(steps) + 1, {"loss": 0.0})
    assert [s for _, s in _rows(tmp_path / "metrics.jsonl")][-2:] == [len(steps), len(steps) + 1]


def test_disk_full_in_append_line_and_write_atomic_keeps_the_old_content(tmp_path):
    target = tmp_path / "stages.json"
    write_atomic(target, "{}\n")
    code = f"""
from pathlib import Path
from trainer.durable import DiskFullError, append_line, write_atomic
for call in (lambda: write_atomic(Path({str(target)!r}), "x" * 10000),
             lambda: append_line(Path({str(tmp_path / 'r.jsonl')!r}), "y" * 10000 + "\\n")):
    try:
        call()
    except DiskFullError as err:
        print("DISK FULL", err)
"""
    done = _limited(1000, code)
    assert done.stdout.count("DISK FULL") == 2, done.stderr[-2000:]
    assert target.read_text() == "{}\n" and (tmp_path / "r.jsonl").read_bytes() == b""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.jsonl", "stages.json"]
    assert issubclass(DiskFullError, UserError)  # the CLI's exit 2 with the message, no traceback
    append_line(tmp_path / "r.jsonl", "ok\n")
    assert (tmp_path / "r.jsonl").read_text() == "ok\n"


def test_resume_compares_the_whole_resolved_config_and_the_constitution(tmp_path):
    from trainer.config import load_run_config
    from trainer.pipeline import RunDirError, prepare_run_dir

    base = [f"run.runs_dir={tmp_path}", "run.name=r"]
    run_dir = prepare_run_dir(load_run_config(None, base), resume=False, constitution_hash="a" * 64)
    # Stage lengths, the stages to run and how the run executes may change.
    grown = load_run_config(None, [*base, "ppo.iterations=20", "run.stages=[sl,label]", "ray.num_cpus=4",
                                   "rollout.num_workers=3", "checkpoint.every_steps=7"])
    assert prepare_run_dir(grown, resume=True, constitution_hash="a" * 64) == run_dir
    # An optimizer setting or the prompt split may not: every changed key is named, nothing is rewritten.
    saved = (run_dir / "config.yaml").read_text()
    edited = load_run_config(None, [*base, "ppo.policy_optimizer.max_grad_norm=null", "data.sl_prompts=3"])
    with pytest.raises(RunDirError) as err:
        prepare_run_dir(edited, resume=True, constitution_hash="a" * 64)
    assert "ppo.policy_optimizer.max_grad_norm: 1.0 → None" in str(err.value)
    assert "data.sl_prompts: 16 → 3" in str(err.value) and "ppo.iterations" in str(err.value)
    assert (run_dir / "config.yaml").read_text() == saved
    with pytest.raises(RunDirError, match="another constitution text"):
        prepare_run_dir(grown, resume=True, constitution_hash="b" * 64)


CHECKPOINT_RUN = """
import sys
import jax.numpy as jnp
import numpy as np
from trainer.checkpoint import CheckpointConfig, Checkpointer
from trainer.durable import DiskFullError
step = int(sys.argv[1])
noise = np.random.default_rng(step).standard_normal((64, 64), dtype=np.float32)  # incompressible: 16 KB on disk
state = {{"w": jnp.asarray(noise), "step": jnp.int32(step)}}
ckpt = Checkpointer({directory!r}, CheckpointConfig(every_steps=1, keep=3, async_save={async_save}))
restored = ckpt.restore(state)
print("RESTORED", None if restored is None else restored[1])
try:
    ckpt.save(step, state, {{"step": step}})
    ckpt.close()
    print("SAVED", step)
except DiskFullError as err:
    print("DISK FULL", err)
"""


@pytest.mark.parametrize("async_save", [pytest.param(False, marks=pytest.mark.slow), True])
def test_disk_full_while_saving_a_checkpoint_keeps_the_previous_one_and_resume_works(tmp_path, async_save):
    code = CHECKPOINT_RUN.format(directory=str(tmp_path / "ckpt"), async_save=async_save)
    first = _limited(resource.RLIM_INFINITY, code.replace("sys.argv[1]", "1"))
    assert "SAVED 1" in first.stdout, first.stderr[-3000:]
    full = _limited(8000, code.replace("sys.argv[1]", "2"))  # the 16 KB array no longer fits
    assert "RESTORED {'step': 1}" in full.stdout and "DISK FULL" in full.stdout, (full.stdout, full.stderr[-3000:])
    assert "checkpoint step 2" in full.stdout and "newest intact step: 1" in full.stdout and "--resume" in full.stdout
    assert "Traceback" not in full.stdout
    again = _limited(resource.RLIM_INFINITY, code.replace("sys.argv[1]", "2"))  # space freed: resume
    assert "RESTORED {'step': 1}" in again.stdout and "SAVED 2" in again.stdout, again.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["1", "2"]
