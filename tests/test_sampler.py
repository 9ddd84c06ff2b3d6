"""The KV-cache sampler against plain full-recompute decoding, teacher forcing and exact distributions."""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from flax import nnx
from scipy import stats

from models.config import preset
from models.llama import Llama
from models.generation import Buckets, Sampler, SamplerError
from models.sampling import SamplingParams, SamplingParamsError, filter_logits
from models.sharding import MeshRules, ShardingRules, make_mesh

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAD = 0
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18], [3], [200, 17, 4, 99]]


def _sharp_tiny_model(seed: int = 0, scale: float = 6.0, mesh_rules: MeshRules | None = None) -> Llama:
    """Tiny random Llama with weights scaled up, so greedy text varies instead of repeating one token."""
    model = Llama(preset("tiny"), nnx.Rngs(seed))
    graphdef, state = nnx.split(model)
    state = jax.tree.map(lambda x: x * scale if x.ndim >= 2 else x, state)
    if mesh_rules is not None:
        graphdef, _ = nnx.split(nnx.eval_shape(lambda: Llama(preset("tiny"), nnx.Rngs(seed), mesh_rules)))
    return nnx.merge(graphdef, state)


@pytest.fixture(scope="module")
def model() -> Llama:
    return _sharp_tiny_model()


@pytest.fixture(scope="module")
def sampler(model) -> Sampler:
    return Sampler(model, stop_ids=[1], pad_id=PAD)


@jax.jit
def _full_forward(graphdef, state, tokens_1xL):
    return nnx.merge(graphdef, state)(tokens_1xL)[0]


def _greedy_by_full_recompute(model: Llama, prompt: list[int], steps: int, stop_ids=(1,)) -> list[int]:
    """Reference decoding: rerun the whole sequence through the model (no cache) for every token.

    The sequence is right-padded to one fixed length so the forward pass compiles once; causal
    attention makes the padding invisible to the positions that are read.
    """
    graphdef, state = nnx.split(model)
    length = len(prompt) + steps
    tokens = list(prompt)
    out = []
    for _ in range(steps):
        padded = jnp.asarray([tokens + [PAD] * (length - len(tokens))], jnp.int32)
        token = int(jnp.argmax(_full_forward(graphdef, state, padded)[len(tokens) - 1]))
        out.append(token)
        tokens.append(token)
        if token in stop_ids:
            break
    return out


def test_greedy_equals_full_recompute_on_ragged_prompts(model, sampler):
    samples = sampler.generate(PROMPTS, SamplingParams(max_new_tokens=12))
    assert samples.tokens.shape == (4, 12) and samples.tokens.dtype == np.int32
    distinct = set()
    for row, prompt in enumerate(PROMPTS):
        expected = _greedy_by_full_recompute(model, prompt, 12)
        n = len(expected)
        assert samples.tokens[row, :n].tolist() == expected
        assert samples.lengths[row] == n and samples.mask[row].sum() == n
        distinct.update(expected)
    assert len(distinct) > 8, "the test model should produce varied text"


def _teacher_forced_logits(model: Llama, prompt: list[int], response: list[int]) -> np.ndarray:
    """Logits that predicted each response token, from one forward pass over prompt + response."""
    logits = model(jnp.asarray([prompt + response], jnp.int32))[0]
    return np.asarray(logits[len(prompt) - 1 : len(prompt) + len(response) - 1])


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_new_tokens=10, temperature=1.0),
        SamplingParams(max_new_tokens=10, temperature=0.7, top_k=20, top_p=0.9),
        SamplingParams(max_new_tokens=10, temperature=1.3, top_p=0.8),
    ],
    ids=["plain", "topk-topp", "topp"],
)
def test_logprobs_equal_teacher_forced_forward_pass(model, sampler, params):
    samples = sampler.generate(PROMPTS, params, seed=7)
    mode = params.mode(model.config.vocab_size)
    for row, prompt in enumerate(PROMPTS):
        n = int(samples.lengths[row])
        response = samples.tokens[row, :n].tolist()
        logits = _teacher_forced_logits(model, prompt, response)
        policy = jax.nn.log_softmax(logits, axis=-1)[np.arange(n), response]
        filtered = filter_logits(jnp.asarray(logits), mode, jnp.float32(params.temperature), jnp.float32(params.top_p))
        sampling = jax.nn.log_softmax(filtered, axis=-1)[np.arange(n), response]
        np.testing.assert_allclose(samples.policy_logprobs[row, :n], policy, atol=1e-4)
        np.testing.assert_allclose(samples.logprobs[row, :n], sampling, atol=1e-4)
        assert np.all(samples.logprobs[row, n:] == 0) and np.all(samples.policy_logprobs[row, n:] == 0)


def _reference_first_token_probs(model: Llama, prompt: list[int], temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """The intended sampling distribution, computed independently in float64 numpy with a full sort."""
    logits = np.asarray(model(jnp.asarray([prompt], jnp.int32))[0, -1], np.float64) / temperature
    order = np.argsort(-logits)
    keep = np.zeros(logits.shape, bool)
    keep[order[: top_k or len(logits)]] = True
    probs = np.exp(logits - logits.max()) * keep
    probs /= probs.sum()
    sorted_probs = probs[order]
    mass_before = np.cumsum(sorted_probs) - sorted_probs
    nucleus = np.zeros(logits.shape, bool)
    nucleus[order[mass_before < top_p]] = True
    probs = probs * nucleus
    return probs / probs.sum()


@pytest.mark.parametrize("top_k,top_p", [(0, 0.05), (0, 0.5), (0, 0.9), (0, 0.995), (7, 1.0), (40, 0.8)])
def test_filters_keep_exactly_the_sorted_definition(top_k, top_p):
    """Bisection nucleus and top-k thresholds == a float64 sort of each row (distinct logits)."""
    logits = np.asarray(jax.random.normal(jax.random.key(3), (6, 1000)) * np.array([[0.1], [1], [3], [8], [1], [2]]))
    mode = SamplingParams(temperature=1.0, top_k=top_k, top_p=top_p).mode(1000)
    kept = np.isfinite(np.asarray(filter_logits(jnp.asarray(logits), mode, jnp.float32(1.0), jnp.float32(top_p))))
    for row in range(len(logits)):
        order = np.argsort(-logits[row])
        keep = np.zeros(1000, bool)
        keep[order[: top_k or 1000]] = True
        probs = np.exp(logits[row] - logits[row].max()) * keep
        sorted_probs = probs[order] / probs.sum()
        expected = np.zeros(1000, bool)
        expected[order[(np.cumsum(sorted_probs) - sorted_probs < top_p) & keep[order]]] = True
        np.testing.assert_array_equal(kept[row], expected)


def _first_token_counts(sampler: Sampler, prompt, params: SamplingParams, n: int, seed: int) -> np.ndarray:
    samples = sampler.generate([prompt] * n, params, seed=seed)
    return np.bincount(samples.tokens[:, 0], minlength=sampler.config.vocab_size)


def _chi_square_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
    """Pearson chi-square goodness of fit, pooling tokens with expected count < 5 into one cell."""
    expected = probs * counts.sum()
    big = expected >= 5
    observed_cells = np.append(counts[big], counts[~big].sum())
    expected_cells = np.append(expected[big], expected[~big].sum())
    if expected_cells[-1] < 5:  # pooled cell too small to test on its own: merge it into the largest
        top = np.argmax(expected_cells[:-1])
        observed_cells[top] += observed_cells[-1]
        expected_cells[top] += expected_cells[-1]
        observed_cells, expected_cells = observed_cells[:-1], expected_cells[:-1]
    return float(stats.chisquare(observed_cells, expected_cells).pvalue)


@pytest.mark.parametrize(
    "temperature,top_k,top_p",
    [(1.0, 0, 1.0), (0.6, 0, 1.0), (1.0, 12, 1.0), (1.0, 0, 0.7), (1.5, 30, 0.9)],
)
def test_first_token_frequencies_match_the_intended_distribution(model, sampler, temperature, top_k, top_p):
    prompt, n = [17, 4, 99], 4096
    params = SamplingParams(max_new_tokens=1, temperature=temperature, top_k=top_k, top_p=top_p)
    counts = _first_token_counts(sampler, prompt, params, n, seed=11)
    probs = _reference_first_token_probs(model, prompt, temperature, top_k, top_p)
    assert counts[probs == 0].sum() == 0, "sampled a token outside the top-k / top-p set"
    assert _chi_square_pvalue(counts, probs) > 1e-3
    # The same test must reject a wrong distribution: here, the one at twice the temperature.
    wrong = _reference_first_token_probs(model, prompt, 2 * temperature, top_k, top_p)
    assert _chi_square_pvalue(counts, np.maximum(wrong, 1e-12)) < 1e-3


def test_same_seed_same_tokens_and_rows_independent_of_batch(sampler):
    params = SamplingParams(max_new_tokens=8, temperature=1.0)
    a = sampler.generate(PROMPTS, params, seed=3)
    b = sampler.generate(PROMPTS, params, seed=3)
    c = sampler.generate(PROMPTS, params, seed=4)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.logprobs, b.logprobs)
    assert not np.array_equal(a.tokens, c.tokens)
    # A prefix of the batch (different batch bucket) samples the same rows identically.
    d = sampler.generate(PROMPTS[:1], params, seed=3)
    np.testing.assert_array_equal(d.tokens[0], a.tokens[0])


def test_stop_token_and_padding_are_per_sequence(model):
    free = Sampler(model, stop_ids=[1], pad_id=PAD).generate(PROMPTS, SamplingParams(max_new_tokens=12))
    stop = int(free.tokens[0, 3])  # row 0's 4th token becomes the stop token
    sampler = Sampler(model, stop_ids=[stop, 1], pad_id=PAD)
    samples = sampler.generate(PROMPTS, SamplingParams(max_new_tokens=12), max_new_tokens=[12, 12, 12, 5])
    for row in range(len(PROMPTS)):
        reference = free.tokens[row].tolist()
        cap = 5 if row == 3 else 12
        expected = reference[:cap]
        if stop in expected:
            expected = expected[: expected.index(stop) + 1]
        n = len(expected)
        assert samples.lengths[row] == n
        assert samples.tokens[row, :n].tolist() == expected
        assert np.all(samples.tokens[row, n:] == PAD)
        assert samples.mask[row].tolist() == [True] * n + [False] * (12 - n)
    assert samples.lengths[0] == 4 and samples.tokens[0, 3] == stop
    assert samples.lengths[3] <= 5


def test_compiles_once_per_bucket_and_weights_update_without_recompiling(model):
    sampler = Sampler(model, stop_ids=[1], pad_id=PAD, buckets=Buckets(prompt_lengths=(16, 64), batch_sizes=(4, 8)))
    params = SamplingParams(max_new_tokens=6)
    batches = [[[3, 4, 5]], [[1] * 7, [9, 9], [4]], [[2] * 12, [5] * 16, [6], [7, 8]]]
    first = [sampler.generate(b, params) for b in batches]
    assert sampler.num_traces == 1 and sampler._program._cache_size() == 1
    # Temperature and top_p are runtime values: changing them does not recompile either.
    sampler.generate(batches[0], SamplingParams(max_new_tokens=6, temperature=0.5, top_p=0.9))
    sampler.generate(batches[0], SamplingParams(max_new_tokens=6, temperature=0.9, top_p=0.5))
    assert sampler.num_traces == 2
    other = _sharp_tiny_model(seed=1)
    # As a rollout worker receives them: a state rebuilt from (path, value) pairs.
    sampler.update_weights(nnx.from_flat_state(list(nnx.to_flat_state(nnx.state(other)))))
    updated = sampler.generate(batches[2], params)
    assert sampler.num_traces == 2
    assert not np.array_equal(updated.tokens, first[2].tokens)
    expected = _greedy_by_full_recompute(other, batches[2][0], 6)
    assert updated.tokens[0, : len(expected)].tolist() == expected
    # A longer prompt needs the next bucket: exactly one more program.
    sampler.generate([[3] * 20], params)
    assert sampler.num_traces == 3


def test_batch_larger_than_the_largest_bucket_is_split(model):
    sampler = Sampler(model, stop_ids=[1], pad_id=PAD, buckets=Buckets(batch_sizes=(1, 2)))
    params = SamplingParams(max_new_tokens=5, temperature=1.0)
    split = sampler.generate(PROMPTS, params, seed=5)
    whole = Sampler(model, stop_ids=[1], pad_id=PAD).generate(PROMPTS, params, seed=5)
    np.testing.assert_array_equal(split.tokens, whole.tokens)


def _mesh_rules() -> MeshRules:
    rules = ShardingRules.from_dict(yaml.safe_load((ROOT / "configs/sharding/default.yaml").read_text()))
    return MeshRules(make_mesh(data=2, fsdp=2, tensor=2), rules)


def test_eight_device_mesh_gives_single_device_tokens(eight_devices, sampler):
    mesh_rules = _mesh_rules()
    mesh_sampler = Sampler(_sharp_tiny_model(mesh_rules=mesh_rules), stop_ids=[1], pad_id=PAD, mesh_rules=mesh_rules)
    for params in (SamplingParams(max_new_tokens=10), SamplingParams(max_new_tokens=10, temperature=1.0, top_k=40)):
        single = sampler.generate(PROMPTS, params, seed=2)
        sharded = mesh_sampler.generate(PROMPTS, params, seed=2)
        np.testing.assert_array_equal(sharded.tokens, single.tokens)
        np.testing.assert_array_equal(sharded.mask, single.mask)
        np.testing.assert_allclose(sharded.policy_logprobs, single.policy_logprobs, atol=1e-4)
        np.testing.assert_allclose(sharded.logprobs, single.logprobs, atol=1e-4)
    weights = jax.tree.leaves(mesh_sampler._state)
    assert any(len(w.sharding.device_set) == 8 and not w.sharding.is_fully_replicated for w in weights)


@pytest.mark.parametrize(
    "kwargs",
    [{"max_new_tokens": 0}, {"temperature": -1.0}, {"top_k": -2}, {"top_p": 0.0}, {"top_p": 1.5}],
)
def test_invalid_sampling_params_are_user_errors(kwargs):
    with pytest.raises(SamplingParamsError):
        SamplingParams(**kwargs)


def test_bad_requests_are_user_errors(model, sampler):
    with pytest.raises(SamplerError, match="empty"):
        sampler.generate([[3], []], SamplingParams(max_new_tokens=4))
    with pytest.raises(SamplerError, match="vocabulary"):
        sampler.generate([[3, 100000]], SamplingParams(max_new_tokens=4))
    with pytest.raises(SamplerError, match="max_position_embeddings"):
        sampler.generate([[3]], SamplingParams(max_new_tokens=600))
    with pytest.raises(SamplerError, match="stop_ids"):
        Sampler(model, stop_ids=[300], pad_id=0)
    bigger = Llama(preset("tiny").replace(hidden_size=32), nnx.Rngs(0))
    with pytest.raises(SamplerError, match="update_weights"):
        sampler.update_weights(bigger)


@pytest.mark.real_model
def test_embedded_model_greedy_equals_full_recompute_and_transformers(smollm2, embedded_model_dir):
    """SmolLM2-135M-Instruct: cached decoding == no-cache recompute == transformers' greedy generate."""
    import torch
    from transformers import AutoModelForCausalLM

    tok = smollm2.tokenizer
    questions = ["What is the capital of France?", "Write a haiku about the sea, please."]
    prompts = [tok.encode_chat([{"role": "user", "content": q}]) for q in questions]
    steps = 24
    sampler = Sampler(smollm2.model, stop_ids=tok.stop_ids, pad_id=tok.pad_id)
    samples = sampler.generate(prompts, SamplingParams(max_new_tokens=steps))

    hf = AutoModelForCausalLM.from_pretrained(embedded_model_dir, torch_dtype=torch.float32)
    for row, prompt in enumerate(prompts):
        ours = samples.tokens[row, : samples.lengths[row]].tolist()
        assert ours == _greedy_by_full_recompute(smollm2.model, prompt, steps, stop_ids=tuple(tok.stop_ids))
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=steps, do_sample=False,
                              eos_token_id=list(tok.stop_ids), pad_token_id=tok.pad_id)
        assert ours == out[0, len(prompt):].tolist(), (tok.decode(ours), tok.decode(out[0, len(prompt):].tolist()))
        logits = _teacher_forced_logits(smollm2.model, prompt, ours)
        policy = jax.nn.log_softmax(logits, axis=-1)[np.arange(len(ours)), ours]
        np.testing.assert_allclose(samples.policy_logprobs[row, : len(ours)], policy, atol=1e-4)
    assert "Paris" in tok.decode(samples.tokens[0, : samples.lengths[0]].tolist())
