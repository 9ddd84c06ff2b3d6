"""Direct preference optimisation of the policy on AI-labelled pairs: DPO or IPO against a frozen reference.

No preference model and no sampling: each update reads B labelled pairs, computes the policy's
log-probability of both responses, and moves their implicit rewards r = β·(log π − log π_ref) apart
as the label says (trainer.losses.dpo_loss / ipo_loss). The reference log-probs never change, so the
learner computes them once per pair (`make_sequence_logprob_fn`) and they ride in the batch.

Batch (B pairs, T positions; masks bool or {0,1}):
  chosen_tokens_BxT, chosen_mask_BxT (attention), chosen_loss_mask_BxT (1 on the response's tokens),
  the same three for rejected, p_chosen_B ∈ [0, 1] (the AI label), ref_chosen_B, ref_rejected_B
  (the reference's sequence log-probs of each response).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from models.errors import UserError
from models.sharding import MeshRules
from trainer import losses
from trainer.distributed import gather_to_host, put_batch
from trainer.state import TrainState, apply_update, split_dropout_key, state_shardings
from trainer.steps import (Batch, _finish, accumulate_gradients, batch_sharding, check_accumulation, compile_step,
                           constrain_batch, replicated, token_logprobs_and_entropy)

DPO_BATCH_KEYS = ("chosen_tokens_BxT", "chosen_mask_BxT", "chosen_loss_mask_BxT", "rejected_tokens_BxT",
                  "rejected_mask_BxT", "rejected_loss_mask_BxT", "p_chosen_B", "ref_chosen_B", "ref_rejected_B")


class DPOConfigError(UserError, ValueError):
    """A DPO configuration that cannot work."""


@dataclasses.dataclass(frozen=True)
class DPOConfig:
    loss: Literal["dpo", "ipo"] = "dpo"  # sigmoid (DPO) or squared (IPO) preference loss
    beta: float = 0.1  # DPO's β (scale of the implicit reward); IPO's τ (regularisation toward the reference)
    # soft: the label probability is the target (conservative DPO: an AI label of 0.7 is not a certainty);
    # hard: the side the label prefers is certain (p → 1[p > ½]; a ½ label stays ½)
    targets: Literal["soft", "hard"] = "soft"

    def __post_init__(self):
        if self.loss not in ("dpo", "ipo"):
            raise DPOConfigError(f"dpo.loss must be 'dpo' or 'ipo', got {self.loss!r}")
        if self.targets not in ("soft", "hard"):
            raise DPOConfigError(f"dpo.targets must be 'soft' or 'hard', got {self.targets!r}")
        if not self.beta > 0:
            raise DPOConfigError(f"dpo.beta must be > 0, got {self.beta}")


def label_targets(config: DPOConfig, p_chosen_B: jax.Array) -> jax.Array:
    p = p_chosen_B.astype(jnp.float32)
    if config.targets == "soft":
        return p
    return jnp.where(p > 0.5, 1.0, jnp.where(p < 0.5, 0.0, 0.5))


def preference_loss(config: DPOConfig, policy_chosen_B, policy_rejected_B, ref_chosen_B, ref_rejected_B, p_B):
    fn = losses.dpo_loss if config.loss == "dpo" else losses.ipo_loss
    return fn(policy_chosen_B, policy_rejected_B, ref_chosen_B, ref_rejected_B, label_targets(config, p_B), config.beta)


def sequence_logprobs(model, tokens_BxT, attention_mask_BxT, loss_mask_BxT) -> jax.Array:
    """log π(response | prompt) of each row: token log-probs summed over the loss mask, [B]."""
    logprob_BxT, _ = token_logprobs_and_entropy(model, tokens_BxT, attention_mask_BxT)
    return losses.sequence_logprob(logprob_BxT, loss_mask_BxT)


def _pair_terms(config: DPOConfig, model, batch: Batch) -> dict[str, jax.Array]:
    """Per pair: loss, policy log-probs, implicit rewards, and agreement with the label."""
    chosen_B = sequence_logprobs(model, batch["chosen_tokens_BxT"], batch["chosen_mask_BxT"],
                                 batch["chosen_loss_mask_BxT"])
    rejected_B = sequence_logprobs(model, batch["rejected_tokens_BxT"], batch["rejected_mask_BxT"],
                                   batch["rejected_loss_mask_BxT"])
    p_B = batch["p_chosen_B"]
    reward_chosen_B = losses.dpo_implicit_rewards(chosen_B, batch["ref_chosen_B"], config.beta)
    reward_rejected_B = losses.dpo_implicit_rewards(rejected_B, batch["ref_rejected_B"], config.beta)
    agree_B, decided_B = losses.preference_agreement(reward_chosen_B, reward_rejected_B, p_B)
    return {"loss_B": preference_loss(config, chosen_B, rejected_B, batch["ref_chosen_B"], batch["ref_rejected_B"], p_B),
            "chosen_B": chosen_B, "rejected_B": rejected_B, "margin_B": reward_chosen_B - reward_rejected_B,
            "agree_B": agree_B, "decided_B": decided_B}


def dpo_loss_fn(config: DPOConfig, params, state: TrainState, batch: Batch, totals: dict,
                dropout_key: jax.Array | None = None):
    terms = _pair_terms(config, state.model(params, dropout_key), batch)
    n = totals["pairs"]
    loss = jnp.sum(terms["loss_B"]) / n
    return loss, {"preference_loss": loss,
                  "accuracy": losses.masked_mean(terms["agree_B"], terms["decided_B"], totals["decided"]),
                  "margin": jnp.sum(terms["margin_B"]) / n,
                  "chosen_logprob": jnp.sum(terms["chosen_B"]) / n,
                  "rejected_logprob": jnp.sum(terms["rejected_B"]) / n}


def _totals(batch: Batch) -> dict:
    """Whole-batch counts the loss normalises by (micro-batch sums are then whole-batch means)."""
    p_B = batch["p_chosen_B"]
    return {"pairs": jnp.asarray(p_B.shape[0], jnp.float32), "decided": jnp.sum((p_B != 0.5).astype(jnp.float32))}


def make_dpo_step(state: TrainState, config: DPOConfig, mesh_rules: MeshRules):
    """Jitted `(state, batch) -> (state, metrics)`: one DPO/IPO update of the policy.

    Metrics: loss, preference_loss, accuracy (implicit reward agrees with the label, over decided
    pairs), margin (mean r_c − r_r), chosen_logprob and rejected_logprob (mean log π of each side),
    grad_norm, skipped, nonfinite_streak, step.
    """
    accum = state.grad_accum_steps

    def step(state: TrainState, batch: Batch):
        batch = constrain_batch({k: batch[k] for k in DPO_BATCH_KEYS}, mesh_rules)
        check_accumulation(mesh_rules, batch["p_chosen_B"].shape[0], accum, "DPO batch size")
        totals = _totals(batch)
        state, dropout_key = split_dropout_key(state)
        loss_fn = lambda p, b, t, k: dpo_loss_fn(config, p, state, b, t, k)  # noqa: E731
        loss, aux, grads = accumulate_gradients(loss_fn, state.params, batch, totals, accum, mesh_rules, dropout_key)
        state, update_stats = apply_update(state, grads, loss)
        return _finish(state, update_stats, {"loss": loss, **aux})

    return compile_step(step, state, mesh_rules)


def make_dpo_eval(state: TrainState, config: DPOConfig, mesh_rules: MeshRules):
    """Jitted `(state, batch) -> sums` on held-out pairs without updating; `valid_B` (0 on padding rows)
    may ride in the batch. Sums over batches combine with `dpo_eval_metrics`."""

    def evaluate(state: TrainState, batch: Batch):
        valid_B = batch.get("valid_B", jnp.ones_like(batch["p_chosen_B"])).astype(jnp.float32)
        batch = constrain_batch({k: batch[k] for k in DPO_BATCH_KEYS}, mesh_rules)
        terms = _pair_terms(config, state.model(), batch)
        return {"pairs": jnp.sum(valid_B), "decided": jnp.sum(terms["decided_B"] * valid_B),
                "agree": jnp.sum(terms["agree_B"] * terms["decided_B"] * valid_B),
                **{k: jnp.sum(terms[f"{k}_B"] * valid_B) for k in ("loss", "margin", "chosen", "rejected")}}

    return jax.jit(evaluate, in_shardings=(state_shardings(state, mesh_rules), batch_sharding(mesh_rules)),
                   out_shardings=replicated(mesh_rules))


def dpo_eval_metrics(sums: list[dict]) -> dict:
    """Held-out metrics from `make_dpo_eval` sums: implicit-reward accuracy over decided pairs (NaN if
    none), and per pair the mean loss, margin and chosen / rejected log-probs."""
    total = {k: float(sum(float(s[k]) for s in sums)) for k in sums[0]}
    pairs = max(total["pairs"], 1.0)
    return {"accuracy": total["agree"] / total["decided"] if total["decided"] else float("nan"),
            "loss": total["loss"] / pairs, "margin": total["margin"] / pairs,
            "chosen_logprob": total["chosen"] / pairs, "rejected_logprob": total["rejected"] / pairs,
            "pairs": int(total["pairs"])}


def make_sequence_logprob_fn(graphdef, mesh_rules: MeshRules):
    """Jitted `(params, tokens_BxT, attention_BxT, loss_mask_BxT) -> [B]` sequence log-probs of a frozen
    policy (the reference), batch-sharded like the steps."""
    from flax import nnx

    rows = batch_sharding(mesh_rules)
    return jax.jit(lambda params, t, a, m: sequence_logprobs(nnx.merge(graphdef, params), t, a, m),
                   in_shardings=(None, rows, rows, rows), out_shardings=rows)


def reference_logprobs(logprob_fn, params, tokens_NxT: np.ndarray, attention_NxT: np.ndarray,
                       loss_mask_NxT: np.ndarray, batch_size: int, mesh_rules: MeshRules) -> np.ndarray:
    """[N] sequence log-probs of every row by `logprob_fn` (`make_sequence_logprob_fn`), on every process.
    Rows go in batches of `batch_size` (one compiled shape; the last batch filled by wrapping around); each
    batch is split over the processes like a training batch (`put_batch`) and gathered back whole
    (`gather_to_host`), since with several processes each holds only its own shards of the result."""
    n = len(tokens_NxT)
    out = np.zeros((n,), np.float32)
    for start in range(0, n, batch_size):
        rows = np.arange(start, start + batch_size) % n
        batch = put_batch({"tokens": tokens_NxT[rows], "attention": attention_NxT[rows],
                           "loss_mask": loss_mask_NxT[rows]}, mesh_rules)
        values = gather_to_host(logprob_fn(params, batch["tokens"], batch["attention"], batch["loss_mask"]))
        out[start:start + batch_size] = np.asarray(values)[: n - start]
    return out
