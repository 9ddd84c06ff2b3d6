"""The math of SFT, preference modelling and PPO as small pure functions.

Every per-token array is aligned with the token it concerns: for an action (a generated token) at
position t, `logprob_BxT[:, t] = log π(tokens[t] | tokens[<t])` and `value_BxT[:, t] = V(tokens[<t])`.
Position 0 never holds an action. Masks are {0, 1} floats or bools of the same shape.

Masked means take an optional `denominator`: gradient accumulation passes the token count of the
whole (mini)batch so that summing micro-batch gradients gives exactly the full-batch gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from models.sampling import logprobs_and_entropy  # noqa: F401 - the one implementation, used by the steps


def masked_sum(x: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.sum(jnp.where(mask.astype(bool), x, 0.0))


def masked_mean(x: jax.Array, mask: jax.Array, denominator: jax.Array | None = None) -> jax.Array:
    """mean_m(x) = Σ m·x / max(Σ m, 1)  (or / denominator when given)."""
    if denominator is None:
        denominator = jnp.sum(mask.astype(jnp.float32))
    return masked_sum(x, mask) / jnp.maximum(denominator, 1.0)


def masked_var(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Population variance over the masked entries: mean_m((x - mean_m(x))²)."""
    mean = masked_mean(x, mask)
    return masked_mean(jnp.square(x - mean), mask)


# --------------------------------------------------------------------------------------------- LM


def shift_right(x_BxT: jax.Array) -> jax.Array:
    """Prepend a 0 column: per-token values computed from the logits at t-1 line up with token t."""
    return jnp.pad(x_BxT, ((0, 0), (1, 0)))


def masked_nll(logprob_BxT: jax.Array, loss_mask_BxT: jax.Array, denominator=None) -> jax.Array:
    """Token-level negative log-likelihood: L = -Σ_t m_t log p(x_t | x_<t) / Σ_t m_t."""
    return masked_mean(-logprob_BxT, loss_mask_BxT, denominator)


# ---------------------------------------------------------------------------- preference model


def last_token_index(mask_BxT: jax.Array) -> jax.Array:
    """Index of the last real token of each row (works for left or right padding)."""
    positions_BxT = jnp.arange(mask_BxT.shape[1])[None, :]
    return jnp.max(jnp.where(mask_BxT.astype(bool), positions_BxT, 0), axis=1)


def bradley_terry_loss(score_chosen_B, score_rejected_B, p_chosen_B) -> jax.Array:
    """Bradley–Terry with soft labels, per pair.

    With Δ = r_c − r_r and label p = P(chosen ≻ rejected):
        L = −[p · log σ(Δ) + (1 − p) · log σ(−Δ)]
    (the cross-entropy between the label and the model's σ(Δ)). Returns loss_B.
    """
    delta = (score_chosen_B - score_rejected_B).astype(jnp.float32)
    p = p_chosen_B.astype(jnp.float32)
    return -(p * jax.nn.log_sigmoid(delta) + (1.0 - p) * jax.nn.log_sigmoid(-delta))


def preference_agreement(score_chosen_B, score_rejected_B, p_chosen_B) -> tuple[jax.Array, jax.Array]:
    """Does the preference model prefer the side the label prefers? Per pair (agree_B, decided_B):

        agree = 1[Δ > 0] if p > ½,  1[Δ < 0] if p < ½,  and ½ when Δ = 0 (a tie is a coin flip,
                e.g. the untrained zero head)
        decided = 1[p ≠ ½]   (a tie label has no right side)
    The accuracy of a set of pairs is masked_mean(agree, decided) = Σ agree·decided / Σ decided.
    """
    delta = (score_chosen_B - score_rejected_B).astype(jnp.float32)
    p = p_chosen_B.astype(jnp.float32)
    agree = jnp.where(p > 0.5, delta > 0, delta < 0).astype(jnp.float32)
    return jnp.where(delta == 0, 0.5, agree), (p != 0.5).astype(jnp.float32)


# ------------------------------------------------------------------------------------------ PPO


def kl_estimate(logprob_BxT: jax.Array, ref_logprob_BxT: jax.Array, estimator: str = "k1") -> jax.Array:
    """Per-token estimate of KL(π ‖ π_ref) from samples of π, with r = log π_ref(x) − log π(x):
        k1 = −r                       (unbiased, can be negative)
        k3 = (e^r − 1) − r            (unbiased, always ≥ 0, lower variance; Schulman 2020)
    """
    log_ratio = (ref_logprob_BxT - logprob_BxT).astype(jnp.float32)
    if estimator == "k1":
        return -log_ratio
    if estimator == "k3":
        return jnp.expm1(log_ratio) - log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; expected 'k1' or 'k3'")


def shape_rewards(score_B, kl_BxT, response_mask_BxT, beta) -> jax.Array:
    """Per-token reward: r_t = −β · KL_t on every response token, plus the preference-model score
    on the last response token:  r_t = −β·KL_t + 1[t = last] · score."""
    mask = response_mask_BxT.astype(jnp.float32)
    last_B = last_token_index(response_mask_BxT)
    is_last_BxT = (jnp.arange(mask.shape[1])[None, :] == last_B[:, None]) & (mask > 0)
    return (-beta * kl_BxT * mask + jnp.where(is_last_BxT, score_B[:, None], 0.0)).astype(jnp.float32)


def gae(rewards_BxT, values_BxT, mask_BxT, gamma: float, lam: float) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation (Schulman et al. 2016) over the masked (response) steps.

        δ_t = r_t + γ V_{t+1} − V_t,      A_t = δ_t + γ λ A_{t+1},      R_t = A_t + V_t
    where t+1 is the next *masked* step (gaps in the mask are skipped) and V, A are 0 past the
    last one (the episode ends). Runs as a reverse `lax.scan` over time; returns (advantages, returns),
    both 0 outside the mask.
    """
    mask = mask_BxT.astype(jnp.float32)
    rewards = rewards_BxT.astype(jnp.float32) * mask
    values = values_BxT.astype(jnp.float32) * mask

    def backward(carry, xs):
        next_value_B, next_adv_B = carry
        r_B, v_B, m_B = xs
        delta_B = r_B + gamma * next_value_B - v_B
        adv_B = delta_B + gamma * lam * next_adv_B
        # Outside the mask, pass the carry through unchanged so gaps are skipped.
        new_carry = (jnp.where(m_B > 0, v_B, next_value_B), jnp.where(m_B > 0, adv_B, next_adv_B))
        return new_carry, adv_B * m_B

    zeros_B = jnp.zeros(rewards.shape[0], jnp.float32)
    _, adv_TxB = jax.lax.scan(backward, (zeros_B, zeros_B), (rewards.T, values.T, mask.T), reverse=True)
    advantages = adv_TxB.T
    return advantages, (advantages + values) * mask


def whiten(x_BxT: jax.Array, mask_BxT: jax.Array, shift_mean: bool = True, eps: float = 1e-8) -> jax.Array:
    """(x − mean_m(x)) / sqrt(var_m(x) + ε) over the masked entries; 0 outside the mask."""
    mean = masked_mean(x_BxT, mask_BxT)
    scaled = (x_BxT - mean) * jax.lax.rsqrt(masked_var(x_BxT, mask_BxT) + eps)
    if not shift_mean:
        scaled = scaled + mean
    return jnp.where(mask_BxT.astype(bool), scaled, 0.0)


def ppo_policy_loss(logprob_BxT, old_logprob_BxT, advantages_BxT, mask_BxT, clip_ratio: float,
                    dual_clip: float | None = None, denominator=None) -> tuple[jax.Array, dict]:
    """PPO clipped surrogate, as a loss to minimise (Schulman et al. 2017), with optional dual clip
    (Ye et al. 2020) bounding the loss for negative advantages:

        ρ_t = exp(log π(a_t) − log π_old(a_t))
        L_t = −min(ρ_t A_t, clip(ρ_t, 1−ε, 1+ε) A_t)
        dual clip c > 1:  L_t = min(L_t, −c·A_t)  where A_t < 0
        L = mean_m(L_t)
    Also returns clip fraction (share of tokens with |ρ − 1| > ε) and approx-KL ½·mean_m((log ρ)²).
    """
    log_ratio = (logprob_BxT - old_logprob_BxT).astype(jnp.float32)
    ratio = jnp.exp(log_ratio)
    unclipped = -advantages_BxT * ratio
    clipped = -advantages_BxT * jnp.clip(ratio, 1.0 - clip_ratio, 1.0 + clip_ratio)
    loss_BxT = jnp.maximum(unclipped, clipped)
    if dual_clip is not None:
        loss_BxT = jnp.where(advantages_BxT < 0, jnp.minimum(loss_BxT, -dual_clip * advantages_BxT), loss_BxT)
    stats = {
        "clip_fraction": masked_mean((jnp.abs(ratio - 1.0) > clip_ratio).astype(jnp.float32), mask_BxT, denominator),
        "approx_kl": masked_mean(0.5 * jnp.square(log_ratio), mask_BxT, denominator),
    }
    return masked_mean(loss_BxT, mask_BxT, denominator), stats


def clipped_value_loss(values_BxT, old_values_BxT, returns_BxT, mask_BxT, value_clip: float | None,
                       denominator=None) -> tuple[jax.Array, dict]:
    """PPO value loss with the prediction clipped around the rollout's value:

        V^clip_t = V_old,t + clip(V_t − V_old,t, −ε_v, ε_v)
        L = ½ · mean_m( max((V_t − R_t)², (V^clip_t − R_t)²) )      (no clipping when ε_v is None)
    Also returns the value clip fraction (share of tokens with |V − V_old| > ε_v).
    """
    values = values_BxT.astype(jnp.float32)
    unclipped = jnp.square(values - returns_BxT)
    if value_clip is None:
        return 0.5 * masked_mean(unclipped, mask_BxT, denominator), {"value_clip_fraction": jnp.zeros(())}
    v_clipped = old_values_BxT + jnp.clip(values - old_values_BxT, -value_clip, value_clip)
    clipped = jnp.square(v_clipped - returns_BxT)
    outside = jnp.abs(values - old_values_BxT) > value_clip
    stats = {"value_clip_fraction": masked_mean(outside.astype(jnp.float32), mask_BxT, denominator)}
    return 0.5 * masked_mean(jnp.maximum(unclipped, clipped), mask_BxT, denominator), stats


def explained_variance(predicted_BxT, target_BxT, mask_BxT) -> jax.Array:
    """1 − var_m(target − predicted) / var_m(target); 1 is perfect, ≤ 0 is no better than a constant."""
    var_target = masked_var(target_BxT, mask_BxT)
    return 1.0 - masked_var(target_BxT - predicted_BxT, mask_BxT) / jnp.maximum(var_target, 1e-8)


# ------------------------------------------------------------------- direct preference optimisation


def sequence_logprob(logprob_BxT: jax.Array, mask_BxT: jax.Array) -> jax.Array:
    """log π(y | x) = Σ_t m_t · log π(y_t | x, y_<t): the response's log-probability per row, [B]."""
    return jnp.sum(jnp.where(mask_BxT.astype(bool), logprob_BxT.astype(jnp.float32), 0.0), axis=1)


def dpo_implicit_rewards(policy_B, ref_B, beta) -> jax.Array:
    """DPO's implicit reward of a response: r(x, y) = β · (log π(y|x) − log π_ref(y|x))."""
    return beta * (policy_B - ref_B).astype(jnp.float32)


def dpo_loss(policy_chosen_B, policy_rejected_B, ref_chosen_B, ref_rejected_B, p_chosen_B, beta) -> jax.Array:
    """DPO (Rafailov et al. 2023) with soft labels (conservative DPO), per pair.

    With implicit rewards r = β·(log π(y|x) − log π_ref(y|x)), Δ = r_c − r_r and label p = P(c ≻ r):
        L = −[p · log σ(Δ) + (1 − p) · log σ(−Δ)]
    i.e. the Bradley–Terry cross-entropy on implicit rewards; p = 1 is plain DPO, p = 1 − ε is cDPO's
    label smoothing ε. Arguments are sequence log-probs ([B], `sequence_logprob`). Returns loss_B.
    """
    return bradley_terry_loss(dpo_implicit_rewards(policy_chosen_B, ref_chosen_B, beta),
                              dpo_implicit_rewards(policy_rejected_B, ref_rejected_B, beta), p_chosen_B)


def ipo_loss(policy_chosen_B, policy_rejected_B, ref_chosen_B, ref_rejected_B, p_chosen_B, tau) -> jax.Array:
    """IPO (Azar et al. 2023) with soft labels, per pair.

    With h = (log π(c) − log π_ref(c)) − (log π(r) − log π_ref(r)) and label p = P(c ≻ r), the squared
    loss regresses h onto ±1/(2τ), in expectation over the label:
        L = p · (h − 1/(2τ))² + (1 − p) · (h + 1/(2τ))²
    (minimised at h = (2p − 1)/(2τ); p = 1 is the paper's (h − 1/(2τ))²). Returns loss_B.
    """
    h = ((policy_chosen_B - ref_chosen_B) - (policy_rejected_B - ref_rejected_B)).astype(jnp.float32)
    p, target = p_chosen_B.astype(jnp.float32), 1.0 / (2.0 * tau)
    return p * jnp.square(h - target) + (1.0 - p) * jnp.square(h + target)


# ---------------------------------------------------------------- group-relative policy optimisation


def group_advantages(rewards_NxG: jax.Array, kind: str, eps: float = 1e-6) -> tuple[jax.Array, jax.Array]:
    """One advantage per response from the rewards of the G responses to the same prompt (a group).

        grpo     A_i = (r_i − mean(r)) / (std(r) + ε)             (Shao et al. 2024; population std)
        dr_grpo  A_i = r_i − mean(r)                               (Liu et al. 2025: no std)
        rloo     A_i = r_i − 1/(G−1) · Σ_{j≠i} r_j = G/(G−1) · (r_i − mean(r))   (Ahmadian et al. 2024)
    A group whose rewards are all equal (degenerate: nothing to learn from) gets exactly 0 — never NaN,
    whatever rounding does to its mean. Returns (advantages_NxG, degenerate_N ∈ {0, 1}).
    """
    r = rewards_NxG.astype(jnp.float32)
    group_size = r.shape[1]
    if group_size < 2:
        raise ValueError(f"group-relative advantages need ≥ 2 responses per prompt, got {group_size}")
    degenerate_N = jnp.max(r, axis=1) == jnp.min(r, axis=1)
    centred = r - jnp.mean(r, axis=1, keepdims=True)
    if kind == "grpo":
        adv = centred / (jnp.std(r, axis=1, keepdims=True) + eps)
    elif kind == "dr_grpo":
        adv = centred
    elif kind == "rloo":
        adv = centred * (group_size / (group_size - 1))
    else:
        raise ValueError(f"unknown group advantage {kind!r}; expected 'grpo', 'dr_grpo' or 'rloo'")
    return jnp.where(degenerate_N[:, None], 0.0, adv), degenerate_N.astype(jnp.float32)


def group_policy_loss(logprob_BxT, old_logprob_BxT, ref_logprob_BxT, advantages_B, mask_BxT, clip_ratio: float,
                      kl_coef: float, denominator) -> tuple[jax.Array, dict]:
    """The clipped token-level objective of GRPO / RLOO with the KL to the reference in the loss:

        ρ_t = exp(log π(a_t) − log π_old(a_t)),   A_t = A (the response's advantage, on each of its tokens)
        L_t = −min(ρ_t A, clip(ρ_t, 1−ε, 1+ε) A) + β · k3_t
        k3_t = e^{q_t} − q_t − 1,   q_t = log π_ref(a_t) − log π(a_t)
        L = Σ_t m_t L_t / denominator
    The denominator sets the length normalisation: the batch's response-token count (token-level, DAPO
    style) or a constant such as rows × max_new_tokens (Dr. GRPO: no length bias). Also returns the
    clip fraction, approx-KL to π_old and the mean k3 KL to the reference.
    """
    advantages_BxT = jnp.broadcast_to(advantages_B[:, None], logprob_BxT.shape).astype(jnp.float32)
    surrogate, stats = ppo_policy_loss(logprob_BxT, old_logprob_BxT, advantages_BxT, mask_BxT, clip_ratio,
                                       denominator=denominator)
    kl = masked_mean(kl_estimate(logprob_BxT, ref_logprob_BxT, "k3"), mask_BxT, denominator)
    return surrogate + kl_coef * kl, {**stats, "policy_loss": surrogate, "kl_ref": kl}
