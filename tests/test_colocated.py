"""rollout.colocated: the rollout worker's code running inside the learner process on the learner's own
arrays (trainer.weights.LiveWeights), the config rules of the mode, and the GPU memory split of processes
that share a GPU. The whole pipeline in colocated mode, killed and resumed, is in tests/test_run_faults.py."""

import sys
from pathlib import Path

import pytest

from models.sampling import SamplingParams
from trainer.config import load_run_config, ray_resource_options
from trainer.configlib import ConfigError
from trainer.rollout import RolloutSettings, Task
from trainer.weights import WeightHandle

ROOT = Path(__file__).resolve().parents[1]
COLOCATED = ["rollout.colocated=true", "rollout.num_workers=0"]


@pytest.mark.parametrize("text, needle", [
    ("rollout:\n  colocated: true\n", "key 'rollout.num_workers': rollout.colocated: true runs the rollout tasks "
                                      "in the learner process and starts no rollout workers: set rollout.num_workers: 0"),
    ("rollout:\n  num_workers: 0\n", "key 'rollout.num_workers': rollout.num_workers: 0 leaves nothing to sample "
                                     "with; start ≥ 1 workers, or set rollout.colocated: true"),
    ("rollout:\n  colocated: true\n  num_workers: 0\n  resources: {GPU: 0.5}\n",
     "key 'rollout.resources': rollout.colocated: true starts no rollout workers"),
    ("rollout:\n  colocated: true\n  num_workers: 0\nlearner:\n  hosts: 2\n",
     "key 'rollout': rollout.colocated: true samples inside the one learner process of a single-host run, but "
     "learner.hosts = 2"),
    ("learner:\n  memory_fraction: 0.5\n", "key 'learner.memory_fraction': learner.memory_fraction sets the share "
                                           "of a GPU's memory JAX takes in the process, but learner.resources asks "
                                           "for no GPU"),
    ("learner:\n  resources: {GPU: 1}\n  memory_fraction: 1.5\n", "learner.memory_fraction: expected a fraction in "
                                                                   "(0, 1], got 1.5"),
    ("learner:\n  resources: {GPU: 0.5}\n  memory_fraction: 0.6\nrollout:\n  num_workers: 2\n"
     "  resources: {GPU: 0.25}\n",
     "GPU memory split: one GPU may hold the learner (0.5 GPU, memory fraction 0.600: learner.memory_fraction) and 2 "
     "rollout worker(s) (0.25 GPU each, memory fraction 0.225: rollout.memory_fraction), 1.050 of its memory"),
    ("rollout:\n  num_workers: 4\n  resources: {GPU: 0.25}\n  memory_fraction: 0.3\n",
     "one GPU may hold 4 rollout worker(s) (0.25 GPU each, memory fraction 0.300"),
])
def test_settings_that_cannot_work_name_the_file_line_and_key(tmp_path, text, needle):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_run_config(path)
    assert needle in str(err.value) and f"{path}, line " in str(err.value)


def test_the_gpu_memory_split_reaches_each_process():
    from trainer.learner_group import learner_options
    from trainer.rollout import worker_options

    # One GPU: the learner takes half of it and 0.6 of its memory, two workers a quarter and 0.2 each.
    config = load_run_config(None, ["learner.resources={GPU: 0.5}", "learner.memory_fraction=0.6",
                                    "rollout.num_workers=2", "rollout.resources={GPU: 0.25}",
                                    "rollout.memory_fraction=0.2"])
    assert learner_options(config)["runtime_env"] == {"env_vars": {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.600"}}
    assert worker_options(config)["runtime_env"] == {"env_vars": {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.200"}}
    # Colocated on a whole GPU: one process, the fraction as set; unset, JAX's own default (no variable).
    config = load_run_config(None, [*COLOCATED, "learner.resources={GPU: 1}", "learner.memory_fraction=0.9"])
    assert learner_options(config)["runtime_env"] == {"env_vars": {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.900"}}
    assert "runtime_env" not in ray_resource_options({"GPU": 1}) and "runtime_env" not in ray_resource_options({"TPU": 4})


def test_a_run_may_resume_colocated_or_separate():
    from trainer.configlib import to_dict
    from trainer.pipeline import config_changes

    separate = to_dict(load_run_config(None))
    colocated = to_dict(load_run_config(None, [*COLOCATED, "learner.resources={GPU: 1}",
                                               "learner.memory_fraction=0.9"]))
    assert config_changes(separate, colocated) == [] and config_changes(colocated, separate) == []


@pytest.fixture(scope="module")
def colocated_learner(tmp_path_factory):
    sys.path.insert(0, str(Path(__file__).parent))
    from pipeline_fixtures import write_tiny_model

    from trainer.learner import Learner

    tmp = tmp_path_factory.mktemp("colocated")
    model_dir = write_tiny_model(tmp / "tiny")
    config = load_run_config(ROOT / "configs" / "tiny.yaml", [f"model.source={model_dir}", f"run.runs_dir={tmp}",
                                                              *COLOCATED])
    learner = Learner(config, str(tmp / "tiny"))
    learner.topology()  # raises what the learner met while starting
    yield learner
    learner.close()


def _rollout(learner, weights, seed=1):
    settings = RolloutSettings(SamplingParams(max_new_tokens=6, temperature=1.0))
    result = learner.run(Task("rollout", ("a", "b"), ("how do i help", "explain why"), weights, seed, settings))
    assert result.version == weights.version and result.worker == "learner"
    assert all(r["version"] == weights.version for r in result.records.values())
    return {u: (r["response_ids"], r["logprobs"]) for u, r in result.records.items()}


def test_the_learner_samples_in_process_on_its_own_arrays_at_the_version_it_offered(colocated_learner):
    import jax
    from flax import nnx

    learner = colocated_learner
    own = _rollout(learner, WeightHandle(0, None))  # the worker's initial weights, as a separate worker's
    handle = learner.publish(1)  # the policy entering label/PPO: here the initial model, on the learner's mesh
    assert handle.version == 1 and handle.ref is None and handle.nbytes == 0
    assert _rollout(learner, handle) == own  # the same weights, offered in place: the same samples

    # No copy: the sampler's model holds the very buffers the learner offered.
    offered = {p: v[...] for p, v in nnx.to_flat_state(learner.live.offered(1))}
    held = dict(nnx.to_flat_state(nnx.state(learner.worker._policy.model)))
    assert offered.keys() == held.keys()
    assert all(held[p][...].unsafe_buffer_pointer() == a.unsafe_buffer_pointer() for p, a in offered.items())

    # Another version: other samples; back to version 1: version 1's samples again.
    scaled = jax.tree.map(lambda a: a * 3.0, learner.live.offered(1))
    learner.live.offer(2, scaled)
    assert _rollout(learner, WeightHandle(2, None)) != own
    assert _rollout(learner, handle) == own

    with pytest.raises(ValueError, match="weights version 7 is not offered by the learner"):
        _rollout(learner, WeightHandle(7, None))
    next(iter(jax.tree.leaves(learner.live.offered(2)))).delete()  # as the next update's donation does
    with pytest.raises(ValueError, match="were donated to a later update"):
        _rollout(learner, WeightHandle(2, None))
    learner.live.clear()  # a new stage: only what it offers anew
    with pytest.raises(ValueError, match="weights version 1 is not offered by the learner"):
        _rollout(learner, handle)


def test_a_separate_learner_runs_no_rollout_tasks(tmp_path):
    from trainer.learner import Learner
    from trainer.learners.base import StageCallError

    learner = Learner.__new__(Learner)
    learner.worker = None
    with pytest.raises(StageCallError, match="only rollout.colocated: true does"):
        learner.run(Task("rollout", ("a",), ("hi",), WeightHandle(0, None), 0))


def test_the_report_says_no_weights_moved_when_colocated(tmp_path):
    from trainer import topology
    from trainer.metrics import MetricsLog

    log = MetricsLog(tmp_path, tensorboard=False)
    log.write("ppo", 1, {"sync_bytes": 0, "sync_learner_seconds": 0.0, "sync_seconds": 0.01, "sync_worker_seconds": 0.0})
    log.close()
    assert "Weight sync per PPO version: none — the sampler ran in the learner process" in "\n".join(
        topology.report_lines(tmp_path))


def test_arrays_sharded_over_the_learner_mesh_are_gathered_to_the_sampler_device(colocated_learner):
    """A learner mesh of several devices: the sampler gathers the offered arrays onto its own device
    (device to device) and samples exactly as from one device's copy."""
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    learner = colocated_learner
    single = learner.publish(1)
    want = _rollout(learner, single)
    mesh = Mesh(np.array(jax.devices()[:2]), ("x",))

    def shard(a):
        spec = PartitionSpec("x") if a.ndim and a.shape[0] % 2 == 0 else PartitionSpec()
        return jax.device_put(a, NamedSharding(mesh, spec))

    sharded = jax.tree.map(shard, learner.live.offered(1))
    assert any(len(a.sharding.device_set) == 2 for a in jax.tree.leaves(sharded))
    learner.live.offer(5, sharded)
    assert _rollout(learner, WeightHandle(5, None)) == want
