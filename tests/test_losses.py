"""The training math against hand-computed values and plain Python loops."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from trainer import kl as klmod
from trainer import losses


def test_masked_nll_by_hand():
    logprob = jnp.array([[0.0, -1.0, -2.0], [0.0, -3.0, -4.0]])
    mask = jnp.array([[0, 1, 1], [0, 1, 0]])
    assert float(losses.masked_nll(logprob, mask)) == pytest.approx((1 + 2 + 3) / 3)
    # An explicit denominator (gradient accumulation) replaces the mask count.
    assert float(losses.masked_nll(logprob, mask, denominator=6.0)) == pytest.approx(1.0)


def test_token_logprobs_and_entropy_are_shifted_onto_the_predicted_token():
    logits = jnp.zeros((1, 3, 4)).at[0, 0, 2].set(math.log(3.0))  # position 0 predicts token 2 with p = 1/2
    tokens = jnp.array([[1, 2, 0]])
    # Logits at t predict token t + 1; shift_right lines each value up with the token it scores.
    logprob_BxT1, entropy_BxT1 = losses.logprobs_and_entropy(logits[:, :-1], tokens[:, 1:])
    logprob, entropy = losses.shift_right(logprob_BxT1), losses.shift_right(entropy_BxT1)
    np.testing.assert_allclose(logprob, [[0.0, math.log(0.5), math.log(0.25)]], rtol=1e-6)
    h0 = -(0.5 * math.log(0.5) + 3 * (1 / 6) * math.log(1 / 6))
    np.testing.assert_allclose(entropy, [[0.0, h0, math.log(4)]], rtol=1e-6)


def test_bradley_terry_soft_labels_by_hand():
    chosen = jnp.array([1.0, 0.0, -2.0, -1.0])
    rejected = jnp.zeros(4)
    p = jnp.array([1.0, 0.5, 0.25, 0.9])
    loss = losses.bradley_terry_loss(chosen, rejected, p)
    expected = [
        math.log1p(math.exp(-1)),  # p=1, Δ=1: −log σ(1)
        math.log(2),  # Δ=0: −log ½ whatever p
        0.25 * math.log1p(math.exp(2)) + 0.75 * math.log1p(math.exp(-2)),
        0.9 * math.log1p(math.exp(1)) + 0.1 * math.log1p(math.exp(-1)),
    ]
    np.testing.assert_allclose(loss, expected, rtol=1e-6)


def test_preference_accuracy_by_hand():
    """Agreement per pair: the label's side preferred (1), the other (0), a score tie (½); a tie label
    is left out of the accuracy. Pairs 0, 2, 3, 4 are decided: accuracy (1 + 1 + 0 + ½) / 4."""
    chosen = jnp.array([1.0, 0.0, -2.0, -1.0, 0.0])
    rejected = jnp.zeros(5)
    p = jnp.array([1.0, 0.5, 0.25, 0.9, 0.8])
    agree, decided = losses.preference_agreement(chosen, rejected, p)
    np.testing.assert_allclose(agree, [1.0, 0.5, 1.0, 0.0, 0.5])
    np.testing.assert_allclose(decided, [1.0, 0.0, 1.0, 1.0, 1.0])
    np.testing.assert_allclose(losses.masked_mean(agree, decided), 2.5 / 4)


def test_last_token_index_left_and_right_padding():
    mask = jnp.array([[1, 1, 0, 0], [0, 0, 1, 1], [1, 1, 1, 1]])
    np.testing.assert_array_equal(losses.last_token_index(mask), [1, 3, 3])


def test_kl_estimators_by_hand():
    logprob, ref = jnp.array([-1.0, -2.0]), jnp.array([-2.0, -2.0])
    np.testing.assert_allclose(losses.kl_estimate(logprob, ref, "k1"), [1.0, 0.0])
    np.testing.assert_allclose(losses.kl_estimate(logprob, ref, "k3"), [math.exp(-1), 0.0], rtol=1e-6)
    with pytest.raises(ValueError, match="k2"):
        losses.kl_estimate(logprob, ref, "k2")


def test_reward_shaping_puts_score_on_last_response_token():
    kl = jnp.array([[0.1, 0.2, 0.3, 0.4]])
    mask = jnp.array([[0, 1, 1, 0]])
    rewards = losses.shape_rewards(jnp.array([2.0]), kl, mask, beta=0.5)
    np.testing.assert_allclose(rewards, [[0.0, -0.1, 2.0 - 0.15, 0.0]], rtol=1e-6)


def test_gae_by_hand():
    rewards = jnp.array([[0.0, 0.0, 1.0]])
    values = jnp.array([[0.5, 0.5, 0.5]])
    mask = jnp.ones((1, 3))
    adv, ret = losses.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    np.testing.assert_allclose(adv, [[0.5, 0.5, 0.5]], rtol=1e-6)
    np.testing.assert_allclose(ret, [[1.0, 1.0, 1.0]], rtol=1e-6)
    adv, ret = losses.gae(rewards, values, mask, gamma=0.9, lam=0.5)
    # δ2 = 0.5, A2 = 0.5; δ1 = 0.9·0.5 − 0.5 = −0.05, A1 = −0.05 + 0.45·0.5; A0 = −0.05 + 0.45·A1
    np.testing.assert_allclose(adv, [[0.02875, 0.175, 0.5]], rtol=1e-5)
    np.testing.assert_allclose(ret, [[0.52875, 0.675, 1.0]], rtol=1e-5)


def _gae_plain_loop(rewards, values, mask, gamma, lam):
    adv = np.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        steps = [t for t in range(rewards.shape[1]) if mask[b, t]]
        next_value, next_adv = 0.0, 0.0
        for t in reversed(steps):
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            next_adv = delta + gamma * lam * next_adv
            next_value = values[b, t]
            adv[b, t] = next_adv
    return adv, (adv + values) * mask


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.7), (0.99, 1.0)])
def test_gae_equals_plain_loop_with_padding_and_gaps(gamma, lam):
    rng = np.random.default_rng(0)
    rewards = rng.normal(size=(5, 11)).astype(np.float32)
    values = rng.normal(size=(5, 11)).astype(np.float32)
    mask = (rng.random((5, 11)) > 0.3).astype(np.float32)
    mask[0] = 0  # an empty row
    mask[1, :4] = 0  # prompt-like prefix
    adv, ret = losses.gae(rewards, values, mask, gamma, lam)
    want_adv, want_ret = _gae_plain_loop(rewards, values, mask, gamma, lam)
    np.testing.assert_allclose(adv, want_adv, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ret, want_ret, rtol=1e-5, atol=1e-6)


def test_ppo_policy_loss_by_hand_with_and_without_dual_clip():
    ratio = jnp.array([[1.5, 0.5, 5.0, 1.0]])
    old = jnp.zeros((1, 4))
    adv = jnp.array([[1.0, -1.0, -1.0, 2.0]])
    mask = jnp.ones((1, 4))
    loss, stats = losses.ppo_policy_loss(jnp.log(ratio), old, adv, mask, clip_ratio=0.2)
    # per token: −min(1.5, 1.2) = −1.2; max(0.5, 0.8) = 0.8; max(5, 1.2) = 5; −2
    assert float(loss) == pytest.approx((-1.2 + 0.8 + 5.0 - 2.0) / 4, rel=1e-6)
    assert float(stats["clip_fraction"]) == pytest.approx(0.75)
    want_kl = 0.5 * (math.log(1.5) ** 2 + math.log(0.5) ** 2 + math.log(5.0) ** 2) / 4
    assert float(stats["approx_kl"]) == pytest.approx(want_kl, rel=1e-6)
    dual, _ = losses.ppo_policy_loss(jnp.log(ratio), old, adv, mask, clip_ratio=0.2, dual_clip=3.0)
    assert float(dual) == pytest.approx((-1.2 + 0.8 + 3.0 - 2.0) / 4, rel=1e-6)  # 5 capped at c·|A| = 3


def test_ppo_policy_loss_ignores_masked_tokens():
    logprob = jnp.array([[0.0, 100.0]])
    loss, _ = losses.ppo_policy_loss(logprob, jnp.zeros((1, 2)), jnp.ones((1, 2)), jnp.array([[1, 0]]), 0.2)
    assert float(loss) == pytest.approx(-1.0)


def test_clipped_value_loss_by_hand():
    values, old, returns = jnp.array([[1.0, 0.0]]), jnp.array([[0.5, 0.5]]), jnp.array([[2.0, 0.0]])
    mask = jnp.ones((1, 2))
    loss, stats = losses.clipped_value_loss(values, old, returns, mask, value_clip=0.2)
    # token 0: max((1−2)², (0.7−2)²) = 1.69; token 1: max(0², 0.3²) = 0.09
    assert float(loss) == pytest.approx(0.5 * (1.69 + 0.09) / 2, rel=1e-6)
    assert float(stats["value_clip_fraction"]) == pytest.approx(1.0)
    unclipped, _ = losses.clipped_value_loss(values, old, returns, mask, value_clip=None)
    assert float(unclipped) == pytest.approx(0.5 * (1.0 + 0.0) / 2)


def test_whiten_masked():
    x = jnp.array([[1.0, 2.0, 3.0, 99.0]])
    mask = jnp.array([[1, 1, 1, 0]])
    s = math.sqrt(1.5)  # 1/sqrt(var = 2/3)
    np.testing.assert_allclose(losses.whiten(x, mask), [[-s, 0.0, s, 0.0]], rtol=1e-5)


def test_explained_variance():
    target = jnp.array([[1.0, 2.0, 3.0, 4.0]])
    mask = jnp.ones((1, 4))
    assert float(losses.explained_variance(target, target, mask)) == pytest.approx(1.0)
    assert float(losses.explained_variance(jnp.full((1, 4), 2.5), target, mask)) == pytest.approx(0.0, abs=1e-6)


def test_adaptive_kl_controller_by_hand():
    config = klmod.KLConfig(kind="adaptive", beta=0.1, target=6.0, horizon=1000)
    beta = klmod.initial_beta(config)
    assert float(klmod.update_beta(config, beta, jnp.float32(12.0), 100)) == pytest.approx(0.1 * 1.02)  # e clipped +0.2
    assert float(klmod.update_beta(config, beta, jnp.float32(3.0), 100)) == pytest.approx(0.1 * 0.98)  # e clipped −0.2
    assert float(klmod.update_beta(config, beta, jnp.float32(6.6), 100)) == pytest.approx(0.1 * 1.01)  # e = 0.1
    fixed = klmod.KLConfig(kind="fixed", beta=0.3)
    assert float(klmod.update_beta(fixed, klmod.initial_beta(fixed), jnp.float32(100.0), 100)) == pytest.approx(0.3)


def test_adaptive_beta_ignores_a_non_finite_kl():
    """One NaN or infinite batch KL (a diverged batch) must not make β NaN for the rest of the run."""
    config = klmod.KLConfig(kind="adaptive", beta=0.1, target=6.0, horizon=1000)
    beta = klmod.initial_beta(config)
    for bad in (jnp.nan, jnp.inf, -jnp.inf):
        assert float(klmod.update_beta(config, beta, jnp.float32(bad), 100)) == pytest.approx(0.1)


def test_kl_config_rejects_bad_values():
    with pytest.raises(klmod.KLConfigError, match="estimator"):
        klmod.KLConfig(estimator="k2")
    with pytest.raises(klmod.KLConfigError, match="kind"):
        klmod.KLConfig(kind="sometimes")


# ------------------------------------------------------------------------- DPO, IPO, group advantages


def test_sequence_logprob_sums_the_response_tokens():
    logprob = jnp.array([[0.0, -1.0, -2.0, -4.0], [0.0, -0.5, -0.25, -9.0]])
    mask = jnp.array([[0, 1, 1, 0], [0, 0, 1, 1]])
    np.testing.assert_allclose(losses.sequence_logprob(logprob, mask), [-3.0, -9.25])


def test_dpo_loss_by_hand_with_soft_labels():
    """β = 0.5. Pair 0: log-ratios +2 (chosen) and −2 (rejected): Δ = 0.5·4 = 2, p = 1 → log(1 + e^−2).
    Pair 1: policy = reference: Δ = 0 → log 2 whatever p. Pair 2: Δ = 0.5·(1 − 3) = −1, p = 0.8 →
    0.8·log(1 + e^1) + 0.2·log(1 + e^−1)."""
    pc, pr = jnp.array([-1.0, -5.0, -2.0]), jnp.array([-7.0, -6.0, -1.0])
    rc, rr = jnp.array([-3.0, -5.0, -3.0]), jnp.array([-5.0, -6.0, -4.0])
    loss = losses.dpo_loss(pc, pr, rc, rr, jnp.array([1.0, 0.3, 0.8]), 0.5)
    expected = [math.log1p(math.exp(-2)), math.log(2),
                0.8 * math.log1p(math.exp(1)) + 0.2 * math.log1p(math.exp(-1))]
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    np.testing.assert_allclose(losses.dpo_implicit_rewards(pc, rc, 0.5), [1.0, 0.0, 0.5])


def test_ipo_loss_by_hand_with_soft_labels():
    """τ = 0.25: target 1/(2τ) = 2. Pair 0: h = 4, p = 1 → (4 − 2)² = 4. Pair 1: h = 0, p = 0.5 →
    ½·4 + ½·4 = 4. Pair 2: h = −2, p = 0.75 → 0.75·16 + 0.25·0 = 12."""
    pc, pr = jnp.array([-1.0, -5.0, -2.0]), jnp.array([-7.0, -6.0, -1.0])
    rc, rr = jnp.array([-3.0, -5.0, -3.0]), jnp.array([-5.0, -6.0, -4.0])
    loss = losses.ipo_loss(pc, pr, rc, rr, jnp.array([1.0, 0.5, 0.75]), 0.25)
    np.testing.assert_allclose(loss, [4.0, 4.0, 12.0], rtol=1e-6)


def test_ipo_soft_label_minimum_is_at_the_label_margin():
    h = jnp.linspace(-3.0, 3.0, 601)
    zeros = jnp.zeros_like(h)
    loss = losses.ipo_loss(h, zeros, zeros, zeros, jnp.full_like(h, 0.8), 0.5)
    assert float(h[jnp.argmin(loss)]) == pytest.approx((2 * 0.8 - 1) / (2 * 0.5), abs=1e-6)


def test_group_advantages_by_hand():
    """Group [1, 2, 3, 6]: mean 3, population std √(14/4) = √3.5."""
    rewards = jnp.array([[1.0, 2.0, 3.0, 6.0]])
    centred = np.array([-2.0, -1.0, 0.0, 3.0])
    grpo, degenerate = losses.group_advantages(rewards, "grpo", eps=0.0)
    np.testing.assert_allclose(grpo[0], centred / math.sqrt(3.5), rtol=1e-6)
    np.testing.assert_allclose(degenerate, [0.0])
    np.testing.assert_allclose(losses.group_advantages(rewards, "dr_grpo")[0][0], centred, rtol=1e-6)
    # Leave-one-out: 1 − (2+3+6)/3, 2 − (1+3+6)/3, 3 − (1+2+6)/3, 6 − (1+2+3)/3.
    np.testing.assert_allclose(losses.group_advantages(rewards, "rloo")[0][0],
                               [1 - 11 / 3, 2 - 10 / 3, 3 - 3.0, 6 - 2.0], rtol=1e-6)


@pytest.mark.parametrize("kind", ["grpo", "dr_grpo", "rloo"])
def test_group_advantages_of_all_equal_groups_are_zero_and_counted(kind):
    # 0.1 three times: its float mean is not exactly 0.1, so only the explicit rule gives exact zeros.
    rewards = jnp.array([[0.1, 0.1, 0.1], [1e30, 1e30, 1e30], [0.0, 1.0, 0.0]])
    adv, degenerate = losses.group_advantages(rewards, kind)
    assert np.all(np.isfinite(adv))
    np.testing.assert_array_equal(adv[:2], 0.0)
    np.testing.assert_array_equal(degenerate, [1.0, 1.0, 0.0])
    assert float(jnp.abs(adv[2]).sum()) > 0


def test_group_advantages_need_two_responses():
    with pytest.raises(ValueError, match="≥ 2 responses"):
        losses.group_advantages(jnp.zeros((3, 1)), "grpo")


def test_group_policy_loss_by_hand():
    """Row 0: A = 1, ρ = e^0.5 ≈ 1.65 clipped to 1.2 → −1.2. Row 1: A = −2, ρ = 1 → +2. k3 with
    q = ref − logπ: q = −0.5 → e^−0.5 + 0.5 − 1; q = 0 → 0. Denominator 4 (two tokens, Dr. GRPO style)."""
    logprob = jnp.array([[0.0, -1.0], [0.0, -2.0]])
    old = jnp.array([[0.0, -1.5], [0.0, -2.0]])
    ref = jnp.array([[0.0, -1.5], [0.0, -2.0]])
    mask = jnp.array([[0, 1], [0, 1]])
    loss, stats = losses.group_policy_loss(logprob, old, ref, jnp.array([1.0, -2.0]), mask, 0.2, 0.1, 4.0)
    k3 = math.exp(-0.5) + 0.5 - 1
    assert float(stats["policy_loss"]) == pytest.approx((-1.2 + 2.0) / 4, rel=1e-6)
    assert float(stats["kl_ref"]) == pytest.approx(k3 / 4, rel=1e-5)
    assert float(loss) == pytest.approx((-1.2 + 2.0) / 4 + 0.1 * k3 / 4, rel=1e-6)
    assert float(stats["clip_fraction"]) == pytest.approx(1 / 4)
