"""The DPO / IPO step: its first update from the reference, sharded == single device, and learning
separable preferences."""

import math

import jax
import numpy as np
import pytest

from test_steps import MESHES, TINY, assert_same_update, host, mesh_rules_for, policy_state
from trainer.dpo import (DPOConfig, DPOConfigError, dpo_eval_metrics, label_targets, make_dpo_eval, make_dpo_step,
                         make_sequence_logprob_fn)


def pair_batch(rows=8, length=12, seed=0, labels=(0.9, 1.0)):
    """Separable pairs: chosen responses use the lower half of the vocabulary, rejected the upper; the
    loss masks cover the responses (the last half), one rejected row ends two tokens early."""
    rng = np.random.default_rng(seed)
    half = length // 2
    prompt = rng.integers(0, TINY.vocab_size, (rows, half))
    chosen = np.concatenate([prompt, rng.integers(0, TINY.vocab_size // 2, (rows, half))], 1).astype(np.int32)
    rejected = np.concatenate([prompt, rng.integers(TINY.vocab_size // 2, TINY.vocab_size, (rows, half))], 1)
    mask = np.ones((rows, length), np.int32)
    loss_mask = np.zeros((rows, length), np.int32)
    loss_mask[:, half:] = 1
    rejected_mask, rejected_loss = mask.copy(), loss_mask.copy()
    rejected_mask[0, -2:] = rejected_loss[0, -2:] = 0
    p = rng.choice(np.asarray(labels, np.float32), rows).astype(np.float32)
    return {"chosen_tokens_BxT": chosen, "chosen_mask_BxT": mask, "chosen_loss_mask_BxT": loss_mask,
            "rejected_tokens_BxT": rejected.astype(np.int32), "rejected_mask_BxT": rejected_mask,
            "rejected_loss_mask_BxT": rejected_loss, "p_chosen_B": p}


_REFERENCE_FNS = {}


def with_reference(batch, state, mesh_rules):
    """The batch plus the reference's sequence log-probs (the reference = `state`'s policy, as at DPO's start)."""
    if id(mesh_rules) not in _REFERENCE_FNS:  # one compiled program per mesh, as the learner has (the rules kept
        # alive with it, so their id is never reused)
        _REFERENCE_FNS[id(mesh_rules)] = (mesh_rules, make_sequence_logprob_fn(state.graphdef, mesh_rules))
    fn = _REFERENCE_FNS[id(mesh_rules)][1]
    out = dict(batch)
    for side in ("chosen", "rejected"):
        out[f"ref_{side}_B"] = np.asarray(fn(state.params, batch[f"{side}_tokens_BxT"], batch[f"{side}_mask_BxT"],
                                             batch[f"{side}_loss_mask_BxT"]))
    return out


def run_dpo(shape, config=DPOConfig(), accum=1):
    mesh_rules = mesh_rules_for(shape)
    state = policy_state(mesh_rules, accum=accum)
    batch = with_reference(pair_batch(), state, mesh_rules)
    # A reference off the policy by a little, so margins, accuracy and the loss's slopes are not all at their tie values.
    offsets = np.random.default_rng(7).normal(scale=0.5, size=(2, 8)).astype(np.float32)
    batch["ref_chosen_B"] = batch["ref_chosen_B"] + offsets[0]
    batch["ref_rejected_B"] = batch["ref_rejected_B"] + offsets[1]
    state, metrics = make_dpo_step(state, config, mesh_rules)(state, batch)
    return host(state.params), host(metrics)


@pytest.fixture(scope="module")
def references():
    return {}


@pytest.mark.parametrize("loss, shape", [*(("dpo", shape) for shape in MESHES), ("ipo", (2, 2, 2))])
def test_dpo_step_sharded_equals_single_device(eight_devices, references, loss, shape):
    config = DPOConfig(loss=loss, beta=0.5)
    if loss not in references:
        references[loss] = run_dpo((1, 1, 1), config)
    assert_same_update(run_dpo(shape, config, accum=2 if shape == (2, 2, 2) else 1), references[loss])


def test_first_dpo_update_starts_from_the_reference(eight_devices):
    """Policy = reference: every implicit reward is 0, so the DPO loss is log 2 and each pair a tie."""
    mesh_rules = mesh_rules_for((2, 2, 2))
    state = policy_state(mesh_rules)
    batch = with_reference(pair_batch(), state, mesh_rules)
    _, metrics = make_dpo_step(state, DPOConfig(), mesh_rules)(state, batch)
    assert float(metrics["loss"]) == pytest.approx(math.log(2), abs=1e-5)
    assert float(metrics["margin"]) == pytest.approx(0.0, abs=1e-5)
    assert float(metrics["accuracy"]) == pytest.approx(0.5)
    assert float(metrics["chosen_logprob"]) < 0 and float(metrics["skipped"]) == 0.0


@pytest.mark.parametrize("loss", ["dpo", pytest.param("ipo", marks=pytest.mark.slow)])
def test_dpo_learns_separable_preferences(eight_devices, loss):
    mesh_rules = mesh_rules_for((4, 2, 1))
    state = policy_state(mesh_rules, lr=1e-3)
    reference = jax.tree.map(lambda x: x.copy(), state)  # steps donate their state
    config = DPOConfig(loss=loss, beta=0.1)
    step, evaluate = make_dpo_step(state, config, mesh_rules), make_dpo_eval(state, config, mesh_rules)
    for i in range(20):
        state, metrics = step(state, with_reference(pair_batch(rows=16, seed=i), reference, mesh_rules))
    held_out = dpo_eval_metrics([evaluate(state, with_reference(pair_batch(rows=64, seed=1000), reference, mesh_rules))])
    assert held_out["accuracy"] > 0.95, held_out
    assert held_out["margin"] > 0 and held_out["chosen_logprob"] > held_out["rejected_logprob"]


def test_label_targets_soft_and_hard():
    p = np.array([0.6, 1.0, 0.5, 0.2], np.float32)
    np.testing.assert_allclose(label_targets(DPOConfig(targets="soft"), p), p)
    np.testing.assert_allclose(label_targets(DPOConfig(targets="hard"), p), [1.0, 1.0, 0.5, 0.0])


@pytest.mark.parametrize("kwargs, key", [({"loss": "kto"}, "dpo.loss"), ({"beta": 0.0}, "dpo.beta"),
                                         ({"targets": "fuzzy"}, "dpo.targets")])
def test_dpo_config_rejects_bad_values(kwargs, key):
    with pytest.raises(DPOConfigError, match=key):
        DPOConfig(**kwargs)
