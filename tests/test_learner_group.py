"""Learner and rollout resources in the run config, the learner group's placement, and the driver's watch
over a group (each call to every learner; one dead learner stops them all, named)."""

import os
import time
from pathlib import Path

import pytest

from trainer.config import load_run_config, ray_resource_options
from trainer.configlib import ConfigError
from trainer.learner_group import bundles, learner_options
from trainer.rollout import worker_options


def test_resources_reach_the_ray_actor_options(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("learner:\n  resources: {GPU: 1, memory: 1000000}\nrollout:\n  resources: {GPU: 0.25, TPU-v4-8-head: 1}\n")
    config = load_run_config(path)
    assert learner_options(config) == {"num_cpus": 0.5, "max_restarts": 0, "num_gpus": 1.0, "memory": 1000000.0}
    options = worker_options(config)
    assert options["num_gpus"] == 0.25 and options["resources"] == {"TPU-v4-8-head": 1.0}
    # A quarter of a GPU: a quarter of its memory (less CUDA's share), not JAX's default 75 %.
    assert options["runtime_env"] == {"env_vars": {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.225"}}
    assert ray_resource_options({}) == {}


@pytest.mark.parametrize("text, needle", [
    ("learner:\n  resources: {gpu: 1}\n", "learner.resources.gpu: Ray's resource is named 'GPU'"),
    ("rollout:\n  resources: {CPU: 2}\n", "rollout.resources.CPU: set the CPU share with rollout.num_cpus"),
    ("learner:\n  resources: {TPU: 0}\n", "learner.resources.TPU: expected an amount > 0"),
    ("learner:\n  resources: {GPU: 1.5}\n", "more than one GPU must be a whole number"),
    ("learner:\n  resources: {GPU: many}\n", "key 'learner.resources.GPU': expected a number"),
    ("learner:\n  resources: [GPU]\n", "key 'learner.resources': expected a mapping"),
    ("learner:\n  hosts: 0\n", "learner.hosts must be ≥ 1"),
])
def test_bad_resources_name_the_file_line_and_key(tmp_path, text, needle):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_run_config(path)
    assert needle in str(err.value) and f"{path}, line 2" in str(err.value)


def test_one_bundle_per_host_and_the_head_resource_on_the_first():
    config = load_run_config(None, ["learner.hosts=3", "learner.resources={TPU: 4}",
                                    "learner.head_resource=TPU-v4-24-head", "ray.learner_num_cpus=2"])
    assert bundles(config) == [{"CPU": 2.0, "TPU": 4.0, "TPU-v4-24-head": 1}, {"CPU": 2.0, "TPU": 4.0},
                               {"CPU": 2.0, "TPU": 4.0}]


def test_a_cluster_change_of_the_learner_group_may_resume(tmp_path):
    from trainer.pipeline import config_changes
    from trainer.configlib import to_dict

    before = to_dict(load_run_config(None))
    after = to_dict(load_run_config(None, ["learner.hosts=4", "learner.resources={GPU: 8}",
                                           "rollout.resources={GPU: 0.5}"]))
    assert config_changes(before, after) == []


# ------------------------------------------------------------------------------ the watch over a group (real Ray)


class Member:
    """A stand-in learner process: `collective` waits for every member like a JAX collective would."""

    def __init__(self, index: int, marks: str):
        self.index, self.marks = index, marks

    def collective(self, die: bool, transport_fails: bool = False) -> int:
        open(os.path.join(self.marks, f"called-{self.index}"), "w").close()
        deadline = time.time() + 120
        while time.time() < deadline and len(os.listdir(self.marks)) < 2:  # both members are in the call
            time.sleep(0.05)
        if die and self.index == 1:
            time.sleep(0.5 if transport_fails else 0)
            os._exit(1)  # the process dies, as a killed host would
        if die and transport_fails:  # a collective over TCP fails as soon as the peer's socket closes
            time.sleep(1.0)
            raise RuntimeError("Gloo AllGather failed: Connection closed by peer [127.0.0.1]:426")
        time.sleep(0.2 if not die else 120)  # with a dead peer, learner 0 would wait for it forever
        return self.index


def test_a_learner_killed_for_memory_is_explained_as_memory_not_a_traceback():
    """Ray's memory monitor kills the learner when the machine runs low (e.g. two runs on one machine): the
    driver's ray.get raises OutOfMemoryError, which is neither a task nor an actor error."""
    from trainer.ray_auth import private_token

    private_token()  # as the driver does before importing Ray, which reads the auth mode once
    import ray.exceptions as rex

    from trainer.health import LearnerError, LearnerWatch

    watch = LearnerWatch([object()], timeout_s=60, poll_s=60)  # no calls made: no Ray needed
    try:
        err = rex.OutOfMemoryError("1 worker(s) were killed due to the node running low on memory. Memory on "
                                   "the node was 22.29GB used / 23.59GB limit (0.945227)\nObject store ...")
        explained = watch.explain_failure(err)
        assert isinstance(explained, LearnerError)
        assert "ran out of memory (1 worker(s) were killed" in str(explained) and "--resume" in str(explained)
    finally:
        watch.stop_watching()


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    from trainer.ray_auth import private_token

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep Ray on 127.0.0.1
    private_token()
    import ray

    tests = Path(__file__).resolve().parent  # workers import Member from this module
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=str(tmp_path_factory.mktemp("ray")),
             _node_ip_address="127.0.0.1", runtime_env={"env_vars": {"PYTHONPATH": f"{tests}:{tests.parent}"}})
    yield ray
    ray.shutdown()


@pytest.mark.ray
def test_each_call_reaches_every_learner_and_returns_learner_0s_result(ray_cluster, tmp_path):
    from trainer.health import LearnerWatch

    actors = [ray_cluster.remote(Member).options(num_cpus=0.1).remote(i, str(tmp_path)) for i in range(2)]
    watch = LearnerWatch(actors, timeout_s=60)
    try:
        assert ray_cluster.get(watch.collective.remote(False), timeout=60) == 0
        assert sorted(os.listdir(tmp_path)) == ["called-0", "called-1"]
    finally:
        watch.stop_watching()
        for a in actors:
            ray_cluster.kill(a)


@pytest.mark.ray
def test_a_dead_learner_stops_the_group_and_is_named(ray_cluster, tmp_path):
    from trainer.health import LearnerError, LearnerWatch

    actors = [ray_cluster.remote(Member).options(num_cpus=0.1, max_restarts=0).remote(i, str(tmp_path))
              for i in range(2)]
    watch = LearnerWatch(actors, timeout_s=600, poll_s=0.1)
    start = time.monotonic()
    try:
        with pytest.raises(ray_cluster.exceptions.RayActorError) as err:
            ray_cluster.get(watch.collective.remote(True), timeout=60)  # learner 0 would wait 120 s
        assert time.monotonic() - start < 30
        assert sorted(os.listdir(tmp_path)) == ["called-0", "called-1"]  # both ran: learner 1 died in the call
        explained = watch.explain_failure(err.value)
        assert isinstance(explained, LearnerError) and "learner 1 of 2 failed in its collective call" in str(explained)
    finally:
        watch.stop_watching()


@pytest.mark.ray
def test_a_collective_broken_by_a_dead_learner_is_explained_by_the_death(ray_cluster, tmp_path):
    """Learner 0's own error (a transport error in a collective) arrives before the watcher sees the peer
    die: the run must still be stopped with the peer's death named, not the transport error's traceback."""
    from trainer.health import LearnerError, LearnerWatch

    actors = [ray_cluster.remote(Member).options(num_cpus=0.1, max_restarts=0).remote(i, str(tmp_path))
              for i in range(2)]
    watch = LearnerWatch(actors, timeout_s=600, poll_s=60)  # the watcher thread sees nothing in time
    try:
        with pytest.raises(ray_cluster.exceptions.RayTaskError) as err:
            ray_cluster.get(watch.collective.remote(True, True), timeout=60)
        assert watch.peer_failed is None
        explained = watch.explain_failure(err.value)
        assert isinstance(explained, LearnerError), explained
        assert "learner 1 of 2 failed in its collective call (ActorDiedError" in str(explained)
    finally:
        watch.stop_watching()
