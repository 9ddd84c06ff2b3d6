"""The PPO update for RL-CAI: policy (`Llama`) and value (`ScalarModel`) trained on one rollout batch.

One jitted call does the whole update, in this order:
  1. per-token KL(π_rollout ‖ π_ref) with the configured estimator, and shaped rewards
     r_t = −β·KL_t (+ preference score on the last response token)           losses.shape_rewards
  2. GAE advantages and returns from the rollout's values                     losses.gae
  3. advantage whitening over the response tokens (optional)                  losses.whiten
  4. `epochs` passes over the batch, each shuffled (key from the policy state's RNG) and cut into
     `minibatches`; per minibatch one policy update (clipped surrogate − entropy bonus) and one
     value update (vf_coef · clipped value loss), each with gradient accumulation and the
     non-finite guard of `trainer.state.apply_update`
  5. β of the adaptive KL controller updated from the batch's mean per-sequence KL.
Steps 1–3 are also available alone as `compute_advantages` (pure, jittable).

Batch (B rows, T positions, per-token arrays aligned with the token they concern — see losses.py):
  tokens_BxT int32, attention_mask_BxT, response_mask_BxT (1 on generated tokens),
  old_logprobs_BxT (rollout policy), ref_logprobs_BxT (reference policy), old_values_BxT (value
  model at rollout time, `token_values`), scores_B (preference-model score of each response).
`steps.token_logprobs_and_entropy` / `token_values` compute the aligned arrays from a model with the same
convention.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from models.errors import UserError
from models.sharding import MeshRules
from trainer import kl as klmod
from trainer import losses
from trainer.kl import KLConfig
from trainer.state import TrainState, apply_update, split_dropout_key, state_shardings
from trainer.steps import (Batch, accumulate_gradients, batch_sharding, check_accumulation, constrain_batch,
                           replicated, split_rows, token_logprobs_and_entropy)

PPO_BATCH_KEYS = ("tokens_BxT", "attention_mask_BxT", "response_mask_BxT", "old_logprobs_BxT",
                  "ref_logprobs_BxT", "old_values_BxT", "scores_B")


class PPOConfigError(UserError, ValueError):
    """A PPO configuration that cannot work."""


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    clip_ratio: float = 0.2  # ε of the clipped surrogate
    dual_clip: float | None = None  # c > 1 bounds the loss of negative-advantage tokens; None disables
    value_clip: float | None = 0.2  # ε_v around the rollout value; None disables
    vf_coef: float = 0.5  # scale of the value loss (value has its own optimizer, so this scales its gradient)
    entropy_coef: float = 0.0  # bonus on the policy's mean token entropy
    gamma: float = 1.0  # discount per token
    lam: float = 0.95  # GAE λ
    whiten_advantages: bool = True  # normalise advantages over the batch's response tokens
    epochs: int = 1  # passes over each rollout batch
    target_kl: float | None = None  # stop a batch's epochs after one whose mean approximate KL exceeds this; None: all epochs
    minibatches: int = 1  # updates per pass
    kl: KLConfig = dataclasses.field(default_factory=KLConfig)  # KL penalty in the reward

    def __post_init__(self):
        if not 0 < self.clip_ratio < 1:
            raise PPOConfigError(f"ppo.clip_ratio must be in (0, 1), got {self.clip_ratio}")
        if self.dual_clip is not None and self.dual_clip <= 1:
            raise PPOConfigError(f"ppo.dual_clip must be > 1 or null, got {self.dual_clip}")
        if self.value_clip is not None and self.value_clip <= 0:
            raise PPOConfigError(f"ppo.value_clip must be > 0 or null, got {self.value_clip}")
        if not 0 <= self.gamma <= 1 or not 0 <= self.lam <= 1:
            raise PPOConfigError(f"ppo.gamma and ppo.lam must be in [0, 1], got {self.gamma}, {self.lam}")
        if self.vf_coef < 0 or self.entropy_coef < 0:
            raise PPOConfigError("ppo.vf_coef and ppo.entropy_coef must be ≥ 0")
        if self.target_kl is not None and self.target_kl <= 0:
            raise PPOConfigError(f"ppo.update.target_kl must be > 0 or null, got {self.target_kl}")
        if self.epochs < 1 or self.minibatches < 1:
            raise PPOConfigError(f"ppo.epochs and ppo.minibatches must be ≥ 1, got {self.epochs}, {self.minibatches}")


@struct.dataclass
class PPOState:
    """Everything PPO carries between updates (and checkpoints): both models and the KL coefficient."""

    policy: TrainState
    value: TrainState
    beta: jax.Array  # fp32 scalar: current KL penalty coefficient


def create_ppo_state(policy: TrainState, value: TrainState, kl_config: KLConfig) -> PPOState:
    beta = jax.device_put(klmod.initial_beta(kl_config), replicated_like(policy))
    return PPOState(policy=policy, value=value, beta=beta)


def abstract_ppo_state(policy: TrainState, value: TrainState) -> PPOState:
    """PPO state of ShapeDtypeStructs from two `abstract_train_state`s, for `Checkpointer.restore`."""
    beta = jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated_like(policy))
    return PPOState(policy=policy, value=value, beta=beta)


def replicated_like(state: TrainState):
    mesh = jax.tree.leaves(state.params)[0].sharding.mesh
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


# ------------------------------------------------------------------------ model-side per-token arrays


def token_values(model, tokens_BxT, attention_mask_BxT) -> jax.Array:
    """V(tokens[<t]) aligned with token t: the value model's output at t−1 (0 at t = 0), fp32 [B, T]."""
    values_BxT = model(tokens_BxT, attention_mask_BxT)
    return jnp.pad(values_BxT[:, :-1], ((0, 0), (1, 0)))


# --------------------------------------------------------------------------------- advantages


def compute_advantages(config: PPOConfig, beta: jax.Array, batch: Batch) -> dict[str, jax.Array]:
    """Steps 1–3 above: KL, shaped rewards, GAE advantages (whitened if configured) and returns."""
    mask = batch["response_mask_BxT"]
    kl_BxT = losses.kl_estimate(batch["old_logprobs_BxT"], batch["ref_logprobs_BxT"], config.kl.estimator)
    rewards_BxT = losses.shape_rewards(batch["scores_B"], kl_BxT, mask, beta)
    advantages_BxT, returns_BxT = losses.gae(rewards_BxT, batch["old_values_BxT"], mask, config.gamma, config.lam)
    if config.whiten_advantages:
        advantages_BxT = losses.whiten(advantages_BxT, mask)
    return {"kl_BxT": kl_BxT * mask, "rewards_BxT": rewards_BxT, "advantages_BxT": advantages_BxT,
            "returns_BxT": returns_BxT}


# ------------------------------------------------------------------------------------ the losses


def policy_loss(params, state: TrainState, config: PPOConfig, mb: Batch, totals: dict,
                dropout_key: jax.Array | None = None):
    logprob_BxT, entropy_BxT = token_logprobs_and_entropy(state.model(params, dropout_key), mb["tokens_BxT"],
                                                          mb["attention_mask_BxT"])
    if config.entropy_coef == 0:
        # Only a metric then: without this its (zero-weighted) gradient still costs a full pass over
        # the B×T×V probabilities, XLA being unable to drop a product with 0.0 (NaN·0 is not 0).
        entropy_BxT = jax.lax.stop_gradient(entropy_BxT)
    mask, n = mb["response_mask_BxT"], totals["tokens"]
    surrogate_loss, stats = losses.ppo_policy_loss(logprob_BxT, mb["old_logprobs_BxT"], mb["advantages_BxT"], mask,
                                                   config.clip_ratio, config.dual_clip, n)
    entropy = losses.masked_mean(entropy_BxT, mask, n)
    loss = surrogate_loss - config.entropy_coef * entropy
    return loss, {"policy_loss": surrogate_loss, "entropy": entropy, **stats}


def value_loss(params, state: TrainState, config: PPOConfig, mb: Batch, totals: dict,
               dropout_key: jax.Array | None = None):
    values_BxT = token_values(state.model(params, dropout_key), mb["tokens_BxT"], mb["attention_mask_BxT"])
    loss, stats = losses.clipped_value_loss(values_BxT, mb["old_values_BxT"], mb["returns_BxT"],
                                            mb["response_mask_BxT"], config.value_clip, totals["tokens"])
    return config.vf_coef * loss, {"value_loss": loss, **stats}


# -------------------------------------------------------------------------------------- the step


def _minibatch_update(config: PPOConfig, mesh_rules: MeshRules, state: PPOState, mb: Batch):
    mb = constrain_batch(mb, mesh_rules)
    totals = {"tokens": jnp.sum(mb["response_mask_BxT"].astype(jnp.float32))}
    policy, p_dropout_key = split_dropout_key(state.policy)  # each minibatch update draws fresh LoRA masks
    value, v_dropout_key = split_dropout_key(state.value)
    p_loss, p_aux, p_grads = accumulate_gradients(
        lambda p, b, t, k: policy_loss(p, policy, config, b, t, k), policy.params, mb, totals,
        policy.grad_accum_steps, mesh_rules, p_dropout_key)
    v_loss, v_aux, v_grads = accumulate_gradients(
        lambda p, b, t, k: value_loss(p, value, config, b, t, k), value.params, mb, totals,
        value.grad_accum_steps, mesh_rules, v_dropout_key)
    policy, p_stats = apply_update(policy, p_grads, p_loss)
    value, v_stats = apply_update(value, v_grads, v_loss)
    metrics = {**p_aux, **v_aux, "policy_grad_norm": p_stats["grad_norm"], "value_grad_norm": v_stats["grad_norm"],
               "policy_skipped": p_stats["skipped"], "value_skipped": v_stats["skipped"]}
    return state.replace(policy=policy, value=value), metrics


def _epochs_with_kl_stop(epoch, state: PPOState, keys, target_kl: float):
    """Run `epoch(state, key)` per key until an epoch's mean approximate KL (to the rollout policy,
    losses.ppo_policy_loss) exceeds `target_kl`; later epochs are skipped (a `lax.cond`, their
    metrics zeros). Returns the state, per-update metrics [epochs, minibatches] and ran_E ∈ {0, 1}."""
    per_update_shape = jax.eval_shape(epoch, state, keys[0])[1]

    def one(carry, key):
        state, stopped = carry
        skip = lambda s: (s, jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), per_update_shape))  # noqa: E731
        state, per_update = jax.lax.cond(stopped, skip, lambda s: epoch(s, key), state)
        ran = (~stopped).astype(jnp.float32)
        stopped = stopped | (jnp.mean(per_update["approx_kl"]) > target_kl)
        return (state, stopped), (per_update, ran)

    (state, _), (per_update, ran_E) = jax.lax.scan(one, (state, jnp.asarray(False)), keys)
    return state, per_update, ran_E


def ppo_update(config: PPOConfig, mesh_rules: MeshRules, state: PPOState, batch: Batch) -> tuple[PPOState, dict]:
    """The un-jitted PPO update (see the module docstring); `make_ppo_step` compiles it."""
    batch = constrain_batch({k: batch[k] for k in PPO_BATCH_KEYS}, mesh_rules)
    batch_size = batch["tokens_BxT"].shape[0]
    mb_size = batch_size // config.minibatches
    if batch_size % config.minibatches:
        raise PPOConfigError(f"PPO batch size {batch_size} is not divisible by ppo.minibatches = {config.minibatches}")
    for role in (state.policy, state.value):
        check_accumulation(mesh_rules, mb_size, role.grad_accum_steps, "PPO minibatch size")

    adv = compute_advantages(config, state.beta, batch)
    batch = {**batch, "advantages_BxT": adv["advantages_BxT"], "returns_BxT": adv["returns_BxT"]}
    rng, shuffle_key = jax.random.split(state.policy.rng)
    state = state.replace(policy=state.policy.replace(rng=rng))

    def epoch(state, key):
        shuffled = batch
        if config.minibatches > 1:  # a single minibatch holds every row, in any order
            perm_B = jax.random.permutation(key, batch_size)
            shuffled = jax.tree.map(lambda x: jnp.take(x, perm_B, axis=0), batch)
        return jax.lax.scan(lambda s, mb: _minibatch_update(config, mesh_rules, s, mb), state,
                            split_rows(shuffled, config.minibatches))

    keys = jax.random.split(shuffle_key, config.epochs)
    if config.target_kl is None:
        state, per_update = jax.lax.scan(epoch, state, keys)
        metrics = {k: jnp.mean(v) for k, v in per_update.items()}
        metrics["epochs_run"] = jnp.asarray(config.epochs, jnp.float32)
    else:
        state, per_update, ran_E = _epochs_with_kl_stop(epoch, state, keys, config.target_kl)
        weight = ran_E[:, None] / (jnp.maximum(jnp.sum(ran_E), 1.0) * config.minibatches)
        metrics = {k: jnp.sum(v * weight) for k, v in per_update.items()}
        metrics["epochs_run"] = jnp.sum(ran_E)
    metrics["policy_skipped"] = jnp.sum(per_update["policy_skipped"])
    metrics["value_skipped"] = jnp.sum(per_update["value_skipped"])
    metrics["skipped"] = metrics["policy_skipped"] + metrics["value_skipped"]

    mask = batch["response_mask_BxT"]
    kl_per_sequence = jnp.sum(adv["kl_BxT"], axis=1)
    mean_kl = jnp.mean(kl_per_sequence)
    metrics.update(
        kl=mean_kl, beta=state.beta, score=jnp.mean(batch["scores_B"]),
        reward=jnp.mean(jnp.sum(adv["rewards_BxT"], axis=1)),
        returns=losses.masked_mean(adv["returns_BxT"], mask),
        explained_variance=losses.explained_variance(batch["old_values_BxT"], adv["returns_BxT"], mask),
        response_length=jnp.mean(jnp.sum(mask.astype(jnp.float32), axis=1)),
    )
    new_beta = klmod.update_beta(config.kl, state.beta, mean_kl, batch_size)
    policy = state.policy.replace(step=state.policy.step + 1)
    value = state.value.replace(step=state.value.step + 1)
    metrics.update(nonfinite_streak=jnp.maximum(policy.nonfinite_streak, value.nonfinite_streak), step=policy.step)
    return PPOState(policy=policy, value=value, beta=new_beta), metrics


def make_ppo_step(state: PPOState, config: PPOConfig, mesh_rules: MeshRules):
    """Jitted `(ppo_state, batch) -> (ppo_state, metrics)` with explicit shardings, state donated.

    Metrics (means over the epochs × minibatches updates unless noted): policy_loss, entropy,
    clip_fraction, approx_kl, value_loss, value_clip_fraction, policy/value_grad_norm,
    policy/value_skipped and skipped (counts of updates not applied), epochs_run (fewer than
    `epochs` when `target_kl` stopped them; means are over the epochs run), and per batch: kl (mean per-sequence KL to the reference),
    beta (used for this batch), score, reward, returns, explained_variance (rollout values vs
    returns), response_length, nonfinite_streak, step.
    """
    shardings = state_shardings(state, mesh_rules)
    return jax.jit(
        lambda s, b: ppo_update(config, mesh_rules, s, b),
        in_shardings=(shardings, batch_sharding(mesh_rules)),
        out_shardings=(shardings, replicated(mesh_rules)),
        donate_argnums=0,
    )


def make_frozen_fns(llama_graphdef, scalar_graphdef):
    """The RL stage's jitted functions of its frozen models, `(params, tokens_BxT, attention_mask_BxT)`:
    the reference policy's per-token log-probs [B, T] and the preference model's sequence scores [B].
    No explicit shardings: they run on the parameters' own placement."""
    from flax import nnx

    from trainer.steps import sequence_scores

    reference = jax.jit(lambda p, t, m: token_logprobs_and_entropy(nnx.merge(llama_graphdef, p), t, m)[0])
    scores = jax.jit(lambda p, t, m: sequence_scores(nnx.merge(scalar_graphdef, p), t, m))
    return reference, scores


def make_token_fn(state: TrainState, mesh_rules: MeshRules, kind: str):
    """Jitted `(train_state, tokens_BxT, attention_mask_BxT) -> [B, T]` aligned per-token arrays:
    kind 'logprobs' (policy or reference, a Llama) or 'values' (value model, a ScalarModel)."""
    fn = {"logprobs": lambda *a: token_logprobs_and_entropy(*a)[0], "values": token_values}[kind]
    return jax.jit(
        lambda s, tokens, mask: fn(s.model(), tokens, mask),
        in_shardings=(state_shardings(state, mesh_rules), batch_sharding(mesh_rules), batch_sharding(mesh_rules)),
        out_shardings=batch_sharding(mesh_rules),
    )
