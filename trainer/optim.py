"""AdamW with warmup + decay and global-norm clipping, from a typed config."""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import optax

from models.errors import UserError


class OptimizerConfigError(UserError, ValueError):
    """An optimizer configuration that cannot work."""


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    learning_rate: float = 1e-5  # peak learning rate, reached after warmup
    warmup_steps: int = 0  # linear warmup from 0 to learning_rate
    decay: Literal["cosine", "linear", "constant"] = "cosine"  # shape after warmup
    total_steps: int = 1000  # optimizer updates over which the decay runs (to final_lr_fraction)
    final_lr_fraction: float = 0.1  # learning rate at total_steps, as a fraction of the peak
    weight_decay: float = 0.0  # decoupled (AdamW) decay; applied to matrices only, not norms/biases
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0  # global-norm clip; None disables
    grad_accum_steps: int = 1  # micro-batches per update (the batch is split, gradients summed)

    def __post_init__(self):
        if self.learning_rate < 0:
            raise OptimizerConfigError(f"optimizer.learning_rate must be ≥ 0, got {self.learning_rate}")
        if self.decay not in ("cosine", "linear", "constant"):
            raise OptimizerConfigError(f"optimizer.decay must be cosine, linear or constant, got {self.decay!r}")
        if self.warmup_steps < 0 or self.total_steps <= 0:
            raise OptimizerConfigError("optimizer: warmup_steps must be ≥ 0 and total_steps > 0")
        if self.decay != "constant" and self.warmup_steps >= self.total_steps:
            raise OptimizerConfigError(
                f"optimizer.warmup_steps ({self.warmup_steps}) must be < total_steps ({self.total_steps})"
            )
        if not 0.0 <= self.final_lr_fraction <= 1.0:
            raise OptimizerConfigError(f"optimizer.final_lr_fraction must be in [0, 1], got {self.final_lr_fraction}")
        if not (0 <= self.b1 < 1 and 0 <= self.b2 < 1) or self.eps <= 0 or self.weight_decay < 0:
            raise OptimizerConfigError("optimizer: need 0 ≤ b1, b2 < 1, eps > 0 and weight_decay ≥ 0")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise OptimizerConfigError(f"optimizer.max_grad_norm must be > 0 or null, got {self.max_grad_norm}")
        if not isinstance(self.grad_accum_steps, int) or self.grad_accum_steps < 1:
            raise OptimizerConfigError(f"optimizer.grad_accum_steps must be ≥ 1, got {self.grad_accum_steps}")


def learning_rate_schedule(config: OptimizerConfig) -> optax.Schedule:
    peak, warmup = config.learning_rate, config.warmup_steps
    final = peak * config.final_lr_fraction
    decay_steps = max(config.total_steps - warmup, 1)
    if config.decay == "cosine":
        after = optax.cosine_decay_schedule(peak, decay_steps, alpha=config.final_lr_fraction)
    elif config.decay == "linear":
        after = optax.linear_schedule(peak, final, decay_steps)
    else:
        after = optax.constant_schedule(peak)
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def _decay_mask(params):
    # Decaying RMSNorm scales or scalar biases pulls them toward 0, which is never wanted.
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(config: OptimizerConfig) -> optax.GradientTransformation:
    adamw = optax.adamw(
        learning_rate_schedule(config), b1=config.b1, b2=config.b2, eps=config.eps,
        weight_decay=config.weight_decay, mask=_decay_mask,
    )
    if config.max_grad_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(config.max_grad_norm), adamw)
