"""Process-wide JAX settings for every cairl process (driver-side learner, rollout workers)."""

from __future__ import annotations

import os
from pathlib import Path


def configure_jax() -> None:
    """Persistent compilation cache (a re-run or a restarted worker skips XLA compiles) and fp32 matmuls on CPU."""
    import jax

    cache = Path(os.environ.get("CAIRL_CACHE") or Path.home() / ".cache" / "cairl") / "jax-compile"
    cache.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
