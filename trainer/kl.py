"""The KL penalty coefficient β: fixed, or adaptive toward a target KL (Ziegler et al. 2019, §2.2).

The controller's state is one fp32 scalar carried in the PPO train state, so it is checkpointed and
updated inside the jitted step like everything else.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp

from models.errors import UserError


class KLConfigError(UserError, ValueError):
    """A KL-penalty configuration that cannot work."""


@dataclasses.dataclass(frozen=True)
class KLConfig:
    kind: Literal["adaptive", "fixed"] = "adaptive"  # adaptive: β follows the target KL; fixed: β constant
    beta: float = 0.05  # initial (or fixed) penalty coefficient
    target: float = 6.0  # adaptive: target KL per sequence (nats, summed over response tokens)
    horizon: int = 10000  # adaptive: number of sequences over which β may change by e^(±0.2)
    estimator: Literal["k1", "k3"] = "k1"  # per-token KL estimator used in the reward

    def __post_init__(self):
        if self.kind not in ("adaptive", "fixed"):
            raise KLConfigError(f"kl.kind must be 'adaptive' or 'fixed', got {self.kind!r}")
        if self.estimator not in ("k1", "k3"):
            raise KLConfigError(f"kl.estimator must be 'k1' or 'k3', got {self.estimator!r}")
        if self.beta < 0:
            raise KLConfigError(f"kl.beta must be ≥ 0, got {self.beta}")
        if self.kind == "adaptive" and (self.target <= 0 or self.horizon <= 0):
            raise KLConfigError(f"adaptive kl needs target > 0 and horizon > 0, got {self.target}, {self.horizon}")


def initial_beta(config: KLConfig) -> jax.Array:
    return jnp.asarray(config.beta, jnp.float32)


def update_beta(config: KLConfig, beta: jax.Array, observed_kl: jax.Array, num_sequences: int) -> jax.Array:
    """Adaptive:  e = clip(KL / KL_target − 1, −0.2, 0.2),   β ← β · (1 + e · n / horizon)
    where KL is the mean per-sequence KL of the batch and n the number of sequences in it.
    A non-finite KL (a batch whose update was skipped as non-finite) leaves β unchanged: a NaN
    here would otherwise stay in β, and in every reward after it, for the rest of the run.
    Fixed: β unchanged."""
    if config.kind == "fixed":
        return beta
    error = jnp.clip(observed_kl / config.target - 1.0, -0.2, 0.2)
    updated = (beta * (1.0 + error * num_sequences / config.horizon)).astype(jnp.float32)
    return jnp.where(jnp.isfinite(observed_kl), updated, beta)
