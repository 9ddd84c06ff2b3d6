"""The Llama model against a plain numpy reference (GQA, Llama-3 RoPE scaling), KV-cache decoding, remat."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.config import PRESETS, RopeScaling
from models.attention import causal_attention, fused_causal_attention, grouped_query_attention
from models.llama import KVCache, Llama
from models.rope import inverse_frequencies
from models.sources import build_llama

SCALING = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64)


def reference_inv_freq(head_dim, theta, scaling):
    """Llama 3's published rule, one frequency at a time."""
    out = []
    for i in range(0, head_dim, 2):
        freq = 1.0 / theta ** (i / head_dim)
        if scaling is not None:
            wavelength = 2 * math.pi / freq
            low, high = (scaling.original_max_position_embeddings / f for f in (scaling.low_freq_factor, scaling.high_freq_factor))
            if wavelength > low:
                freq = freq / scaling.factor
            elif wavelength >= high:
                smooth = (scaling.original_max_position_embeddings / wavelength - scaling.low_freq_factor) / (
                    scaling.high_freq_factor - scaling.low_freq_factor)
                freq = (1 - smooth) * freq / scaling.factor + smooth * freq
        out.append(freq)
    return np.array(out)


def test_rope_scaling_matches_reference_and_changes_low_frequencies():
    for scaling in (None, SCALING):
        ours = inverse_frequencies(64, 500000.0, scaling)
        np.testing.assert_allclose(ours, reference_inv_freq(64, 500000.0, scaling), rtol=1e-6)
    scaled, plain = inverse_frequencies(64, 500000.0, SCALING), inverse_frequencies(64, 500000.0, None)
    assert scaled[0] == plain[0] and np.isclose(scaled[-1], plain[-1] / 8)  # high kept, low divided


def _rms(x, scale, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def _rope(x_TxNxH, inv_freq):
    half = x_TxNxH.shape[-1] // 2
    angles = np.arange(x_TxNxH.shape[0])[:, None, None] * inv_freq[None, None, :]
    a, b = x_TxNxH[..., :half], x_TxNxH[..., half:]
    return np.concatenate([a * np.cos(angles) - b * np.sin(angles), b * np.cos(angles) + a * np.sin(angles)], -1)


def reference_logits(params, config, tokens_T):
    """float64 numpy forward pass: per-head loops, kv head n // (N / K) for query head n."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    n, k, h = config.num_heads, config.num_kv_heads, config.resolved_head_dim
    inv_freq = reference_inv_freq(h, config.rope_theta, config.rope_scaling)
    t = len(tokens_T)
    x = p[("embed_VxD",)][tokens_T]
    causal = np.tril(np.ones((t, t), bool))
    for i in range(config.num_layers):
        get = lambda *name: p[("blocks", i, *name)]  # noqa: E731
        y = _rms(x, get("attn_norm", "scale"), config.rms_norm_eps)
        q = _rope(np.einsum("td,dnh->tnh", y, get("attn", "q_DxNxH")), inv_freq)
        kk = _rope(np.einsum("td,dkh->tkh", y, get("attn", "k_DxKxH")), inv_freq)
        v = np.einsum("td,dkh->tkh", y, get("attn", "v_DxKxH"))
        heads = []
        for head in range(n):
            g = head // (n // k)
            scores = np.where(causal, q[:, head] @ kk[:, g].T / math.sqrt(h), -np.inf)
            probs = np.exp(scores - scores.max(-1, keepdims=True))
            heads.append((probs / probs.sum(-1, keepdims=True)) @ v[:, g])
        x = x + np.einsum("tnh,nhd->td", np.stack(heads, 1), get("attn", "o_NxHxD"))
        y = _rms(x, get("mlp_norm", "scale"), config.rms_norm_eps)
        gate = y @ get("mlp", "gate_DxF")
        x = x + (gate / (1 + np.exp(-gate)) * (y @ get("mlp", "up_DxF"))) @ get("mlp", "down_FxD")
    x = _rms(x, p[("final_norm", "scale")], config.rms_norm_eps)
    head = p[("embed_VxD",)].T if config.tie_embeddings else p[("lm_head_DxV",)]
    return x @ head


def random_params(config, seed=0, gain=1.0):
    """Params large enough that every component moves the logits (default init leaves them ~0); `gain` scales them."""
    rng = np.random.default_rng(seed)
    params = {}
    abstract = nnx.state(nnx.eval_shape(lambda: Llama(config, nnx.Rngs(0))), nnx.Param)
    for path, w in nnx.to_flat_state(abstract):
        scale = 0.1 if path[-1] == "scale" else 0.6 if path[-1] in ("embed_VxD", "lm_head_DxV") else 0.15
        base = 1.0 if path[-1] == "scale" else 0.0
        params[path] = (base + gain * scale * rng.standard_normal(w.shape)).astype(np.float32)
    return params


@pytest.mark.parametrize("tie", [True, False])
def test_gqa_and_scaled_rope_match_numpy_reference(tie):
    config = PRESETS["tiny"].replace(rope_scaling=SCALING, tie_embeddings=tie, num_heads=4, num_kv_heads=2, rope_theta=500000.0)
    params = random_params(config)
    tokens = np.array([3, 17, 250, 9, 9, 41, 100, 7, 0, 199, 64, 5, 31, 77, 2, 8])
    ours = np.asarray(build_llama(config, params)(jnp.asarray(tokens[None])))[0]
    ref = reference_logits(params, config, tokens)
    assert np.abs(ref).max() > 1.0
    np.testing.assert_allclose(ours, ref, atol=2e-5, rtol=0)


@pytest.mark.parametrize("out_major", [False, True], ids=["in-major", "out-major"])
def test_decode_with_cache_equals_full_forward(out_major):
    """Also with the transposed weight copies the CPU sampler decodes small batches with."""
    config = PRESETS["tiny"]
    model = build_llama(config, random_params(config, seed=1))
    tokens_BxT = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (2, 12)))
    # Row 0 is left-padded by three slots: padding must neither be attended to nor take positions.
    mask_BxT = jnp.ones((2, 12), bool).at[0, :3].set(False)
    positions_BxT = jnp.maximum(jnp.cumsum(mask_BxT, axis=1) - 1, 0)
    full_BxTxV = nnx.jit(lambda m, *args: m(*args))(model, tokens_BxT, mask_BxT, positions_BxT)
    # Two compiles (prefill, one token) instead of eager ops.
    decode = nnx.jit(lambda m, *args: m.decode(*args, m.out_major_projections() if out_major else None))

    cache = KVCache.zeros(config, batch=2, slots=16)
    prefill = 7
    logits, cache = decode(model, tokens_BxT[:, :prefill], mask_BxT[:, :prefill], positions_BxT[:, :prefill], cache, 0)
    steps = [logits]
    for t in range(prefill, 12):
        logits, cache = decode(model, tokens_BxT[:, t:t + 1], mask_BxT[:, t:t + 1], positions_BxT[:, t:t + 1], cache, jnp.int32(t))
        steps.append(logits)
    decoded_BxTxV = jnp.concatenate(steps, axis=1)
    np.testing.assert_allclose(np.asarray(decoded_BxTxV)[0, 3:], np.asarray(full_BxTxV)[0, 3:], atol=5e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(decoded_BxTxV)[1], np.asarray(full_BxTxV)[1], atol=5e-5, rtol=0)


@pytest.mark.parametrize("changes", [{"remat": True}, {"scan_layers": True}, {"scan_layers": True, "remat": True}],
                         ids=["remat", "scan_layers", "scan_layers+remat"])
def test_remat_and_scan_layers_give_the_same_loss_and_gradients(changes):
    params = random_params(PRESETS["tiny"], seed=2)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 256, (2, 10)))

    def loss_and_grads(config):
        model = build_llama(config, params)

        def loss(m):
            logits = m(tokens[:, :-1])
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], axis=-1))

        value, grads = nnx.jit(nnx.value_and_grad(loss))(model)
        return value, grads

    (l0, g0), (l1, g1) = loss_and_grads(PRESETS["tiny"]), loss_and_grads(PRESETS["tiny"].replace(**changes))
    # Same parameter tree either way: checkpoints and HF names do not depend on these settings.
    assert [p for p, _ in nnx.to_flat_state(g0)] == [p for p, _ in nnx.to_flat_state(g1)]
    g0, g1 = jax.tree.leaves(g0), jax.tree.leaves(g1)
    np.testing.assert_allclose(l0, l1, rtol=1e-6)
    for a, b in zip(g0, g1):
        np.testing.assert_allclose(a, b, atol=5e-6, rtol=1e-5)  # fusion-order float noise
    assert any(float(jnp.abs(g).max()) > 1e-3 for g in g0)


def test_fused_attention_path_matches_grouped_query_attention():
    """The cuDNN path's layout, GQA grouping, causal and padding masks, checked through the same
    jax.nn.dot_product_attention call with its portable XLA implementation (no GPU here)."""
    b, t, n, k, h = 2, 6, 4, 2, 8
    q, kk, v = (jax.random.normal(jax.random.PRNGKey(i), shape) for i, shape in
                enumerate([(b, t, n, h), (b, k, t, h), (b, k, t, h)]))
    valid = jnp.array([[True] * t, [False, False] + [True] * (t - 2)])  # second row left-padded
    causal = jnp.tril(jnp.ones((t, t), bool))
    expected = grouped_query_attention(q, kk, v, causal[None] & valid[:, None, :])
    got = fused_causal_attention(q, kk.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), valid, implementation="xla")
    np.testing.assert_allclose(got[0], expected[0], atol=1e-5)
    np.testing.assert_allclose(got[1, 2:], expected[1, 2:], atol=1e-5)  # padded queries: any finite value
    assert bool(jnp.all(jnp.isfinite(got)))


def test_causal_attention_matches_grouped_query_attention_values_and_gradients():
    """The training path's hand-written backward against autodiff of the cached path's maths, with a
    left-padded row (whose all-masked queries must get zero query gradient, as `where` gives)."""
    b, t, n, k, h = 2, 7, 6, 2, 8
    q, kk, v, w = (jax.random.normal(jax.random.PRNGKey(i), shape) for i, shape in
                   enumerate([(b, t, n, h), (b, t, k, h), (b, t, k, h), (b, t, n, h)]))
    valid = jnp.array([[True] * t, [False, False, False] + [True] * (t - 3)])
    mask = jnp.tril(jnp.ones((t, t), bool))[None] & valid[:, None, :]

    def reference(q, kk, v):
        return grouped_query_attention(q, kk.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask)

    def weighted(attend):
        return lambda q, kk, v: jnp.sum(attend(q, kk, v) * w)

    np.testing.assert_allclose(causal_attention(q, kk, v, valid), reference(q, kk, v), atol=1e-6)
    got = jax.grad(weighted(lambda q, kk, v: causal_attention(q, kk, v, valid)), argnums=(0, 1, 2))(q, kk, v)
    expected = jax.grad(weighted(reference), argnums=(0, 1, 2))(q, kk, v)
    for name, g, e in zip("qkv", got, expected):
        np.testing.assert_allclose(g, e, atol=1e-5, rtol=1e-5, err_msg=f"d{name}")
        assert float(jnp.abs(e).max()) > 1e-2
    assert float(jnp.abs(got[0][1, :3]).max()) == 0.0  # queries with no valid key


def test_causal_attention_in_bfloat16_returns_bfloat16_gradients_close_to_float32():
    b, t, n, k, h = 2, 5, 4, 2, 8
    q, kk, v = (jax.random.normal(jax.random.PRNGKey(i), shape) for i, shape in
                enumerate([(b, t, n, h), (b, t, k, h), (b, t, k, h)]))
    valid = jnp.ones((b, t), bool)

    def grads(dtype):
        loss = lambda q, kk, v: jnp.sum(causal_attention(q, kk, v, valid).astype(jnp.float32) ** 2)
        return jax.grad(loss, argnums=(0, 1, 2))(q.astype(dtype), kk.astype(dtype), v.astype(dtype))

    for g16, g32 in zip(grads(jnp.bfloat16), grads(jnp.float32)):
        assert g16.dtype == jnp.bfloat16
        np.testing.assert_allclose(g16.astype(jnp.float32), g32, atol=0.1, rtol=0.05)


def test_cudnn_attention_needs_a_16_bit_dtype():
    from models.config import ModelConfigError

    with pytest.raises(ModelConfigError, match="16-bit"):
        PRESETS["tiny"].replace(attention="cudnn")
    with pytest.raises(ModelConfigError, match="attention must be"):
        PRESETS["tiny"].replace(attention="flash")
    assert PRESETS["tiny"].replace(attention="cudnn", dtype="bfloat16").attention == "cudnn"
