"""LoRA (models/lora.py) on a frozen base: zero adapters are the base, an SFT step trains only the
adapters, adapters are sharded by the weights' rules, and both exports (merged HF weights, PEFT adapter)
load in transformers / peft with our logits. LoRA dropout: training passes run the adapters unmerged with
masks from the state's RNG (reproducible, resumable), inference stays on the merged weights."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from hf_helpers import torch_logits, write_word_tokenizer
from models import lora
from models.config import preset
from models.export import export_params
from models.llama import Llama, ScalarModel
from models.peft_export import export_adapter
from models.sources import build_llama, host_params
from models.tokenizer import load_tokenizer
from test_model import random_params
from test_steps import EPS, mesh_rules_for, rm_batch, sft_batch
from trainer import losses
from trainer.optim import OptimizerConfig
from trainer.state import create_train_state, train_state_from_model, train_state_from_params
from trainer.steps import make_rm_step, make_sft_step, sequence_scores, sft_loss

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TOKENS = np.array([[5, 17, 99, 3, 42, 64, 7, 120, 11, 2, 77, 31], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]])


def _config(family="llama", tie=True):
    return preset("tiny").replace(family=family, tie_embeddings=tie)


def _lora_state(config, spec, mesh_rules, lr=1e-2, seed=0):
    model = build_llama(config, random_params(config, seed=3, gain=0.5), mesh_rules)
    return train_state_from_model(model, OptimizerConfig(learning_rate=lr, eps=EPS, decay="constant"), mesh_rules,
                                  seed, lora=spec)


def _with_random_b(state, seed=1):
    """The state with every B drawn at random (trained adapters, so the adapter path is not zero)."""
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda x: x, state.params)
    for path, variable in nnx.to_flat_state(params):
        if path[-1] == "lora_b":
            variable[...] = jnp.asarray(0.3 * rng.standard_normal(variable.shape), variable.dtype)
    return state.replace(params=params)


def test_config_validation_names_the_key():
    with pytest.raises(lora.LoraConfigError, match="model.lora.rank"):
        lora.LoraConfig(rank=0)
    with pytest.raises(lora.LoraConfigError, match="model.lora.alpha"):
        lora.LoraConfig(alpha=0)
    for bad in (1.0, -0.1, 1.5, True, "0.1"):
        with pytest.raises(lora.LoraConfigError, match=r"model.lora.dropout must be a probability in \[0, 1\)"):
            lora.LoraConfig(dropout=bad)
    assert lora.LoraConfig(dropout=0.1).dropout == 0.1 and lora.LoraConfig(dropout=0).dropout == 0
    with pytest.raises(lora.LoraConfigError, match="model.lora.targets"):
        lora.LoraConfig(targets="q_proj")


def test_a_target_that_matches_nothing_is_an_error_at_load():
    with pytest.raises(lora.LoraConfigError, match=r"\['qkv_proj'\] match no module.*'o_proj'.*'q_proj'"):
        lora.resolve(_config(), lora.LoraConfig(targets=("q_proj", "qkv_proj")))
    with pytest.raises(lora.LoraConfigError, match="lm_head is tied"):
        lora.resolve(_config(tie=True), lora.LoraConfig(targets=("lm_head",)))
    untied = lora.resolve(_config(tie=False), lora.LoraConfig(targets=("lm_head", "layers.1.mlp.down_proj")))
    assert [m for _, m in untied.targets] == ["model.layers.1.mlp.down_proj", "lm_head"]
    assert lora.resolve(_config(), None) is None


def test_zero_initialised_adapters_reproduce_the_base_exactly_and_shard_like_their_weights(eight_devices):
    config = _config("qwen2")
    mesh_rules = mesh_rules_for((1, 4, 2))
    spec = lora.resolve(config, lora.LoraConfig(rank=4, targets=ALL_LINEAR))
    base = build_llama(config, random_params(config, seed=3, gain=0.5), mesh_rules)
    state = train_state_from_model(base, OptimizerConfig(), mesh_rules, lora=spec)
    forward = nnx.jit(lambda m, t: m(t))
    tokens = jnp.asarray(np.tile(TOKENS, (2, 1)))
    np.testing.assert_array_equal(np.asarray(forward(state.model(), tokens)), np.asarray(forward(base, tokens)))

    flat = dict(nnx.to_flat_state(state.params))
    assert len(flat) == 2 * len(ALL_LINEAR) * config.num_layers  # adapters only: the base is frozen
    q = ("blocks", 0, "attn", "q_DxNxH")
    assert flat[q + ("lora_a",)].shape == (64, 4) and flat[q + ("lora_b",)].shape == (4, 4, 16)
    assert flat[q + ("lora_a",)][...].sharding.spec == P("fsdp", None)
    assert flat[q + ("lora_b",)][...].sharding.spec == P(None, "tensor", None)
    o = ("blocks", 1, "attn", "o_NxHxD")
    assert flat[o + ("lora_a",)][...].sharding.spec == P("tensor", None, None)
    assert flat[o + ("lora_b",)][...].sharding.spec == P(None, "fsdp")
    # The optimizer holds moments for the adapters alone.
    assert sum(x.size for x in jax.tree.leaves(state.opt_state)) <= 3 * sum(v.size for v in flat.values()) + 8


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_lora_sft_step_lowers_the_loss_and_leaves_the_base_bit_unchanged(dropout):
    config = _config()
    mesh_rules = mesh_rules_for((2, 2, 2))
    spec = lora.resolve(config, lora.LoraConfig(rank=4, targets=ALL_LINEAR, dropout=dropout))
    state = _lora_state(config, spec, mesh_rules)
    base_before = host_params(state.frozen)
    rng_before = np.asarray(state.rng)
    step = make_sft_step(state, mesh_rules)
    batch = sft_batch()
    losses = []
    for _ in range(4):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0] - 0.01, losses
    base_after = host_params(state.frozen)
    assert base_after.keys() == base_before.keys()
    for path, w in base_before.items():
        assert np.array_equal(base_after[path], w), path
    assert any(np.abs(b).max() > 0 for (_, b) in lora.adapters(state.params).values())
    # Dropout draws its masks from the state's RNG; without dropout the RNG is untouched, as before.
    assert np.array_equal(np.asarray(state.rng), rng_before) == (dropout == 0)


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_lora_step_with_remat_equals_the_step_without(dropout):
    """model.remat recomputes each block in the backward pass; with a frozen base from outside the gradient's
    trace (and, with dropout, the same masks recomputed) the update is the one without remat."""
    updates = []
    for remat in (False, True):
        config = _config().replace(remat=remat)
        mesh_rules = mesh_rules_for((1, 1, 1))
        spec = lora.resolve(config, lora.LoraConfig(rank=4, targets=ALL_LINEAR, dropout=dropout))
        state = _with_random_b(_lora_state(config, spec, mesh_rules))
        state, _ = make_sft_step(state, mesh_rules)(state, sft_batch())
        updates.append(host_params(state.params))
    for path, value in updates[0].items():
        # Adam steps are ±lr (1e-2) per element: another mask would move many elements by that much, where
        # recomputation's float reordering moves a few by ~1e-5.
        np.testing.assert_allclose(updates[1][path], value, atol=1e-4, rtol=0, err_msg=str(path))


def test_lora_preference_model_trains_its_head_in_full():
    config = _config()
    mesh_rules = mesh_rules_for((2, 2, 2))
    spec = lora.resolve(config, lora.LoraConfig(rank=2))
    scalar = lambda rngs: ScalarModel(config, rngs, mesh_rules)  # noqa: E731
    graphdef, params = nnx.split(nnx.eval_shape(lambda: scalar(nnx.Rngs(0))))
    llama = random_params(config, seed=3, gain=0.5)
    arrays = {("backbone", *p): v for p, v in llama.items()}
    arrays.update({("head_D",): np.zeros(config.hidden_size, np.float32), ("head_bias",): np.zeros((), np.float32)})
    params = nnx.from_flat_state([(p, v.replace(jnp.asarray(arrays[p]))) for p, v in nnx.to_flat_state(params)])
    state = train_state_from_params(graphdef, params, OptimizerConfig(learning_rate=1e-2, eps=EPS), mesh_rules,
                                    lora=spec)
    trainable = {p for p, _ in nnx.to_flat_state(state.params)}
    assert {("head_D",), ("head_bias",)} <= trainable and not any(p[0] == "backbone" and p[-1] not in
                                                                  ("lora_a", "lora_b") for p in trainable)
    step = make_rm_step(state, mesh_rules)
    state, first = step(state, rm_batch())
    for _ in range(3):
        state, metrics = step(state, rm_batch())
    assert float(metrics["loss"]) < float(first["loss"])


# ------------------------------------------------------------------------------------------ LoRA dropout


def _sft_arrays():
    batch = {k: jnp.asarray(v) for k, v in sft_batch().items()}
    return batch, {"tokens": jnp.sum(batch["loss_mask_BxT"].astype(jnp.float32))}


@pytest.mark.parametrize("layers", [{}, {"scan_layers": True}, {"remat": True}])
def test_unmerged_training_pass_without_dropout_equals_the_merged_weights(layers):
    """The unmerged path (x W + s·(x A) B) with a keep-all mask is the merged model (W + s·A B), on every
    kind of projection: q/k/v, o (heads flattened), the MLP and an untied lm_head; blocks looped, scanned
    or rematerialised."""
    config = _config(tie=False).replace(**layers)
    spec = lora.resolve(config, lora.LoraConfig(rank=4, alpha=8.0, targets=(*ALL_LINEAR, "lm_head"), dropout=0.0))
    state = _with_random_b(_lora_state(config, spec, mesh_rules_for((1, 1, 1))))
    key = jax.random.PRNGKey(7)
    tokens = jnp.asarray(TOKENS)
    merged, apart = state.model()(tokens), state.model(state.params, key)(tokens)
    assert np.abs(np.asarray(merged) - np.asarray(state.model(state.params)(tokens))).max() == 0
    np.testing.assert_allclose(np.asarray(apart), np.asarray(merged), atol=1e-4, rtol=0)  # fp32 sums, |logits| ~ 10
    batch, totals = _sft_arrays()
    loss_merged, _ = sft_loss(state.params, state, batch, totals)
    loss_apart, _ = sft_loss(state.params, state, batch, totals, key)
    assert abs(float(loss_apart) - float(loss_merged)) < 1e-5


def test_dropout_masks_follow_the_key():
    config = _config(tie=False)
    spec = lora.resolve(config, lora.LoraConfig(rank=4, targets=(*ALL_LINEAR, "lm_head"), dropout=0.3))
    state = _with_random_b(_lora_state(config, spec, mesh_rules_for((1, 1, 1))))
    batch, totals = _sft_arrays()
    loss = jax.jit(lambda params, key: sft_loss(params, state, batch, totals, key)[0])
    first, again, other = (float(loss(state.params, jax.random.PRNGKey(k))) for k in (1, 1, 2))
    merged = float(sft_loss(state.params, state, batch, totals)[0])
    assert first == again  # the same key: the same masks, bit for bit
    assert abs(first - other) > 1e-4 and abs(first - merged) > 1e-4, (first, other, merged)


def test_inference_with_dropout_configured_runs_the_merged_weights():
    """Sampling and no-gradient passes (log-probs, evaluation) ignore model.lora.dropout: the same adapters
    with dropout 0.5 and with 0 give bit-identical outputs."""
    from models.generation import Sampler
    from models.sampling import SamplingParams
    from trainer.ppo import make_token_fn
    from trainer.steps import make_rm_eval

    config = _config()
    mesh_rules = mesh_rules_for((1, 1, 1))
    with_dropout, without = (_with_random_b(_lora_state(config, lora.resolve(config, lora.LoraConfig(
        rank=4, targets=ALL_LINEAR, dropout=rate)), mesh_rules)) for rate in (0.5, 0.0))
    tokens, mask = jnp.asarray(TOKENS), jnp.ones(TOKENS.shape, bool)
    logprobs = [np.asarray(make_token_fn(s, mesh_rules, "logprobs")(s, tokens, mask)) for s in (with_dropout, without)]
    np.testing.assert_array_equal(*logprobs)
    np.testing.assert_array_equal(np.asarray(with_dropout.model()(tokens)), np.asarray(without.model()(tokens)))
    prompts, greedy = [[5, 17, 99], [1, 2]], SamplingParams(max_new_tokens=6)
    samples = [Sampler(s.model(), stop_ids=[1], pad_id=0).generate(prompts, greedy) for s in (with_dropout, without)]
    np.testing.assert_array_equal(samples[0].tokens, samples[1].tokens)
    np.testing.assert_array_equal(samples[0].policy_logprobs, samples[1].policy_logprobs)

    spec = lora.resolve(config, lora.LoraConfig(rank=2, dropout=0.5))
    scalar = create_train_state(lambda r: ScalarModel(config, r, mesh_rules), OptimizerConfig(), mesh_rules, lora=spec)
    scalar = _with_random_b(scalar)
    evaluate = make_rm_eval(scalar, mesh_rules)
    batch = rm_batch()
    ref = scalar.model()
    chosen = sequence_scores(ref, jnp.asarray(batch["chosen_tokens_BxT"]), jnp.asarray(batch["chosen_mask_BxT"]))
    rejected = sequence_scores(ref, jnp.asarray(batch["rejected_tokens_BxT"]), jnp.asarray(batch["rejected_mask_BxT"]))
    want = np.sum(np.asarray(losses.bradley_terry_loss(chosen, rejected, jnp.asarray(batch["p_chosen_B"]))))
    np.testing.assert_allclose(float(evaluate(scalar, batch)["bt_loss"]), want, rtol=1e-6)


def _dropout_policy_and_value(mesh_rules, dropout, lr=1e-3):
    config = _config()
    opt = OptimizerConfig(learning_rate=lr, eps=EPS)
    policy_spec = lora.resolve(config, lora.LoraConfig(rank=2, targets=ALL_LINEAR, dropout=dropout))
    value_spec = lora.resolve(config, lora.LoraConfig(rank=2, dropout=dropout))
    policy = _with_random_b(create_train_state(lambda r: Llama(config, r, mesh_rules), opt, mesh_rules, 0, policy_spec))
    value = _with_random_b(create_train_state(lambda r: ScalarModel(config, r, mesh_rules), opt, mesh_rules, 1,
                                              value_spec))
    return policy, value


def _update_with_dropout(algorithm, mesh_rules, dropout=0.2):
    """(state, jitted step, batch) of one policy update with LoRA dropout: PPO (policy and value), GRPO or DPO."""
    from test_dpo import pair_batch
    from test_steps import ppo_batch
    from trainer.dpo import DPOConfig, make_dpo_step
    from trainer.grpo import GroupConfig, GroupState, make_group_step
    from trainer.ppo import PPOConfig, create_ppo_state, make_ppo_step

    policy, value = _dropout_policy_and_value(mesh_rules, dropout)
    if algorithm == "ppo":
        config = PPOConfig(epochs=1, minibatches=2)  # two minibatch updates: two masks per state
        state = create_ppo_state(policy, value, config.kl)
        return state, make_ppo_step(state, config, mesh_rules), ppo_batch()
    if algorithm == "grpo":
        state = GroupState(policy=policy)
        return state, make_group_step(state, "grpo", GroupConfig(epochs=1), 8, mesh_rules), ppo_batch()
    reference_B = np.full(8, -40.0, np.float32)
    batch = {**pair_batch(), "ref_chosen_B": reference_B, "ref_rejected_B": reference_B}
    return policy, make_dpo_step(policy, DPOConfig(), mesh_rules), batch


def _roles(state):
    """The train states inside a PPO / GRPO state, or the state itself."""
    return [state.policy, state.value] if hasattr(state, "value") else [getattr(state, "policy", state)]


@pytest.mark.parametrize("algorithm", ["ppo", "grpo", "dpo"])
def test_policy_updates_with_dropout_draw_masks_from_the_state_rng(algorithm):
    """Each update draws its masks from its train states' RNGs, which advance; the same state and batch give
    bit-identical results."""
    state, step, batch = _update_with_dropout(algorithm, mesh_rules_for((2, 1, 1)))
    same_state = jax.tree.map(jnp.copy, state)  # the step donates its input
    rngs_before = [np.asarray(role.rng) for role in _roles(state)]
    first, metrics = step(state, batch)
    assert float(metrics["skipped"]) == 0
    assert all(not np.array_equal(a, np.asarray(role.rng)) for a, role in zip(rngs_before, _roles(first)))
    again, _ = step(same_state, batch)
    for role, same in zip(_roles(first), _roles(again)):
        np.testing.assert_equal(host_params(role.params), host_params(same.params))


def test_sft_with_dropout_resumed_from_a_checkpoint_ends_bit_identical(tmp_path):
    """The masks come from the checkpointed RNG: 2 steps, save, restore into a fresh state, 2 steps ends
    exactly where 4 straight steps do."""
    from trainer.checkpoint import CheckpointConfig, Checkpointer

    config = _config()
    mesh_rules = mesh_rules_for((2, 1, 1))
    spec = lora.resolve(config, lora.LoraConfig(rank=4, targets=ALL_LINEAR, dropout=0.25))
    optimizer = OptimizerConfig(learning_rate=1e-2, eps=EPS, decay="constant")
    factory = lambda r: Llama(config, r, mesh_rules)  # noqa: E731
    batches = [sft_batch(seed=i) for i in range(4)]

    straight = create_train_state(factory, optimizer, mesh_rules, 0, spec)
    step, state = make_sft_step(straight, mesh_rules), jax.tree.map(jnp.copy, straight)  # steps donate their input
    # Shapes and shardings only: what a new process restores into (the same static fields, so one compiled step).
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), straight)
    for batch in batches:
        straight, _ = step(straight, batch)

    for batch in batches[:2]:
        state, _ = step(state, batch)
    with Checkpointer(tmp_path, CheckpointConfig(every_steps=1)) as ckpt:
        ckpt.save(2, state, {"data_position": 2}, force=True)
        ckpt.wait()
    del state
    with Checkpointer(tmp_path) as reader:
        resumed, extras = reader.restore(abstract)
    assert extras == {"data_position": 2}
    for batch in batches[2:]:
        resumed, _ = step(resumed, batch)
    for got, want in zip(jax.tree.leaves(resumed), jax.tree.leaves(straight), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tok")
    write_word_tokenizer(directory, 256)
    return load_tokenizer(directory)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_merged_export_and_peft_adapter_match_our_model_in_transformers(family, tokenizer, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")

    config = _config(family, tie=False)
    spec = lora.resolve(config, lora.LoraConfig(rank=4, alpha=8.0, targets=(*ALL_LINEAR, "lm_head")))
    state = _with_random_b(_lora_state(config, spec, mesh_rules_for((1, 1, 1))))
    ours = np.asarray(state.model()(jnp.asarray(TOKENS)))
    base_logits = np.asarray(nnx.merge(state.graphdef, state.frozen)(jnp.asarray(TOKENS)))
    assert np.abs(ours - base_logits).max() > 0.1  # the adapters matter

    merged = export_params(tmp_path / "merged", config, host_params(state.full_params()), tokenizer)
    reference, info = transformers.AutoModelForCausalLM.from_pretrained(merged, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    np.testing.assert_allclose(torch_logits(reference, TOKENS), ours, atol=1e-4, rtol=0)

    base_dir = export_params(tmp_path / "base", config, host_params(state.frozen), tokenizer)
    adapter_dir = export_adapter(tmp_path / "adapter", host_params(state.params), spec, base_model=str(base_dir))
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    with_adapter = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.no_grad():
        peft_logits = with_adapter(torch.tensor(TOKENS)).logits.numpy()
    np.testing.assert_allclose(peft_logits, ours, atol=1e-4, rtol=0)


def test_peft_adapter_config_carries_the_configured_dropout(tmp_path):
    config = _config()
    spec = lora.resolve(config, lora.LoraConfig(rank=2, targets=("q_proj",), dropout=0.1))
    state = _lora_state(config, spec, mesh_rules_for((1, 1, 1)))
    adapter_dir = export_adapter(tmp_path / "adapter", host_params(state.params), spec, base_model="base")
    written = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert written["lora_dropout"] == 0.1 and written["r"] == 2


def config_vocab(model_dir) -> int:
    return json.loads((model_dir / "config.json").read_text())["vocab_size"]


@pytest.mark.slow  # compiles SFT, RM and PPO steps: about a minute on 2 cores
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_every_stage_trains_adapters_on_a_frozen_qwen2_and_resumes(tmp_path, dropout):
    """sl → rm → ppo through the learner (no Ray) with model.lora on a Qwen2 model: each stage's state
    trains adapters only, later stages start from the merged weights, and a new process restores them.
    With dropout the training passes run unmerged; what peft loads (no dropout at inference) is unchanged."""
    from pathlib import Path

    from pipeline_fixtures import write_tiny_model
    from trainer.config import load_run_config
    from trainer.critique import SFTExample
    from trainer.learner import Learner
    from trainer.learners.requests import PreferenceData, PreferencePair, Rollout
    from trainer.pipeline_state import StageRecord

    model_dir = write_tiny_model(tmp_path / "qwen2", family="qwen2")
    root = Path(__file__).resolve().parents[1]
    config = load_run_config(root / "configs" / "tiny.yaml", [
        f"model.source={model_dir}", f"run.runs_dir={tmp_path / 'runs'}", "ppo.batch_size=2",
        "model.lora.rank=2", "model.lora.targets=[q_proj, v_proj, down_proj]", "sl.optimizer.learning_rate=0.01",
        f"model.lora.dropout={dropout}"])
    run_dir = config.run_dir
    run_dir.mkdir(parents=True)
    learner = Learner(config, str(run_dir))
    assert learner.ctx.lora is not None and len(learner.ctx.lora.targets) == 3 * 2

    learner.setup("sl")
    sl = learner.current
    base = {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(sl.state.frozen)}
    learner.set_data([SFTExample("u0", ({"role": "user", "content": "hi"},), "hello there")])
    for _ in range(2):
        assert learner.train_step()["skipped"] == 0
    for p, v in nnx.to_flat_state(sl.state.frozen):
        assert np.array_equal(np.asarray(v[...]), base[p]), p
    learner.finish()
    sl_policy = learner.ctx.handoff["policy"]
    merged = {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(sl_policy)}
    assert merged.keys() == base.keys()  # later stages get a whole model: the merged weights
    q = ("blocks", 0, "attn", "q_DxNxH")
    assert not np.array_equal(merged[q], base[q]) and np.array_equal(merged[q[:-1] + ("o_NxHxD",)],
                                                                    base[q[:-1] + ("o_NxHxD",)])
    # The SL adapters alone, in PEFT's layout: peft puts them on the initial model and gets our SL policy.
    torch, transformers, peft = (pytest.importorskip(m) for m in ("torch", "transformers", "peft"))
    adapter_dir = run_dir / "adapters" / "sl"
    sl_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert sl_config["base_model_name_or_path"] == str(model_dir) and sl_config["lora_dropout"] == dropout
    with_adapter = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(model_dir),
                                                  adapter_dir).eval()
    tokens = TOKENS % config_vocab(model_dir)
    with torch.no_grad():
        peft_logits = with_adapter(torch.tensor(tokens)).logits.numpy()
    ours = np.asarray(nnx.merge(sl.state.graphdef, sl_policy)(jnp.asarray(tokens)))
    np.testing.assert_allclose(peft_logits, ours, atol=1e-4, rtol=0)
    learner.close()
    StageRecord(run_dir).update("sl", done=True)

    learner.setup("rm")
    pairs = tuple(PreferencePair(f"question {i}", "a kind safe answer", "a rude harmful answer", 0.8) for i in range(3))
    learner.set_data(PreferenceData(train=pairs[:2], heldout=pairs[2:]))
    assert learner.train_step()["skipped"] == 0
    assert ("head_D",) in {p for p, _ in nnx.to_flat_state(learner.current.state.params)}
    learner.finish()
    StageRecord(run_dir).update("rm", done=True)

    learner.setup("ppo")
    policy = learner.current.state.policy
    for p, v in nnx.to_flat_state(policy.frozen):
        assert np.array_equal(np.asarray(v[...]), merged[p]), p
    metrics = learner.train_step([Rollout((1, 2, 3), (4, 5), (-1.0, -2.0)), Rollout((3, 2), (6,), (-0.5,))])
    assert metrics["skipped"] == 0
    learner.save(1, {"iteration": 1}, force=True)
    trained = {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(learner.current.state.policy.params)}
    assert any(np.abs(v).max() > 0 for p, v in trained.items() if p[-1] == "lora_b")  # PPO moved its adapters
    learner.finish()
    # The PPO adapter, stacked on SL's (rank 2r), goes on the initial model and gives the RL policy.
    rl_policy = learner.ctx.handoff["policy"]
    ppo_config = json.loads((run_dir / "adapters" / "ppo" / "adapter_config.json").read_text())
    assert ppo_config["r"] == 2 * 2 and ppo_config["base_model_name_or_path"] == str(model_dir)
    with_adapter = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(model_dir),
                                                  run_dir / "adapters" / "ppo").eval()
    with torch.no_grad():
        peft_logits = with_adapter(torch.tensor(tokens)).logits.numpy()
    ours = np.asarray(nnx.merge(sl.state.graphdef, rl_policy)(jnp.asarray(tokens)))
    np.testing.assert_allclose(peft_logits, ours, atol=1e-4, rtol=0)
    learner.close()

    resumed = Learner(config, str(run_dir))
    assert resumed.setup("ppo").step == 1
    restored = {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(resumed.current.state.policy.params)}
    assert restored.keys() == trained.keys() and all(np.array_equal(restored[p], trained[p]) for p in trained)
    resumed.close()


@pytest.mark.slow  # two PPO compiles
def test_bench_ppo_with_lora_trains_fewer_parameters_in_less_state():
    import argparse

    from trainer.bench import ppo as bench

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    common = ["--model", "tiny", "--batch", "2", "--seq-len", "32", "--response-len", "8", "--runs", "1",
              "--matmul-size", "128"]
    full = bench.run(parser.parse_args(common))
    adapted = bench.run(parser.parse_args([*common, "--lora", "2", "--lora-targets", "q_proj,v_proj"]))
    c = preset("tiny")
    h, rank = c.resolved_head_dim, 2
    per_layer = rank * (c.hidden_size + c.num_heads * h) + rank * (c.hidden_size + c.num_kv_heads * h)  # q, v: A + B
    head = c.hidden_size + 1  # the value model's scalar head trains in full
    assert full["lora_rank"] == 0 and adapted["lora_rank"] == rank
    assert full["trainable_params"] == 2 * c.num_params() + head
    assert adapted["trainable_params"] == 2 * c.num_layers * per_layer + head
    # Full fine-tuning: params + 2 Adam moments per model; LoRA: the frozen bases + small adapters.
    assert adapted["state_bytes"] < 0.4 * full["state_bytes"]


def test_run_config_reads_model_lora_and_names_a_bad_key():
    from pathlib import Path

    from trainer.config import load_run_config
    from trainer.configlib import ConfigError

    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    assert load_run_config(tiny).model.lora is None  # off by default: full fine-tuning
    config = load_run_config(tiny, ["model.lora.rank=4", "model.lora.alpha=8", "model.lora.targets=[q_proj]"])
    assert config.model.lora == lora.LoraConfig(rank=4, alpha=8.0, targets=("q_proj",))
    with pytest.raises(ConfigError, match="model.lora.rank must be a positive integer"):
        load_run_config(tiny, ["model.lora.rank=0"])
    assert load_run_config(tiny, ["model.lora.dropout=0.05"]).model.lora.dropout == 0.05
    for bad in ("1.0", "-0.1"):
        with pytest.raises(ConfigError, match=r"model.lora.dropout must be a probability in \[0, 1\)"):
            load_run_config(tiny, [f"model.lora.dropout={bad}"])
    with pytest.raises(ConfigError, match="unknown key 'rnak'.*did you mean 'rank'"):
        load_run_config(tiny, ["model.lora.rnak=4"])


@pytest.mark.plan  # compiles the SFT step for the 8 fake devices
def test_plan_counts_the_frozen_base_as_weights_and_optimizer_state_for_adapters_only(eight_devices):
    from pathlib import Path

    from trainer.config import load_run_config
    from trainer.plan.abstract import plan_model_config
    from trainer.plan.planner import make_plan
    from trainer.plan.targets import parse_target

    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    overrides = ["model.source=tiny", "run.stages=[sl]", "model.mesh.data=1", "model.mesh.fsdp=8", "sl.batch_size=8"]
    full = load_run_config(tiny, overrides)
    adapted = load_run_config(tiny, [*overrides, "model.lora.rank=2", "model.lora.targets=[q_proj]"])
    (full_sft,) = make_plan(full, parse_target("local")).programs
    (lora_sft,) = make_plan(adapted, parse_target("local")).programs
    c = plan_model_config(adapted)
    adapter_bytes = 4 * c.num_layers * 2 * (c.hidden_size + c.num_heads * c.resolved_head_dim)  # fp32 A + B
    assert full_sft.opt_state_bytes > 2 * full_sft.param_bytes * 0.9
    # Weights: the base plus adapters (replicated on the rank axis: at most the whole adapter per device).
    assert full_sft.param_bytes < lora_sft.param_bytes <= full_sft.param_bytes + adapter_bytes
    assert lora_sft.opt_state_bytes <= 2 * adapter_bytes + 64
