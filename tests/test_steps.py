"""SFT, preference-model and PPO steps: sharded == single device, and each step does its job."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import synthetic

from models.config import preset
from models.llama import Llama, ScalarModel
from trainer import losses
from trainer.mesh import MeshConfig, build_mesh_rules
from trainer.optim import OptimizerConfig
from trainer.ppo import PPOConfig, compute_advantages, create_ppo_state, make_ppo_step, make_token_fn
from trainer.state import NonFiniteGuard, TrainingDivergedError, create_train_state
from trainer.steps import make_rm_eval, make_rm_step, make_sft_step, rm_eval_metrics, token_logprobs_and_entropy

TINY = preset("tiny")
MESHES = [(8, 1, 1), (2, 2, 2), (1, 4, 2)]  # (data, fsdp, tensor)
TOL = 1e-5
# Adam's first update is ≈ lr·g/(|g| + eps): with eps = 1e-8 a gradient entry near 1e-8 turns
# summation-order noise into an O(lr) difference. A larger eps keeps the comparison about the math.
EPS = 1e-6


def mesh_rules_for(shape):
    return build_mesh_rules(MeshConfig(*shape), devices=jax.devices()[: int(np.prod(shape))])


def policy_state(mesh_rules, lr=1e-3, accum=1, seed=0):
    return create_train_state(lambda r: Llama(TINY, r, mesh_rules), OptimizerConfig(learning_rate=lr, grad_accum_steps=accum, eps=EPS),
                              mesh_rules, seed)


def scalar_state(mesh_rules, lr=1e-3, accum=1, seed=1):
    return create_train_state(lambda r: ScalarModel(TINY, r, mesh_rules),
                              OptimizerConfig(learning_rate=lr, grad_accum_steps=accum, eps=EPS), mesh_rules, seed)


def host(tree):
    return jax.tree.map(np.asarray, tree)


def assert_trees_close(a, b, tol=TOL):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, atol=tol, rtol=0)


def assert_same_update(result, reference, tol=TOL):
    """(params, metrics) of a sharded step equal the single-device step's: parameters within `tol`, every
    metric within `tol` absolute or relative (squared losses of summed log-probs are O(10))."""
    assert_trees_close(result[0], reference[0], tol)
    assert result[1].keys() == reference[1].keys()
    for key, value in result[1].items():
        np.testing.assert_allclose(value, reference[1][key], atol=tol, rtol=tol, err_msg=key)


def sft_batch(rows=8, length=16, seed=0):
    rng = np.random.default_rng(seed)
    attention = np.ones((rows, length), bool)
    attention[1, :3] = False  # left padding
    loss_mask = np.zeros((rows, length), np.float32)
    loss_mask[:, 6:] = 1.0
    loss_mask[2, 12:] = 0.0
    return {"tokens_BxT": rng.integers(0, TINY.vocab_size, (rows, length)).astype(np.int32),
            "attention_mask_BxT": attention, "loss_mask_BxT": loss_mask}


def rm_batch(rows=8, length=12, seed=0):
    """Separable preferences: chosen responses use the lower half of the vocabulary, rejected the upper."""
    rng = np.random.default_rng(seed)
    prompt = rng.integers(0, TINY.vocab_size, (rows, length // 2))
    chosen = np.concatenate([prompt, rng.integers(0, 128, (rows, length // 2))], 1).astype(np.int32)
    rejected = np.concatenate([prompt, rng.integers(128, 256, (rows, length // 2))], 1).astype(np.int32)
    mask = np.ones((rows, length), bool)
    rejected_mask = mask.copy()
    rejected_mask[0, -2:] = False  # right padding: the score is read at the last real token
    p = np.where(rng.random(rows) < 0.5, 0.9, 1.0).astype(np.float32)
    return {"chosen_tokens_BxT": chosen, "chosen_mask_BxT": mask, "rejected_tokens_BxT": rejected,
            "rejected_mask_BxT": rejected_mask, "p_chosen_B": p}


def ppo_batch(rows=16, length=16, seed=0, old_logprobs=None):
    return synthetic.ppo_batch(rows, length, seed, vocab_size=TINY.vocab_size, ragged=True, left_padded=True,
                               old_logprobs=old_logprobs)


# ------------------------------------------------------------------------------------------- SFT


def run_sft(shape, accum=1):
    mesh_rules = mesh_rules_for(shape)
    state = policy_state(mesh_rules, accum=accum)
    state, metrics = make_sft_step(state, mesh_rules)(state, sft_batch())
    return host(state.params), host(metrics)


@pytest.fixture(scope="module")
def sft_reference():
    return run_sft((1, 1, 1))


@pytest.mark.parametrize("shape", MESHES)
def test_sft_step_sharded_equals_single_device(eight_devices, sft_reference, shape):
    params, metrics = run_sft(shape, accum=2 if shape == (2, 2, 2) else 1)
    assert_trees_close(params, sft_reference[0])
    for key in ("loss", "grad_norm", "tokens"):
        np.testing.assert_allclose(metrics[key], sft_reference[1][key], atol=TOL)


def test_sft_lowers_nll(eight_devices):
    mesh_rules = mesh_rules_for((2, 2, 2))
    state = policy_state(mesh_rules, lr=3e-3)
    step = make_sft_step(state, mesh_rules)
    batch = sft_batch()
    nll = []
    for _ in range(5):
        state, metrics = step(state, batch)
        nll.append(float(metrics["nll"]))
    assert nll[-1] < nll[0] - 0.5, nll
    assert int(metrics["step"]) == 5


def test_remat_matches_and_bf16_compute_keeps_fp32_params(eight_devices):
    mesh_rules = mesh_rules_for((1, 1, 1))
    results = {}
    for name, config in {"plain": TINY, "remat": TINY.replace(remat=True),
                         "bf16": TINY.replace(dtype="bfloat16", remat=True)}.items():
        state = create_train_state(lambda r, c=config: Llama(c, r, mesh_rules), OptimizerConfig(eps=EPS), mesh_rules, 0)
        state, metrics = make_sft_step(state, mesh_rules)(state, sft_batch())
        results[name] = (host(state.params), host(metrics))
    assert_trees_close(results["remat"][0], results["plain"][0])
    np.testing.assert_allclose(results["remat"][1]["grad_norm"], results["plain"][1]["grad_norm"], rtol=1e-5)
    bf16_params, bf16_metrics = results["bf16"]
    assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(bf16_params))
    # Same math at lower precision: close to the fp32 loss, not equal.
    np.testing.assert_allclose(bf16_metrics["loss"], results["plain"][1]["loss"], rtol=2e-2)


def test_train_state_from_existing_model(eight_devices):
    from models.sharding import create_sharded
    from trainer.state import train_state_from_model

    mesh_rules = mesh_rules_for((2, 2, 2))
    model = create_sharded(lambda: Llama(TINY, __import__("flax").nnx.Rngs(params=7), mesh_rules), mesh_rules)
    state = train_state_from_model(model, OptimizerConfig(), mesh_rules)
    embed = state.params["embed_VxD"][...]
    assert embed.sharding.spec == mesh_rules.rules.spec(("vocab", "embed"))
    mu = state.opt_state[1][0].mu["embed_VxD"][...]
    assert mu.sharding.spec == embed.sharding.spec  # Adam moments sharded like their parameter


# ------------------------------------------------------------------------------------ preferences


def run_rm(shape):
    mesh_rules = mesh_rules_for(shape)
    state = scalar_state(mesh_rules)
    state, metrics = make_rm_step(state, mesh_rules)(state, rm_batch())
    return host(state.params), host(metrics)


@pytest.fixture(scope="module")
def rm_reference():
    return run_rm((1, 1, 1))


@pytest.mark.parametrize("shape", MESHES)
def test_rm_step_sharded_equals_single_device(eight_devices, rm_reference, shape):
    params, metrics = run_rm(shape)
    assert_trees_close(params, rm_reference[0])
    for key in ("loss", "grad_norm", "accuracy"):
        np.testing.assert_allclose(metrics[key], rm_reference[1][key], atol=TOL)


def test_rm_learns_separable_preferences(eight_devices):
    mesh_rules = mesh_rules_for((4, 2, 1))
    state = scalar_state(mesh_rules, lr=3e-3)
    step, evaluate = make_rm_step(state, mesh_rules), make_rm_eval(state, mesh_rules)
    for i in range(30):
        state, metrics = step(state, rm_batch(rows=16, seed=i))
    held_out = rm_eval_metrics([evaluate(state, rm_batch(rows=64, seed=1000))])
    assert held_out["accuracy"] > 0.95, held_out


# -------------------------------------------------------------------------------------------- PPO

PPO = PPOConfig(epochs=2, minibatches=2, entropy_coef=0.01)


def run_ppo(shape, batch=None, config=PPO, lr=1e-3):
    mesh_rules = mesh_rules_for(shape)
    # Value-model gradient accumulation where the 8-row minibatches allow 2 micro-batches per batch shard.
    accum = 2 if shape[0] * shape[1] <= 4 else 1
    state = create_ppo_state(policy_state(mesh_rules, lr=lr), scalar_state(mesh_rules, lr=lr, accum=accum), config.kl)
    state, metrics = make_ppo_step(state, config, mesh_rules)(state, ppo_batch() if batch is None else batch)
    return host((state.policy.params, state.value.params, state.beta)), host(metrics)


@pytest.fixture(scope="module")
def ppo_reference():
    return run_ppo((1, 1, 1))


@pytest.mark.parametrize("shape", MESHES)
def test_ppo_step_sharded_equals_single_device(eight_devices, ppo_reference, shape):
    params, metrics = run_ppo(shape)
    assert_trees_close(params, ppo_reference[0])
    assert metrics.keys() == ppo_reference[1].keys()
    for key, value in metrics.items():
        np.testing.assert_allclose(value, ppo_reference[1][key], atol=TOL, err_msg=key)


def test_ppo_step_raises_the_surrogate_objective(eight_devices):
    mesh_rules = mesh_rules_for((2, 2, 2))
    config = PPOConfig(epochs=1, minibatches=1, entropy_coef=0.0)
    policy = policy_state(mesh_rules, lr=1e-3)
    batch = ppo_batch()
    # On-policy batch: the rollout log-probs are the policy's own, so the ratio starts at 1.
    batch["old_logprobs_BxT"] = np.asarray(make_token_fn(policy, mesh_rules, "logprobs")(
        policy, batch["tokens_BxT"], batch["attention_mask_BxT"]))
    state = create_ppo_state(policy, scalar_state(mesh_rules), config.kl)
    advantages = compute_advantages(config, state.beta, batch)["advantages_BxT"]

    @jax.jit
    def surrogate_loss(params):
        logprob = token_logprobs_and_entropy(state.policy.model(params), batch["tokens_BxT"], batch["attention_mask_BxT"])[0]
        loss, _ = losses.ppo_policy_loss(logprob, batch["old_logprobs_BxT"], advantages, batch["response_mask_BxT"],
                                         config.clip_ratio)
        return loss

    def surrogate(params):
        return -float(surrogate_loss(params))

    before = surrogate(state.policy.params)
    state, metrics = make_ppo_step(state, config, mesh_rules)(state, batch)
    after = surrogate(state.policy.params)
    assert after > before + 1e-3, (before, after)
    assert float(metrics["policy_skipped"]) == 0.0


def test_adaptive_beta_moves_toward_target(ppo_reference):
    params, metrics = ppo_reference
    # The batch's per-sequence KL (~0.1 nats) is far below the default target of 6: β shrinks by e = −0.2.
    assert float(metrics["kl"]) < 6.0
    np.testing.assert_allclose(params[2], 0.05 * (1 - 0.2 * 16 / 10000), rtol=1e-6)


def test_non_finite_update_is_skipped_bit_identically(eight_devices):
    mesh_rules = mesh_rules_for((2, 2, 2))
    config = PPOConfig(epochs=1, minibatches=1)
    state = create_ppo_state(policy_state(mesh_rules), scalar_state(mesh_rules), config.kl)
    before = host((state.policy.params, state.policy.opt_state, state.value.params, state.value.opt_state))
    batch = ppo_batch()
    batch["scores_B"][3] = np.nan
    step = make_ppo_step(state, config, mesh_rules)
    guard = NonFiniteGuard(max_in_a_row=2)
    state, metrics = step(state, batch)
    guard.check(metrics)
    after = host((state.policy.params, state.policy.opt_state, state.value.params, state.value.opt_state))
    for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
        np.testing.assert_array_equal(x, y)
    assert float(metrics["policy_skipped"]) == 1.0 and float(metrics["value_skipped"]) == 1.0
    assert int(metrics["nonfinite_streak"]) == 1
    state, metrics = step(state, batch)
    with pytest.raises(TrainingDivergedError, match="2 consecutive updates"):
        guard.check(metrics)
    state, metrics = step(state, ppo_batch(seed=1))  # a good batch resets the streak
    assert int(metrics["nonfinite_streak"]) == 0


def test_target_kl_stops_the_epochs_of_a_batch(eight_devices):
    """An off-policy batch (random rollout log-probs) has an approximate KL far above 1e-6 in the first
    epoch: the other two epochs do not run, leaving exactly the weights of a one-epoch update."""
    stopped_params, stopped = run_ppo((2, 2, 2), config=PPOConfig(epochs=3, minibatches=1, target_kl=1e-6))
    one_epoch_params, _ = run_ppo((2, 2, 2), config=PPOConfig(epochs=1, minibatches=1))
    assert stopped["epochs_run"] == 1.0 and stopped["approx_kl"] > 1e-6
    for x, y in zip(jax.tree.leaves(stopped_params), jax.tree.leaves(one_epoch_params), strict=True):
        np.testing.assert_array_equal(x, y)


def test_ppo_rejects_minibatch_not_divisible_by_shards(eight_devices):
    from trainer.mesh import MeshError

    mesh_rules = mesh_rules_for((8, 1, 1))
    config = PPOConfig(minibatches=4)  # 16 rows / 4 = 4 per minibatch, over 8 batch shards
    state = create_ppo_state(policy_state(mesh_rules), scalar_state(mesh_rules), config.kl)
    with pytest.raises(MeshError, match="PPO minibatch size 4"):
        make_ppo_step(state, config, mesh_rules)(state, ppo_batch())
    assert jnp.isfinite(state.beta)  # the failed trace donated nothing
