"""Process-wide JAX settings for every cairl process (driver-side learner, rollout workers)."""

from __future__ import annotations

import os
from pathlib import Path


# XLA:CPU in jaxlib 0.10 hands whole elementwise + reduction fusions to YNNPACK by default, and
# those run 5-10x slower than XLA's own loops: the softmax over a 49k vocabulary took a third of a
# SmolLM2 PPO update. Keeping YNNPACK to the matmuls it is good at makes that update ~10% faster.
# Only set for the jaxlib line it was measured on (an unknown flag aborts XLA) and only on CPU-only
# installs; a user's own XLA_FLAGS setting for it wins.
_CPU_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=individual_dot",)
_ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin", "libtpu")


def accelerator_plugin_installed() -> bool:
    """Whether a TPU or GPU plugin is importable (XLA_FLAGS then reach more than XLA:CPU)."""
    import importlib.util

    return any(importlib.util.find_spec(p) for p in _ACCELERATOR_PLUGINS)


def set_cpu_xla_flags() -> None:
    """Add _CPU_FLAGS to XLA_FLAGS; call before the process first touches a JAX device."""
    import importlib.metadata

    try:
        jaxlib_version = importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return
    if not jaxlib_version.startswith("0.10.") or accelerator_plugin_installed():
        return
    flags = os.environ.get("XLA_FLAGS", "")
    added = [f for f in _CPU_FLAGS if f.split("=")[0] not in flags]
    if added:
        os.environ["XLA_FLAGS"] = " ".join([flags, *added]).strip()


def configure_jax() -> None:
    """Persistent compilation cache (a re-run or a restarted worker skips XLA compiles; in $CAIRL_JAX_CACHE, default
    $CAIRL_CACHE/jax-compile) and fp32 matmuls on CPU."""
    set_cpu_xla_flags()
    import jax

    from models.fetch import cache_root

    cache = Path(os.environ.get("CAIRL_JAX_CACHE") or cache_root() / "jax-compile")
    cache.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(cache))
    # Compiles under a second cost less than reading them back; JAX's own variable overrides that.
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      float(os.environ.get("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", 1.0)))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
