"""Group-relative RL for RL-CAI without a value model: GRPO (and Dr. GRPO) and RLOO.

Each prompt is answered G times at one weight version (a group); the preference model scores every
response, and a response's advantage is its score relative to the rest of its group
(losses.group_advantages) — the group replaces PPO's value model. One jitted call does the update:
  1. group advantages from the scores (rows i·G … i·G+G−1 are prompt i's group); groups whose
     scores are all equal give 0 and are counted
  2. `epochs` full-batch updates of the clipped token-level objective with the k3 KL to the
     reference in the loss (losses.group_policy_loss), each with gradient accumulation and the
     non-finite guard of `trainer.state.apply_update`.
Length normalisation: the batch's response-token count, or for Dr. GRPO the constant
rows × max_new_tokens (no bias toward long or short wrong answers).

Batch (B = prompts × G rows, group-major; per-token arrays aligned as in losses.py): tokens_BxT,
attention_mask_BxT, response_mask_BxT, old_logprobs_BxT (rollout policy), ref_logprobs_BxT, scores_B.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from models.errors import UserError
from models.sharding import MeshRules
from trainer import losses
from trainer.state import TrainState, apply_update, split_dropout_key, state_shardings
from trainer.steps import (Batch, accumulate_gradients, batch_sharding, check_accumulation, constrain_batch,
                           replicated, token_logprobs_and_entropy)

GROUP_BATCH_KEYS = ("tokens_BxT", "attention_mask_BxT", "response_mask_BxT", "old_logprobs_BxT", "ref_logprobs_BxT",
                    "scores_B")
ALGORITHMS = ("grpo", "rloo")


class GroupConfigError(UserError, ValueError):
    """A group-relative RL configuration that cannot work."""


@dataclasses.dataclass(frozen=True)
class GroupConfig:
    group_size: int = 4  # responses per prompt (G), sampled at one weight version
    dr_grpo: bool = False  # grpo: Dr. GRPO — advantages not divided by the group's std, no length normalisation
    clip_ratio: float = 0.2  # ε of the clipped objective
    kl_coef: float = 0.04  # β of the k3 KL(π ‖ π_ref) term in the loss
    epochs: int = 1  # full-batch updates per rollout batch

    def __post_init__(self):
        if self.group_size < 2:
            raise GroupConfigError(f"ppo.group.group_size must be ≥ 2 (a group needs others to compare with), got "
                                   f"{self.group_size}")
        if not 0 < self.clip_ratio < 1:
            raise GroupConfigError(f"ppo.group.clip_ratio must be in (0, 1), got {self.clip_ratio}")
        if self.kl_coef < 0 or self.epochs < 1:
            raise GroupConfigError(f"ppo.group.kl_coef ≥ 0 and ppo.group.epochs ≥ 1 expected, got {self.kl_coef}, "
                                   f"{self.epochs}")


@struct.dataclass
class GroupState:
    """What GRPO / RLOO carry between updates (and checkpoint): the policy alone."""

    policy: TrainState


def advantage_kind(algorithm: str, config: GroupConfig) -> str:
    if algorithm == "rloo":
        return "rloo"
    return "dr_grpo" if config.dr_grpo else "grpo"


def group_loss(params, state: TrainState, config: GroupConfig, mb: Batch, totals: dict,
               dropout_key: jax.Array | None = None):
    logprob_BxT, entropy_BxT = token_logprobs_and_entropy(state.model(params, dropout_key), mb["tokens_BxT"],
                                                          mb["attention_mask_BxT"])
    mask = mb["response_mask_BxT"]
    loss, stats = losses.group_policy_loss(logprob_BxT, mb["old_logprobs_BxT"], mb["ref_logprobs_BxT"],
                                           mb["advantages_B"], mask, config.clip_ratio, config.kl_coef,
                                           totals["denominator"])
    entropy = losses.masked_mean(jax.lax.stop_gradient(entropy_BxT), mask, totals["tokens"])  # a metric only
    return loss, {**stats, "entropy": entropy}


def group_update(algorithm: str, config: GroupConfig, max_new_tokens: int, mesh_rules: MeshRules, state: GroupState,
                 batch: Batch) -> tuple[GroupState, dict]:
    """The un-jitted update (see the module docstring); `make_group_step` compiles it."""
    batch = constrain_batch({k: batch[k] for k in GROUP_BATCH_KEYS}, mesh_rules)
    rows, group = batch["scores_B"].shape[0], config.group_size
    if rows % group:
        raise GroupConfigError(f"batch of {rows} responses is not whole groups of ppo.group.group_size = {group}")
    check_accumulation(mesh_rules, rows, state.policy.grad_accum_steps, "GRPO/RLOO batch (prompts × group_size)")
    advantages_NxG, degenerate_N = losses.group_advantages(batch["scores_B"].reshape(rows // group, group),
                                                           advantage_kind(algorithm, config))
    batch = {**batch, "advantages_B": advantages_NxG.reshape(rows)}
    mask = batch["response_mask_BxT"]
    tokens = jnp.sum(mask.astype(jnp.float32))
    # Dr. GRPO divides by a constant, so a token's weight does not depend on its response's length.
    denominator = jnp.asarray(rows * max_new_tokens, jnp.float32) if config.dr_grpo and algorithm == "grpo" else tokens
    totals = {"tokens": tokens, "denominator": denominator}

    def epoch(policy: TrainState, _):
        policy, dropout_key = split_dropout_key(policy)
        loss, aux, grads = accumulate_gradients(lambda p, b, t, k: group_loss(p, policy, config, b, t, k),
                                                policy.params, batch, totals, policy.grad_accum_steps, mesh_rules,
                                                dropout_key)
        policy, update_stats = apply_update(policy, grads, loss)
        return policy, {"loss": loss, **aux, "grad_norm": update_stats["grad_norm"],
                        "policy_skipped": update_stats["skipped"]}

    policy, per_epoch = jax.lax.scan(epoch, state.policy, None, length=config.epochs)
    metrics = {k: jnp.mean(v) for k, v in per_epoch.items()}
    metrics["policy_skipped"] = metrics["skipped"] = jnp.sum(per_epoch["policy_skipped"])
    kl_BxT = losses.kl_estimate(batch["old_logprobs_BxT"], batch["ref_logprobs_BxT"], "k3")
    policy = policy.replace(step=policy.step + 1)
    metrics.update(
        kl=jnp.mean(jnp.sum(jnp.where(mask.astype(bool), kl_BxT, 0.0), axis=1)),  # k3 per sequence, at rollout
        score=jnp.mean(batch["scores_B"]), degenerate_groups=jnp.sum(degenerate_N),
        advantage_abs_mean=jnp.mean(jnp.abs(batch["advantages_B"])),
        response_length=jnp.mean(jnp.sum(mask.astype(jnp.float32), axis=1)),
        nonfinite_streak=policy.nonfinite_streak, step=policy.step)
    return GroupState(policy=policy), metrics


def make_group_step(state: GroupState, algorithm: str, config: GroupConfig, max_new_tokens: int,
                    mesh_rules: MeshRules):
    """Jitted `(group_state, batch) -> (group_state, metrics)` with explicit shardings, state donated.

    Metrics (means over the epochs unless noted): loss, policy_loss, kl_ref (k3 to the reference, per
    token, in the loss), entropy, clip_fraction, approx_kl, grad_norm, skipped / policy_skipped
    (updates not applied), and per batch: kl (k3 per sequence at rollout), score, degenerate_groups
    (groups with all scores equal: zero advantage), advantage_abs_mean, response_length,
    nonfinite_streak, step.
    """
    if algorithm not in ALGORITHMS:
        raise GroupConfigError(f"unknown group-relative algorithm {algorithm!r}; expected one of {ALGORITHMS}")
    shardings = state_shardings(state, mesh_rules)
    return jax.jit(
        lambda s, b: group_update(algorithm, config, max_new_tokens, mesh_rules, s, b),
        in_shardings=(shardings, batch_sharding(mesh_rules)),
        out_shardings=(shardings, replicated(mesh_rules)),
        donate_argnums=0,
    )
