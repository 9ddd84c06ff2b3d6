"""Rollout workers on a real local Ray cluster: exactly-once completion across a worker killed
mid-batch (os._exit), stale results dropped and re-dispatched, hung workers timed out, and the
real RolloutWorker sampling a tiny model at a published weight version; colocated, the learner as the
pool's one worker."""

import os
import tempfile
import time
from pathlib import Path

import pytest

from trainer.dispatch import WorkerPool
from trainer.ledger import Ledger, read_records
from models.sampling import SamplingParams
from trainer.rollout import RolloutSettings, Task, TaskResult
from trainer.weights import WeightHandle

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    tests = Path(__file__).resolve().parent
    # Workers import the fake actor classes from this test module.
    ray.init(address=None, _node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=2,
             _temp_dir=tempfile.mkdtemp(prefix="cr", dir="/tmp"),
             runtime_env={"env_vars": {"PYTHONPATH": f"{tests}:{tests.parent}"}})
    yield ray
    ray.shutdown()


class EchoWorker:
    """A process-boundary fake: returns one record per uid; dies (os._exit) on the first task that
    contains `die_on` while the marker file does not exist yet, so the restarted actor succeeds."""

    def __init__(self, marker: str, die_on: str = "", version_lag: int = 0, hang_on: str = ""):
        self.marker, self.die_on, self.version_lag, self.hang_on = marker, die_on, version_lag, hang_on
        self.calls = 0

    def run(self, task):
        self.calls += 1
        if self.die_on in task.uids and not os.path.exists(self.marker):
            Path(self.marker).write_text("died")
            time.sleep(0.2)  # mid-batch: some work done, nothing returned
            os._exit(1)
        if self.hang_on in task.uids and not os.path.exists(self.marker):
            Path(self.marker).write_text("hung")
            time.sleep(3600)
        version = task.weights.version - (self.version_lag if self.calls == 1 else 0)
        return TaskResult(version=version, records={u: {"echo": u, "pid": os.getpid()} for u in task.uids},
                          worker="echo")


def _pool(ray, tmp_path, n=2, timeout_s=60.0, max_staleness=1, **kwargs):
    actor = ray.remote(EchoWorker).options(num_cpus=0.1, max_restarts=2, max_task_retries=0)
    handles = [actor.remote(str(tmp_path / "marker"), **kwargs) for _ in range(n)]  # one death/hang in all
    return WorkerPool(handles, [f"w{i}" for i in range(n)], timeout_s, max_staleness, max_restarts=2)


def _run(pool, ledger, version=3):
    def make_task(uids):
        return Task("echo", tuple(uids), tuple(uids), WeightHandle(version, None), 0)

    return pool.run(ledger, make_task, lambda uid, rec, res: ledger.complete(uid, rec), lambda: version,
                    batch_size=3)


def test_worker_killed_mid_batch_every_uid_completed_exactly_once(ray_cluster, tmp_path):
    uids = [f"p{i}" for i in range(12)]
    ledger = Ledger.open(tmp_path / "s.jsonl", uids)
    pool = _pool(ray_cluster, tmp_path, die_on="p4")
    stats = _run(pool, ledger)
    records = read_records(tmp_path / "s.jsonl")
    assert sorted(r["uid"] for r in records) == sorted(uids)  # every uid once, none twice
    assert stats.worker_deaths >= 1 and stats.redispatched >= 3
    # Ray restarted the dead actor: every worker answers again.
    probe = Task("echo", ("x",), ("x",), WeightHandle(3, None), 0)
    assert all(_answer_when_up(ray_cluster, h, probe).records["x"]["echo"] == "x" for h in pool.handles)


def _answer_when_up(ray, handle, task, wait_s=120.0):  # a restart on a loaded machine: a new process
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return ray.get(handle.run.remote(task))
        except ray.exceptions.ActorUnavailableError:  # still restarting
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_stale_results_are_dropped_counted_and_redone(ray_cluster, tmp_path):
    uids = [f"p{i}" for i in range(6)]
    ledger = Ledger.open(tmp_path / "s.jsonl", uids)
    pool = _pool(ray_cluster, tmp_path, n=1, version_lag=2, max_staleness=1)
    stats = _run(pool, ledger)
    assert stats.stale_dropped == 3  # the first batch came back 2 versions old
    assert sorted(r["uid"] for r in read_records(tmp_path / "s.jsonl")) == sorted(uids)


def test_hung_worker_times_out_and_its_prompts_are_redispatched(ray_cluster, tmp_path):
    uids = [f"p{i}" for i in range(6)]
    ledger = Ledger.open(tmp_path / "s.jsonl", uids)
    pool = _pool(ray_cluster, tmp_path, n=1, hang_on="p0", timeout_s=3.0)
    stats = _run(pool, ledger)
    assert stats.timeouts == 1 and stats.worker_deaths >= 1
    assert sorted(r["uid"] for r in read_records(tmp_path / "s.jsonl")) == sorted(uids)


def test_real_worker_samples_at_the_published_version(ray_cluster, tmp_path):
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from pipeline_fixtures import write_tiny_model

    from models.sources import load_checkpoint
    from trainer.config import load_run_config
    from trainer.rollout import RolloutWorker
    from trainer.weights import publish

    model_dir = write_tiny_model(tmp_path / "tiny")
    config = load_run_config(Path(__file__).parents[1] / "configs" / "tiny.yaml", [f"model.source={model_dir}"])
    worker = ray_cluster.remote(RolloutWorker).options(num_cpus=0.5).remote(config, 0)
    settings = RolloutSettings(SamplingParams(max_new_tokens=6, temperature=0.0))
    task = Task("rollout", ("a", "b"), ("how do i help", "explain why"), WeightHandle(0, None), 1, settings)
    first = ray_cluster.get(worker.run.remote(task))
    assert first.version == 0 and set(first.records) == {"a", "b"}
    assert all(0 < len(r["response_ids"]) == len(r["logprobs"]) <= 6 for r in first.records.values())
    # Version 1: the same architecture with every weight scaled, published through the object store.
    flat = {p: a * 3.0 for p, a in load_checkpoint(str(model_dir)).params.items()}
    handle = publish(1, flat)
    second = ray_cluster.get(worker.run.remote(Task("rollout", ("a", "b"), task.texts, handle, 1, settings)))
    assert second.version == 1 and all(r["version"] == 1 for r in second.records.values())
    assert [second.records[u]["logprobs"] for u in "ab"] != [first.records[u]["logprobs"] for u in "ab"]


def test_real_worker_evaluation_tasks_follow_the_version_and_judge_with_the_base(ray_cluster, tmp_path):
    """`reply` and `options` tasks (evaluation inside cairl train): the policy scores at the task's weight
    version, exactly as a local scorer on those weights; the judge keeps the base model's weights."""
    import sys

    import numpy as np

    sys.path.insert(0, str(Path(__file__).parent))
    from pipeline_fixtures import write_tiny_model

    from models.sources import build_llama, load_checkpoint
    from trainer.config import load_run_config
    from trainer.eval.workers import OptionSettings, ReplySettings
    from trainer.feedback import LlamaOptionScorer
    from trainer.rollout import RolloutWorker
    from trainer.weights import publish

    model_dir = write_tiny_model(tmp_path / "tiny")
    config = load_run_config(Path(__file__).parents[1] / "configs" / "tiny.yaml", [f"model.source={model_dir}"])
    worker = ray_cluster.remote(RolloutWorker).options(num_cpus=0.5).remote(config, 0)
    contexts, options = ("Is this fine? Answer:", "Pick one:"), {"a": (" yes", " no"), "b": (" (A)", " (B)")}
    checkpoint = load_checkpoint(str(model_dir))
    scaled = {p: a * 3.0 for p, a in checkpoint.params.items()}
    handle = publish(1, scaled)

    def scores(target, weights):
        task = Task("options", ("a", "b"), contexts, weights, 0, OptionSettings(target, options))
        result = ray_cluster.get(worker.run.remote(task))
        assert result.version == weights.version
        return np.array([result.records[u]["logprobs"] for u in "ab"])

    def local(params):
        scorer = LlamaOptionScorer(build_llama(checkpoint.config, params), checkpoint.tokenizer)
        return np.stack([scorer.score([c], [list(options[u])])[0] for c, u in zip(contexts, "ab")])

    np.testing.assert_allclose(scores("policy", WeightHandle(0, None)), local(checkpoint.params), atol=1e-4)
    np.testing.assert_allclose(scores("policy", handle), local(scaled), atol=1e-4)
    np.testing.assert_allclose(scores("judge", handle), local(checkpoint.params), atol=1e-4)
    reply = ray_cluster.get(worker.run.remote(Task("reply", ("a",), ("how do i help",), handle, 0, ReplySettings(4))))
    assert reply.version == 1 and isinstance(reply.records["a"]["reply"], str)


def test_colocated_tasks_go_to_the_learner_whose_death_stops_the_run(ray_cluster, tmp_path):
    """rollout.colocated: the pool's one worker is the learner actor, through the driver's LearnerWatch; the
    learner dying mid-task is not retried elsewhere but stops the run as a LearnerError, the batches done
    before it kept in the ledger."""
    from trainer.config import load_run_config
    from trainer.health import LearnerError, LearnerWatch
    from trainer.pipeline import _worker_pool

    config = load_run_config(None, ["rollout.colocated=true", "rollout.num_workers=0"])
    learner = ray_cluster.remote(EchoWorker).options(num_cpus=0.1, max_restarts=0).remote(
        str(tmp_path / "marker"), die_on="p4")
    watch = LearnerWatch([learner], timeout_s=60)
    try:
        pool = _worker_pool(config, [], watch)
        ledger = Ledger.open(tmp_path / "s.jsonl", [f"p{i}" for i in range(6)])
        with pytest.raises(Exception) as err:
            _run(pool, ledger)  # batches of 3: p0-p2, then p3-p5 kills the learner
        assert isinstance(watch.explain_failure(err.value), LearnerError)
        assert sorted(r["uid"] for r in read_records(tmp_path / "s.jsonl")) == ["p0", "p1", "p2"]
        assert pool.names == ["learner"] and pool.stats.worker_deaths == 0 and pool.stats.redispatched == 0
    finally:
        watch.stop_watching()
