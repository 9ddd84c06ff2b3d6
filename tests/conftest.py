"""Test session set-up: 8 fake CPU devices, so every sharding path runs without accelerators.

XLA_FLAGS must be set before JAX is imported anywhere, hence at the very top of conftest.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from trainer.runtime import set_cpu_xla_flags  # noqa: E402

set_cpu_xla_flags()  # the same XLA:CPU settings as a cairl process

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


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
