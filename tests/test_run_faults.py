"""Faults met by a whole `cairl train` run on the tiny config, each injected where a user meets it:
SIGTERM / SIGINT to the driver (once and twice), SIGKILL inside the SL and RM stages, a learner that dies
or runs past its timeout, a run directory on a full disk — and a run repeated with one seed. Each test checks what was kept: checkpoints,
ledgers, one metric row per (stage, step), Ray shut down, and where the fault allows it, the same final
result as an uninterrupted run."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline_fixtures import NO_EVAL, NO_PERIODIC_SAVES, REFERENCE, ROOT, run_train, train_command
from test_pipeline import check_finished_run
from trainer.ledger import read_records

pytestmark = [pytest.mark.ray, pytest.mark.slow]

VOLATILE = ("time",)  # wall-clock fields; every other metric must repeat exactly


def _metric_rows(run_dir: Path) -> list[dict]:
    rows = read_records(run_dir / "metrics.jsonl")
    keys = [(r["stage"], r["step"]) for r in rows]
    assert len(keys) == len(set(keys)), keys  # one row per (stage, step)
    return rows


def _comparable(rows: list[dict]) -> dict:
    return {(r["stage"], r["step"]): {k: v for k, v in r.items() if k not in VOLATILE and not k.endswith(
        ("seconds", "tokens_per_s"))} for r in rows}


def _final_params(run_dir: Path) -> dict:
    from models import safetensors_io

    return safetensors_io.load(run_dir / "hf" / "model.safetensors")


class Run:
    """`cairl train` in its own session, so a test can signal the driver alone and then find any process
    it left behind."""

    def __init__(self, model_dir, runs_dir, *overrides):
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.log = Path(runs_dir) / f"driver-{time.monotonic_ns()}.log"
        Path(runs_dir).mkdir(parents=True, exist_ok=True)
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(train_command(model_dir, runs_dir, *overrides), cwd=ROOT, env=env,
                                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_for(self, condition, timeout=600):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return
            assert self.proc.poll() is None, f"the run ended before the fault point: {self.output()[-3000:]}"
            time.sleep(0.05)
        raise AssertionError("fault point never reached")

    def signal(self, signum):
        os.kill(self.proc.pid, signum)  # the driver only, as a scheduler or Ctrl-C on `kill PID` would

    def finish(self, timeout=300) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self._reap()

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def leftovers(self) -> list[str]:
        """Processes still in the run's session (Ray's GCS, raylet, workers) a few seconds after it ended."""
        for _ in range(40):
            found = subprocess.run(["ps", "-o", "pid=,args=", "-s", str(self.proc.pid)], capture_output=True,
                                   text=True).stdout.split("\n")
            found = [line for line in found if line.strip()]
            if not found:
                return []
            time.sleep(0.25)
        return found

    def _reap(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def _metric_steps(run_dir: Path, stage: str) -> list[int]:
    return [r["step"] for r in read_records(run_dir / "metrics.jsonl") if r.get("stage") == stage]


def _checkpoint_steps(run_dir: Path, stage: str) -> list[int]:
    directory = run_dir / "checkpoints" / stage
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.is_dir() else []


@pytest.fixture
def reference(reference_run):
    """The session's uninterrupted run (tests/conftest.py; NO_PERIODIC_SAVES, as the runs here): what every
    interrupted-and-resumed run must end equal to."""
    return reference_run.dir


def test_the_same_seed_twice_gives_identical_metrics_and_parameters(tiny_model, reference, tmp_path):
    run_train(tiny_model, tmp_path, *REFERENCE)  # the reference's very command, a second time
    assert _comparable(_metric_rows(tmp_path / "tiny")) == _comparable(_metric_rows(reference))
    want, got = _final_params(reference), _final_params(tmp_path / "tiny")
    assert want.keys() == got.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_sigterm_inside_ppo_checkpoints_exits_0_and_resume_ends_equal(tiny_model, reference, tmp_path):
    run_dir = tmp_path / "tiny"
    run = Run(tiny_model, tmp_path, NO_PERIODIC_SAVES)
    run.wait_for(lambda: len(_metric_steps(run_dir, "ppo")) >= 1)
    run.signal(signal.SIGTERM)
    assert run.finish() == 0, run.output()[-4000:]
    assert "stopped by SIGTERM" in run.output() and "--resume" in run.output()
    assert run.leftovers() == []  # Ray shut down
    stages = json.loads((run_dir / "stages.json").read_text())
    assert not stages.get("ppo", {}).get("done")
    saved = _checkpoint_steps(run_dir, "ppo")
    assert saved and saved[-1] == max(_metric_steps(run_dir, "ppo"))  # the signal's checkpoint, at the last step
    run_train(tiny_model, tmp_path, NO_PERIODIC_SAVES, f"--resume={run_dir}")
    check_finished_run(run_dir)
    assert _comparable(_metric_rows(run_dir)) == _comparable(_metric_rows(reference))
    want, got = _final_params(reference), _final_params(run_dir)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_colocated_run_killed_inside_ppo_resumes_and_ends_equal_to_separate_workers(tiny_model, reference,
                                                                                    tmp_path):
    """rollout.colocated: every stage's sampling, critique, labelling and evaluation runs inside the learner
    process on its own arrays. Killed (SIGKILL, driver and Ray) inside PPO and resumed, the run ends with the
    same samples, metrics and final policy, bit for bit, as the uninterrupted run with a rollout worker —
    and no weight sync (0 bytes)."""
    colocated = ("rollout.colocated=true", "rollout.num_workers=0")
    run_dir = tmp_path / "tiny"
    run = Run(tiny_model, tmp_path, *colocated)
    run.wait_for(lambda: len(_metric_steps(run_dir, "ppo")) >= 2)
    os.killpg(run.proc.pid, signal.SIGKILL)
    run.finish()
    assert not json.loads((run_dir / "stages.json").read_text()).get("ppo", {}).get("done")
    run_train(tiny_model, tmp_path, *colocated, f"--resume={run_dir}")
    _, metrics = check_finished_run(run_dir)

    def without_sync(rows):
        return {k: {m: v for m, v in row.items() if m != "ppo/sync_bytes"} for k, row in _comparable(rows).items()}

    assert without_sync(_metric_rows(run_dir)) == without_sync(_metric_rows(reference))
    assert [m["ppo/sync_bytes"] for m in metrics if m["stage"] == "ppo"] == [0, 0, 0]
    assert "Weight sync per PPO version: none" in (run_dir / "report.md").read_text()
    for name in ("sl.jsonl", "labels.jsonl", "rollouts.jsonl", "eval_before.jsonl", "eval_after.jsonl"):
        ours, theirs = (read_records(d / "samples" / name) for d in (run_dir, reference))
        assert {r["worker"] for r in ours} == {"learner"} and {r["worker"] for r in theirs} == {"worker-0"}
        assert ({r["uid"]: {**r, "worker": ""} for r in ours} == {r["uid"]: {**r, "worker": ""} for r in theirs}), name
    want, got = _final_params(reference), _final_params(run_dir)
    assert want.keys() == got.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_sigint_inside_sl_training_exits_130_then_a_second_sigterm_exits_at_once_and_the_run_resumes(tiny_model,
                                                                                                   tmp_path):
    """SIGINT inside SL training: the stage saved at its last step, exit 130, Ray shut down. The resumed run
    gets SIGTERM inside labelling and a second one while it stops: it exits at once (0), and the same command
    then finishes the run. (One run stopped twice: a run per signal would only repeat the run around them.)"""
    run_dir = tmp_path / "tiny"
    run = Run(tiny_model, tmp_path, NO_EVAL, NO_PERIODIC_SAVES)
    run.wait_for(lambda: len(_metric_steps(run_dir, "sl")) >= 1)
    run.signal(signal.SIGINT)
    assert run.finish() == 130, run.output()[-4000:]
    assert "stopped by SIGINT" in run.output() and "Traceback" not in run.output()
    assert run.leftovers() == []
    # Saved at the last step logged: step 1 when the signal beat the check after it, else step 2 (the last).
    assert _checkpoint_steps(run_dir, "sl") == [max(_metric_steps(run_dir, "sl"))]

    run = Run(tiny_model, tmp_path, NO_EVAL, f"--resume={run_dir}")
    run.wait_for(lambda: len(read_records(run_dir / "samples" / "labels.jsonl")) >= 2)
    assert json.loads((run_dir / "stages.json").read_text())["sl"]["done"]  # the SL that SIGINT stopped, resumed
    run.signal(signal.SIGTERM)
    run.wait_for(lambda: "saving a checkpoint at the next safe point" in run.output())  # two at once would merge
    run.signal(signal.SIGTERM)
    assert run.finish() == 0, run.output()[-4000:]
    assert "second SIGTERM: exiting now" in run.output()
    run_train(tiny_model, tmp_path, NO_EVAL)
    check_finished_run(run_dir, evaluated=False)


def _kill_after_first_step(tiny_model, runs_dir, stage):
    """SIGKILL the run (driver and Ray) once `stage` has logged step 1, with no checkpoint since its step 0,
    and tear the metrics line the kill was writing."""
    run_dir = runs_dir / "tiny"
    run = Run(tiny_model, runs_dir, NO_EVAL, NO_PERIODIC_SAVES)
    run.wait_for(lambda: len(_metric_steps(run_dir, stage)) >= 1)
    os.killpg(run.proc.pid, signal.SIGKILL)
    run.finish()
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"stage": "' + stage + '", "step": 2, "tor')


def test_killed_inside_sl_then_rm_training_leaves_one_metric_row_per_step(tiny_model, tmp_path):
    """Killed after SL's step 1, resumed and killed again after RM's step 1, resumed to the end: each
    resumed stage logs step 1 again, and metrics.jsonl and TensorBoard keep one row per step. (One run
    killed twice: a kill per stage in two runs would only repeat the run around them.)"""
    run_dir = tmp_path / "tiny"
    _kill_after_first_step(tiny_model, tmp_path, "sl")
    _kill_after_first_step(tiny_model, tmp_path, "rm")  # the run it kills resumed SL first
    stages = json.loads((run_dir / "stages.json").read_text())
    assert stages["sl"]["done"] and not stages.get("rm", {}).get("done")
    run_train(tiny_model, tmp_path, NO_EVAL)
    check_finished_run(run_dir, evaluated=False)
    rows = _metric_rows(run_dir)
    assert [r["step"] for r in rows if r["stage"] == "sl"] == [1, 2]
    assert [r["step"] for r in rows if r["stage"] == "rm"] == [1, 2]
    assert [r["step"] for r in rows if r["stage"] == "rm_eval"] == [0, 2]
    from tb_events import scalar_events

    for stage in ("sl", "rm"):
        events = [(tag, step) for tag, step, _ in scalar_events(run_dir / "tb") if tag.startswith(f"{stage}/loss")]
        assert sorted(events) == [(f"{stage}/loss", 1), (f"{stage}/loss", 2)], stage


@pytest.fixture
def small_disk(tmp_path):
    """A 24 MB tmpfs mounted for the test (a real file system that fills up), or a skip where mounting is
    not allowed."""
    mount = tmp_path / "disk"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()[:200]}); needs root or CAP_SYS_ADMIN")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_while_checkpointing_stops_clearly_and_the_run_resumes(tiny_model, small_disk):
    """SL done, then the disk fills: the preference model's first checkpoint cannot be written. The run stops
    with one clear message (exit 2, no traceback from the driver), SL's state intact; with space freed the
    same command resumes and finishes, each (stage, step) once."""
    run_dir = small_disk / "tiny"
    run_train(tiny_model, small_disk, NO_EVAL, "run.stages=[sl]")
    free_kb = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize // 1024
    ballast = small_disk / "ballast"
    with ballast.open("wb") as f:  # leave 400 kB: metric lines fit, a checkpoint of the preference model does not
        for _ in range(free_kb - 400):
            f.write(b"\0" * 1024)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(train_command(tiny_model, small_disk, NO_EVAL), cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("cairl train: error: no space left writing checkpoint step 1") and "--resume" in last
    assert "checkpoints/rm" in last and "no earlier step of it" in last
    assert not any(line.startswith("Traceback") for line in proc.stderr.splitlines())  # the driver's own output
    stages = json.loads((run_dir / "stages.json").read_text())
    assert stages["sl"]["done"] and stages["label"]["done"] and not stages.get("rm", {}).get("done")
    assert [p.name for p in (run_dir / "checkpoints" / "sl-params").iterdir()] == ["2"]
    ballast.unlink()
    run_train(tiny_model, small_disk, NO_EVAL)
    check_finished_run(run_dir, evaluated=False)
    _metric_rows(run_dir)  # one row per (stage, step)


def _learner_pids(session: int) -> list[int]:
    """The Ray learner actors in a driver's session (`start_new_session`): other tests' runs may be going too."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if (proc.name.isdigit() and (proc / "cmdline").read_bytes().startswith(b"ray::Learner")
                    and os.getsid(int(proc.name)) == session):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def test_learner_death_stops_the_run_with_a_clear_error_and_ray_shut_down(tiny_model, tmp_path):
    run_dir = tmp_path / "tiny"
    run = Run(tiny_model, tmp_path, NO_EVAL)
    run.wait_for(lambda: len(_metric_steps(run_dir, "sl")) >= 1 and _learner_pids(run.proc.pid))
    for pid in _learner_pids(run.proc.pid):
        os.kill(pid, signal.SIGKILL)  # out of memory, as the kernel does it
    assert run.finish() == 2, run.output()[-4000:]
    assert "the learner actor died" in run.output() and "Traceback" not in run.output()
    assert run.leftovers() == []


def test_a_learner_call_past_its_timeout_stops_the_run(tiny_model, tmp_path):
    run = Run(tiny_model, tmp_path, NO_EVAL, "ray.learner_timeout_s=0.5")  # a first-step compile takes longer
    assert run.finish() == 2, run.output()[-4000:]
    assert "past ray.learner_timeout_s = 0.5 s" in run.output() and "Traceback" not in run.output()
    assert run.leftovers() == []


def test_a_10000_token_prompt_is_truncated_the_same_way_in_every_stage(tiny_model, tmp_path):
    from test_run_inputs import LONG

    prompts = tmp_path / "prompts.jsonl"
    lines = [{"prompt": LONG + " the end", "uid": "long"}] + [{"prompt": f"how do i help {i}"} for i in range(12)]
    prompts.write_text("".join(json.dumps(line) + "\n" for line in lines))
    run_train(tiny_model, tmp_path / "runs", NO_EVAL, f"data.prompts=[{prompts}]", "data.ppo_prompts=4",
              "run.stages=[sl,label]")
    records = {r["uid"]: r for r in read_records(tmp_path / "runs" / "tiny" / "samples" / "sl.jsonl")}
    assert records["long"]["prompt"].endswith("the end") and len(records["long"]["prompt"]) < 1000
