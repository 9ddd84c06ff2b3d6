"""Process-wide JAX settings for every cairl process (driver-side learner, rollout workers)."""

from __future__ import annotations

import os


# XLA:CPU in jaxlib 0.10 hands whole elementwise + reduction fusions to YNNPACK by default, and
# those run 5-10x slower than XLA's own loops: the softmax over a 49k vocabulary took a third of a
# SmolLM2 PPO update. Keeping YNNPACK to the matmuls it is good at makes that update ~10% faster.
# Only set for the jaxlib line it was measured on (an unknown flag aborts XLA) and only on CPU-only
# installs; a user's own XLA_FLAGS setting for it wins.
_CPU_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=individual_dot",)
_ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin", "libtpu")


def set_cpu_xla_flags() -> None:
    """Add _CPU_FLAGS to XLA_FLAGS; call before the process first touches a JAX device."""
    import importlib.metadata
    import importlib.util

    try:
        jaxlib_version = importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return
    if not jaxlib_version.startswith("0.10.") or any(importlib.util.find_spec(p) for p in _ACCELERATOR_PLUGINS):
        return
    flags = os.environ.get("XLA_FLAGS", "")
    added = [f for f in _CPU_FLAGS if f.split("=")[0] not in flags]
    if added:
        os.environ["XLA_FLAGS"] = " ".join([flags, *added]).strip()


def configure_jax() -> None:
    """Persistent compilation cache (a re-run or a restarted worker skips XLA compiles) and fp32 matmuls on CPU."""
    set_cpu_xla_flags()
    import jax

    from models.fetch import cache_root

    cache = cache_root() / "jax-compile"
    cache.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
