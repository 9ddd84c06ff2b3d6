"""GRPO, Dr. GRPO and RLOO steps: sharded == single device, all-equal groups, and a step that raises
the objective on a fixed batch."""

import jax
import numpy as np
import pytest

from test_steps import assert_same_update, host, mesh_rules_for, ppo_batch, policy_state
from trainer import losses
from trainer.grpo import GroupConfig, GroupState, make_group_step
from trainer.ppo import make_token_fn
from trainer.steps import token_logprobs_and_entropy

MAX_NEW_TOKENS = 10  # the synthetic responses span positions 6..15
VARIANTS = {"grpo": ("grpo", GroupConfig(epochs=2)), "dr_grpo": ("grpo", GroupConfig(dr_grpo=True, epochs=2)),
            "rloo": ("rloo", GroupConfig(epochs=2))}


def group_batch(seed=0):
    """16 rows = 4 prompts × G 4; the second group's scores all equal (degenerate)."""
    batch = ppo_batch(seed=seed)
    batch["scores_B"][4:8] = 0.25
    return batch


def run_group(shape, variant, batch=None, accum=1):
    algorithm, config = VARIANTS[variant]
    mesh_rules = mesh_rules_for(shape)
    state = GroupState(policy=policy_state(mesh_rules, accum=accum))
    step = make_group_step(state, algorithm, config, MAX_NEW_TOKENS, mesh_rules)
    state, metrics = step(state, group_batch() if batch is None else batch)
    return host(state.policy.params), host(metrics)


@pytest.fixture(scope="module")
def references():
    return {}


@pytest.mark.parametrize("variant, shape", [("grpo", (8, 1, 1)), ("grpo", (2, 2, 2)), ("dr_grpo", (1, 4, 2)),
                                            ("rloo", (2, 2, 2))])
def test_group_step_sharded_equals_single_device(eight_devices, references, variant, shape):
    if variant not in references:
        references[variant] = run_group((1, 1, 1), variant)
    params, metrics = run_group(shape, variant, accum=2 if shape == (2, 2, 2) else 1)
    assert_same_update((params, metrics), references[variant])
    assert metrics["degenerate_groups"] == 1.0 and metrics["skipped"] == 0.0


def test_all_equal_groups_give_zero_advantage_and_no_update(eight_devices):
    """Every group degenerate, no KL term, on-policy: the loss is 0 (not NaN), the gradient 0, nothing moves."""
    mesh_rules = mesh_rules_for((2, 2, 2))
    state = GroupState(policy=policy_state(mesh_rules))
    batch = group_batch()
    batch["scores_B"][:] = np.repeat(np.array([0.1, -3.0, 7.0, 0.1], np.float32), 4)
    batch["old_logprobs_BxT"] = np.asarray(make_token_fn(state.policy, mesh_rules, "logprobs")(
        state.policy, batch["tokens_BxT"], batch["attention_mask_BxT"]))
    before = host(state.policy.params)
    step = make_group_step(state, "grpo", GroupConfig(kl_coef=0.0), MAX_NEW_TOKENS, mesh_rules)
    state, metrics = step(state, batch)
    assert float(metrics["degenerate_groups"]) == 4.0 and float(metrics["advantage_abs_mean"]) == 0.0
    assert float(metrics["loss"]) == 0.0 and float(metrics["grad_norm"]) == 0.0 and float(metrics["skipped"]) == 0.0
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(host(state.policy.params)), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_group_step_raises_the_objective_on_a_fixed_batch(eight_devices, algorithm):
    mesh_rules = mesh_rules_for((2, 2, 2))
    config = GroupConfig(kl_coef=0.0, epochs=1)
    state = GroupState(policy=policy_state(mesh_rules, lr=1e-3))
    batch = group_batch()
    # On-policy: the rollout log-probs are the policy's own, so the ratio starts at 1.
    batch["old_logprobs_BxT"] = np.asarray(make_token_fn(state.policy, mesh_rules, "logprobs")(
        state.policy, batch["tokens_BxT"], batch["attention_mask_BxT"]))
    advantages = losses.group_advantages(batch["scores_B"].reshape(4, 4), algorithm)[0].reshape(16)

    @jax.jit
    def objective(params):
        logprob = token_logprobs_and_entropy(state.policy.model(params), batch["tokens_BxT"],
                                             batch["attention_mask_BxT"])[0]
        loss, _ = losses.group_policy_loss(logprob, batch["old_logprobs_BxT"], batch["ref_logprobs_BxT"], advantages,
                                           batch["response_mask_BxT"], config.clip_ratio, 0.0,
                                           batch["response_mask_BxT"].sum())
        return -loss

    before = float(objective(state.policy.params))
    state, metrics = make_group_step(state, algorithm, config, MAX_NEW_TOKENS, mesh_rules)(state, batch)
    after = float(objective(state.policy.params))
    assert after > before + 1e-3, (before, after)
    assert float(metrics["skipped"]) == 0.0


def test_group_config_rejects_bad_values():
    from trainer.grpo import GroupConfigError

    with pytest.raises(GroupConfigError, match="group_size"):
        GroupConfig(group_size=1)
    with pytest.raises(GroupConfigError, match="not whole groups"):
        run_group((1, 1, 1), "grpo", batch=ppo_batch(rows=10))
