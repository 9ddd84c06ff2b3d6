"""rollout.colocated: the config rules of the mode, and the GPU memory split of processes that share a GPU."""

import pytest

from trainer.config import load_run_config, ray_resource_options
from trainer.configlib import ConfigError

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
