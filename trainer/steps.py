"""Jitted SFT and preference-model steps, `(state, batch) -> (state, metrics)`, plus shared plumbing.

Every step is compiled once with explicit shardings: the state by its parameters' logical axes,
every batch array split along its first (batch) axis by the rules' `batch` entry, metrics
replicated; the incoming state is donated (do not reuse it after the call).

Gradient accumulation splits the batch into `grad_accum_steps` micro-batches (row i of micro-batch
a is batch row i·A + a, which keeps every micro-batch evenly spread over the batch shards) and sums
their gradients; each micro-batch loss is normalised by the *whole* batch's token (or pair) count,
so the sum is exactly the full-batch gradient.

Batch formats (arrays; B rows, T positions; masks bool or {0,1}):
  SFT: tokens_BxT int32, attention_mask_BxT, loss_mask_BxT (1 on tokens to predict, i.e. response)
  RM:  chosen_tokens_BxT, chosen_mask_BxT, rejected_tokens_BxT, rejected_mask_BxT, p_chosen_B ∈ [0, 1]
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from models.sharding import MeshRules
from trainer import losses
from trainer.mesh import MeshError, batch_shards, check_batch
from trainer.state import TrainState, apply_update, split_dropout_key, state_shardings

Batch = dict[str, jax.Array]


def batch_sharding(mesh_rules: MeshRules) -> NamedSharding:
    """One sharding for every batch array: first axis over the rules' batch axes, the rest whole."""
    return mesh_rules.activation_sharding(("batch",))


def replicated(mesh_rules: MeshRules) -> NamedSharding:
    return NamedSharding(mesh_rules.mesh, PartitionSpec())


def constrain_batch(batch: Batch, mesh_rules: MeshRules) -> Batch:
    sharding = batch_sharding(mesh_rules)
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, sharding), batch)


def split_rows(batch: Batch, pieces: int) -> Batch:
    """[B, ...] -> [pieces, B/pieces, ...] with piece a holding rows a, a+pieces, a+2·pieces, ..."""
    def split(x):
        rows = x.shape[0] // pieces
        return jnp.swapaxes(x.reshape((rows, pieces) + x.shape[1:]), 0, 1)

    return jax.tree.map(split, batch)


def accumulate_gradients(loss_fn: Callable, params, batch: Batch, totals: dict, accum_steps: int,
                         mesh_rules: MeshRules, dropout_key: jax.Array | None = None):
    """Σ over micro-batches of (loss, aux, grads) of `loss_fn(params, micro_batch, totals, dropout_key)`.

    `loss_fn` must normalise by `totals` (whole-batch counts) so that the sums are whole-batch means.
    `dropout_key` (LoRA dropout; None without) is split into one key per micro-batch, so that equal-sized
    micro-batches do not share one mask.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if accum_steps == 1:
        (loss, aux), grads = grad_fn(params, batch, totals, dropout_key)
        return loss, aux, grads

    def body(carry, micro_and_key):
        micro, key = micro_and_key
        micro = constrain_batch(micro, mesh_rules)
        (loss, aux), grads = grad_fn(params, micro, totals, key)
        return jax.tree.map(jnp.add, carry, (loss, aux, grads)), None

    keys = None if dropout_key is None else jax.random.split(dropout_key, accum_steps)
    first = jax.tree.map(lambda x: x[0], split_rows(batch, accum_steps))
    first_key = None if keys is None else keys[0]
    zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(grad_fn, params, first, totals, first_key))
    (loss, aux), grads = zeros
    (loss, aux, grads), _ = jax.lax.scan(body, (loss, aux, grads), (split_rows(batch, accum_steps), keys))
    return loss, aux, grads


def check_accumulation(mesh_rules: MeshRules, batch_size: int, accum_steps: int, what: str) -> None:
    check_batch(mesh_rules, batch_size, what)
    if batch_size % (accum_steps * batch_shards(mesh_rules)):
        raise MeshError(
            f"{what} {batch_size} must be divisible by grad_accum_steps ({accum_steps}) × batch shards "
            f"({batch_shards(mesh_rules)})"
        )


def compile_step(step_fn, state: TrainState, mesh_rules: MeshRules):
    """jit `step_fn(state, batch)` with explicit shardings and the state donated."""
    shardings = state_shardings(state, mesh_rules)
    return jax.jit(
        step_fn,
        in_shardings=(shardings, batch_sharding(mesh_rules)),
        out_shardings=(shardings, replicated(mesh_rules)),
        donate_argnums=0,
    )


def _finish(state: TrainState, update_stats: dict, metrics: dict) -> tuple[TrainState, dict]:
    state = state.replace(step=state.step + 1)
    return state, {**metrics, **update_stats, "nonfinite_streak": state.nonfinite_streak, "step": state.step}


# ------------------------------------------------------------------------------------------- SFT


def token_logprobs_and_entropy(model, tokens_BxT, attention_mask_BxT) -> tuple[jax.Array, jax.Array]:
    """log π(tokens[t] | tokens[<t]) and the entropy of π(· | tokens[<t]) at every t (0 at t = 0), fp32 [B, T].

    The LM head runs on the T−1 positions that predict a token (slicing the hidden states, not the
    far larger logits)."""
    hidden_BxTxD, _ = model.hidden(tokens_BxT, attention_mask_BxT)
    logprob_BxT1, entropy_BxT1 = losses.logprobs_and_entropy(model.logits(hidden_BxTxD[:, :-1]), tokens_BxT[:, 1:])
    return losses.shift_right(logprob_BxT1), losses.shift_right(entropy_BxT1)


def sft_loss(params, state: TrainState, batch: Batch, totals: dict, dropout_key: jax.Array | None = None):
    model = state.model(params, dropout_key)
    logprob_BxT, _ = token_logprobs_and_entropy(model, batch["tokens_BxT"], batch["attention_mask_BxT"])
    nll = losses.masked_nll(logprob_BxT, batch["loss_mask_BxT"], totals["tokens"])
    return nll, {"nll": nll}


def make_sft_step(state: TrainState, mesh_rules: MeshRules):
    """Jitted `(state, batch) -> (state, metrics)` for supervised fine-tuning (masked token NLL).

    Metrics: loss, nll, tokens, grad_norm, skipped (1 if the update was not applied), nonfinite_streak, step.
    """
    accum = state.grad_accum_steps

    def step(state: TrainState, batch: Batch):
        batch = constrain_batch(batch, mesh_rules)
        check_accumulation(mesh_rules, batch["tokens_BxT"].shape[0], accum, "SFT batch size")
        totals = {"tokens": jnp.sum(batch["loss_mask_BxT"].astype(jnp.float32))}
        state, dropout_key = split_dropout_key(state)
        loss_fn = lambda p, b, t, k: sft_loss(p, state, b, t, k)  # noqa: E731
        loss, aux, grads = accumulate_gradients(loss_fn, state.params, batch, totals, accum, mesh_rules, dropout_key)
        state, update_stats = apply_update(state, grads, loss)
        return _finish(state, update_stats, {"loss": loss, **aux, "tokens": totals["tokens"]})

    return compile_step(step, state, mesh_rules)


# -------------------------------------------------------------------------------- preference model


def sequence_scores(model, tokens_BxT: jax.Array, mask_BxT: jax.Array) -> jax.Array:
    """ScalarModel output at each row's last real token: the preference score r(x, y), shape [B]."""
    values_BxT = model(tokens_BxT, mask_BxT)
    last_B = losses.last_token_index(mask_BxT)
    return jnp.take_along_axis(values_BxT, last_B[:, None], axis=1)[:, 0]


def rm_loss(params, state: TrainState, batch: Batch, totals: dict, dropout_key: jax.Array | None = None):
    model = state.model(params, dropout_key)
    chosen_B = sequence_scores(model, batch["chosen_tokens_BxT"], batch["chosen_mask_BxT"])
    rejected_B = sequence_scores(model, batch["rejected_tokens_BxT"], batch["rejected_mask_BxT"])
    loss_B = losses.bradley_terry_loss(chosen_B, rejected_B, batch["p_chosen_B"])
    agree_B, decided_B = losses.preference_agreement(chosen_B, rejected_B, batch["p_chosen_B"])
    n = totals["pairs"]
    loss = jnp.sum(loss_B) / n
    return loss, {"bt_loss": loss, "accuracy": losses.masked_mean(agree_B, decided_B, totals["decided"]),
                  "score_margin": jnp.sum(chosen_B - rejected_B) / n}


def _rm_totals(batch: Batch) -> dict:
    """Whole-batch counts the RM loss normalises by (so micro-batch sums are whole-batch means)."""
    p_B = batch["p_chosen_B"]
    return {"pairs": jnp.asarray(p_B.shape[0], jnp.float32), "decided": jnp.sum((p_B != 0.5).astype(jnp.float32))}


def make_rm_step(state: TrainState, mesh_rules: MeshRules):
    """Jitted `(state, batch) -> (state, metrics)` for the preference model (Bradley–Terry, soft labels).

    `state` holds a `models.llama.ScalarModel`. Metrics: loss, bt_loss, accuracy, score_margin,
    grad_norm, skipped, nonfinite_streak, step.
    """
    accum = state.grad_accum_steps

    def step(state: TrainState, batch: Batch):
        batch = constrain_batch(batch, mesh_rules)
        check_accumulation(mesh_rules, batch["p_chosen_B"].shape[0], accum, "RM batch size")
        totals = _rm_totals(batch)
        state, dropout_key = split_dropout_key(state)
        loss_fn = lambda p, b, t, k: rm_loss(p, state, b, t, k)  # noqa: E731
        loss, aux, grads = accumulate_gradients(loss_fn, state.params, batch, totals, accum, mesh_rules, dropout_key)
        state, update_stats = apply_update(state, grads, loss)
        return _finish(state, update_stats, {"loss": loss, **aux})

    return compile_step(step, state, mesh_rules)


def make_rm_eval(state: TrainState, mesh_rules: MeshRules):
    """Jitted `(state, batch) -> sums` for held-out evaluation without updating; the batch may carry
    `valid_B` (0 on padding rows). Sums over batches combine with `rm_eval_metrics`."""

    def evaluate(state: TrainState, batch: Batch):
        batch = constrain_batch(batch, mesh_rules)
        model = state.model()
        chosen_B = sequence_scores(model, batch["chosen_tokens_BxT"], batch["chosen_mask_BxT"])
        rejected_B = sequence_scores(model, batch["rejected_tokens_BxT"], batch["rejected_mask_BxT"])
        valid_B = batch.get("valid_B", jnp.ones_like(batch["p_chosen_B"])).astype(jnp.float32)
        agree_B, decided_B = losses.preference_agreement(chosen_B, rejected_B, batch["p_chosen_B"])
        return {"pairs": jnp.sum(valid_B), "decided": jnp.sum(decided_B * valid_B),
                "agree": jnp.sum(agree_B * decided_B * valid_B),
                "bt_loss": jnp.sum(losses.bradley_terry_loss(chosen_B, rejected_B, batch["p_chosen_B"]) * valid_B),
                "score_margin": jnp.sum((chosen_B - rejected_B) * valid_B)}

    return jax.jit(evaluate, in_shardings=(state_shardings(state, mesh_rules), batch_sharding(mesh_rules)),
                   out_shardings=replicated(mesh_rules))


def rm_eval_metrics(sums: list[dict]) -> dict:
    """Held-out metrics from `make_rm_eval` sums: accuracy over decided pairs (NaN if none: no pair
    has a right side), mean Bradley–Terry loss and mean score margin r_a − r_b over every pair."""
    total = {k: float(sum(float(s[k]) for s in sums)) for k in sums[0]}
    pairs = max(total["pairs"], 1.0)
    return {"accuracy": total["agree"] / total["decided"] if total["decided"] else float("nan"),
            "bt_loss": total["bt_loss"] / pairs, "score_margin": total["score_margin"] / pairs,
            "pairs": int(total["pairs"])}
