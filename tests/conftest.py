"""Test session set-up: 8 fake CPU devices, so every sharding path runs without accelerators.

XLA_FLAGS must be set before JAX is imported anywhere, hence at the very top of conftest.
"""

import os
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


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """The pipeline tests' tiny model directory (tests/pipeline_fixtures.py), written once per session."""
    from pipeline_fixtures import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="session")
def reference_run(tiny_model, tmp_path_factory):
    """One whole, uninterrupted, evaluated `cairl train` of configs/tiny.yaml (pipeline_fixtures.REFERENCE), run
    once per session: test_pipeline.py checks what it leaves, test_run_faults.py compares interrupted-and-resumed
    runs and a second run of the same seed with it. Read it, never write into it (copy it first)."""
    from pipeline_fixtures import REFERENCE, run_train

    runs = tmp_path_factory.mktemp("reference")
    proc = run_train(tiny_model, runs, *REFERENCE)
    return FinishedRun(runs / "tiny", proc.stderr)


@dataclass(frozen=True)
class FinishedRun:
    dir: Path
    stderr: str  # the driver's progress bars and log
