"""Llama-family decoder in Flax NNX: RMSNorm, RoPE, grouped-query attention, SwiGLU, tied embeddings.

Every parameter carries `logical_axes` metadata (see models/sharding.py); activations are pinned with
the same vocabulary when the model is given a mesh. Attention (models/attention.py) takes one of
two paths: a whole sequence without a cache (training, scoring), or a preallocated KV cache written
at `cache_index` (prefill, decode).

Tensor names end in their shape: B batch, T new tokens, S key/cache slots, D embed, N query heads,
K kv heads, G query heads per kv head, H head_dim, F mlp, V vocab.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from models.attention import causal_attention, fused_causal_attention, grouped_query_attention
from models.config import ModelConfig
from models.lora import AdaptedWeight
from models.rope import apply_rope, inverse_frequencies
from models.sharding import MeshRules, constrain


class LayerCache(NamedTuple):
    # Heads-major (B, K, S, H): each (row, kv head) slab of keys/values is contiguous, so decode-time
    # attention reads the cache in place instead of transposing all of it every step.
    k_BxKxSxH: jax.Array
    v_BxKxSxH: jax.Array


LAYER_CACHE_AXES = ("batch", "kv_heads", "length", "head_dim")  # logical axes of LayerCache arrays


class KVCache(NamedTuple):
    """Preallocated keys/values of every layer plus which slots hold real tokens."""

    layers: tuple[LayerCache, ...]
    valid_BxS: jax.Array  # bool: slot holds a real (non-padding) token

    @classmethod
    def zeros(cls, config: ModelConfig, batch: int, slots: int, dtype=None) -> "KVCache":
        dtype = dtype or jnp.dtype(config.dtype)
        shape = (batch, config.num_kv_heads, slots, config.resolved_head_dim)
        layers = tuple(LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(config.num_layers))
        return cls(layers, jnp.zeros((batch, slots), jnp.bool_))


def project(x_BxTxI: jax.Array, w_IxO: jax.Array | AdaptedWeight, w_OxI: jax.Array | None = None) -> jax.Array:
    """Contract x's last axis with w's first as one 2-D matmul, (B*T, I) @ (I, O...).

    `w_IxO` may be an `AdaptedWeight` (models/lora.py: a LoRA training pass with dropout), computed
    unmerged as x W + scale · (dropout(x) A) B; the scale goes on the rank-sized intermediate, the
    smallest tensor of the three products.

    Left as a 3-D einsum, XLA:CPU keeps (B, T) as two dims, and the weight gradient, which then
    contracts over both, runs through a slower batched path; flat operands are plain GEMMs
    (measured ~5% on a SmolLM2 PPO update).

    `w_OxI`, the same weight stored transposed (see `Llama.out_major_projections`), computes
    (w_OxI xᵀ)ᵀ instead: for the few rows of a decode step XLA:CPU's GEMM repacks the (I, O)
    weight on every call, while streaming an (O, I) left operand does not (SmolLM2 decode at
    batch 8: ~14% more tokens/s). The barrier stops XLA folding the transpose back into the product.
    """
    if isinstance(w_IxO, AdaptedWeight):
        adapter_BxTxR = w_IxO.scale * project(w_IxO.drop(x_BxTxI), w_IxO.a_IxR)
        return project(x_BxTxI, w_IxO.w_IxO) + project(adapter_BxTxR, w_IxO.b_RxO)
    *lead, i = x_BxTxI.shape
    if w_OxI is not None:
        return project_out_major(x_BxTxI, w_OxI).reshape(*lead, *w_IxO.shape[1:])
    return jnp.dot(x_BxTxI.reshape(-1, i), w_IxO.reshape(i, -1)).reshape(*lead, *w_IxO.shape[1:])


def project_out_major(x_BxTxI: jax.Array, w_OxI: jax.Array) -> jax.Array:
    """x @ w_OxIᵀ as (w_OxI xᵀ)ᵀ, shape (B, T, O); see `project`."""
    *lead, i = x_BxTxI.shape
    y_OxR = jax.lax.optimization_barrier(jnp.dot(w_OxI, x_BxTxI.reshape(-1, i).T))
    return y_OxR.T.reshape(*lead, -1)


Projections = dict[str, jax.Array]  # one block's projection weights, (out, in), by name


def compute_weight(param: nnx.Param, dtype) -> jax.Array | AdaptedWeight:
    """A projection weight in the compute dtype. `get_value`, not `[...]`: in a LoRA training pass with
    dropout the parameter holds an `AdaptedWeight` (W with its adapter apart), which `project` takes."""
    return param.get_value().astype(dtype)


def _param(init, rngs: nnx.Rngs, shape, dtype, logical_axes) -> nnx.Param:
    return nnx.Param(init(rngs.params(), shape, dtype), logical_axes=tuple(logical_axes))


_normal = jax.nn.initializers.normal(0.02)


class RMSNorm(nnx.Module):
    """Over the last axis: the hidden states (by default) or, for Qwen3's q/k norms, each head's head_dim."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs, size: int | None = None, axis: str = "embed"):
        self.eps = config.rms_norm_eps
        self.dtype = jnp.dtype(config.dtype)
        self.scale = _param(jax.nn.initializers.ones, rngs, (size or config.hidden_size,), config.param_dtype, (axis,))

    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        # Normalise in fp32 whatever the compute dtype: bf16 sums of squares lose too much.
        x = x_BxTxD.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(self.dtype) * x.astype(self.dtype)


class Attention(nnx.Module):
    def __init__(self, config: ModelConfig, rngs: nnx.Rngs, mesh_rules: MeshRules | None = None):
        d, n, k, h = config.hidden_size, config.num_heads, config.num_kv_heads, config.resolved_head_dim
        pd = config.param_dtype
        self.q_DxNxH = _param(_normal, rngs, (d, n, h), pd, ("embed", "heads", "head_dim"))
        self.k_DxKxH = _param(_normal, rngs, (d, k, h), pd, ("embed", "kv_heads", "head_dim"))
        self.v_DxKxH = _param(_normal, rngs, (d, k, h), pd, ("embed", "kv_heads", "head_dim"))
        self.o_NxHxD = _param(_normal, rngs, (n, h, d), pd, ("heads", "head_dim", "embed"))
        if config.qkv_bias:  # Qwen2
            zeros = jax.nn.initializers.zeros
            self.q_bias_NxH = _param(zeros, rngs, (n, h), pd, ("heads", "head_dim"))
            self.k_bias_KxH = _param(zeros, rngs, (k, h), pd, ("kv_heads", "head_dim"))
            self.v_bias_KxH = _param(zeros, rngs, (k, h), pd, ("kv_heads", "head_dim"))
        if config.qk_norm:  # Qwen3
            self.q_norm = RMSNorm(config, rngs, h, "head_dim")
            self.k_norm = RMSNorm(config, rngs, h, "head_dim")
        self.qkv_bias, self.qk_norm = config.qkv_bias, config.qk_norm
        # A tuple, not an array: module attributes that are not Variables must be hashable (static).
        self.inv_freq = tuple(inverse_frequencies(h, config.rope_theta, config.rope_scaling).tolist())
        self.dtype = jnp.dtype(config.dtype)
        self.attention = config.attention
        self.mesh_rules = mesh_rules

    def __call__(
        self,
        x_BxTxD: jax.Array,
        positions_BxT: jax.Array,
        key_valid_BxS: jax.Array,
        cache: LayerCache | None,
        cache_index: jax.Array | int,
        out_major: Projections | None = None,
    ) -> tuple[jax.Array, LayerCache | None]:
        dt = self.dtype
        transposed = out_major or {}
        q_BxTxNxH = project(x_BxTxD, compute_weight(self.q_DxNxH, dt), transposed.get("q"))
        k_BxTxKxH = project(x_BxTxD, compute_weight(self.k_DxKxH, dt), transposed.get("k"))
        v_BxTxKxH = project(x_BxTxD, compute_weight(self.v_DxKxH, dt), transposed.get("v"))
        if self.qkv_bias:
            q_BxTxNxH = q_BxTxNxH + self.q_bias_NxH[...].astype(dt)
            k_BxTxKxH = k_BxTxKxH + self.k_bias_KxH[...].astype(dt)
            v_BxTxKxH = v_BxTxKxH + self.v_bias_KxH[...].astype(dt)
        if self.qk_norm:
            q_BxTxNxH, k_BxTxKxH = self.q_norm(q_BxTxNxH), self.k_norm(k_BxTxKxH)
        q_BxTxNxH = constrain(apply_rope(q_BxTxNxH, positions_BxT, self.inv_freq), ("batch", "length", "heads", "head_dim"), self.mesh_rules)
        k_BxTxKxH = apply_rope(k_BxTxKxH, positions_BxT, self.inv_freq)
        if cache is None:  # a full sequence: training and scoring
            attend = fused_causal_attention if self.attention == "cudnn" else causal_attention
            return self._project_out(attend(q_BxTxNxH, k_BxTxKxH.astype(dt), v_BxTxKxH, key_valid_BxS)), None

        start = (0, 0, cache_index, 0)
        k_BxKxTxH = k_BxTxKxH.transpose(0, 2, 1, 3).astype(cache.k_BxKxSxH.dtype)
        v_BxKxTxH = v_BxTxKxH.transpose(0, 2, 1, 3).astype(cache.v_BxKxSxH.dtype)
        k_BxKxSxH = jax.lax.dynamic_update_slice(cache.k_BxKxSxH, k_BxKxTxH, start)
        v_BxKxSxH = jax.lax.dynamic_update_slice(cache.v_BxKxSxH, v_BxKxTxH, start)
        new_cache = LayerCache(k_BxKxSxH, v_BxKxSxH)
        query_slots_T = cache_index + jnp.arange(x_BxTxD.shape[1])
        key_slots_S = jnp.arange(k_BxKxSxH.shape[2])
        causal_TxS = key_slots_S[None, :] <= query_slots_T[:, None]
        mask_BxTxS = causal_TxS[None] & key_valid_BxS[:, None, :]

        out_BxTxNxH = grouped_query_attention(q_BxTxNxH, k_BxKxSxH.astype(dt), v_BxKxSxH.astype(dt), mask_BxTxS)
        return self._project_out(out_BxTxNxH, transposed.get("o")), new_cache

    def _project_out(self, out_BxTxNxH: jax.Array, o_DxF: jax.Array | None = None) -> jax.Array:
        # One (N*H) contraction on explicitly flattened operands: given two contracting dims, XLA may
        # pick the (H, N) order and transpose the whole weight matrix on every decode step.
        b, t, n, h = out_BxTxNxH.shape
        o = compute_weight(self.o_NxHxD, self.dtype)
        o_FxD = o.flatten_input(n * h) if isinstance(o, AdaptedWeight) else o.reshape(n * h, -1)
        return project(out_BxTxNxH.reshape(b, t, n * h), o_FxD, o_DxF)


class MLP(nnx.Module):
    """SwiGLU: down(silu(x W_gate) * (x W_up))."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs, mesh_rules: MeshRules | None = None):
        d, f, pd = config.hidden_size, config.intermediate_size, config.param_dtype
        self.gate_DxF = _param(_normal, rngs, (d, f), pd, ("embed", "mlp"))
        self.up_DxF = _param(_normal, rngs, (d, f), pd, ("embed", "mlp"))
        self.down_FxD = _param(_normal, rngs, (f, d), pd, ("mlp", "embed"))
        self.dtype = jnp.dtype(config.dtype)
        self.mesh_rules = mesh_rules

    def __call__(self, x_BxTxD: jax.Array, out_major: Projections | None = None) -> jax.Array:
        dt = self.dtype
        transposed = out_major or {}
        gate_BxTxF = project(x_BxTxD, compute_weight(self.gate_DxF, dt), transposed.get("gate"))
        up_BxTxF = project(x_BxTxD, compute_weight(self.up_DxF, dt), transposed.get("up"))
        hidden_BxTxF = constrain(jax.nn.silu(gate_BxTxF) * up_BxTxF, ("batch", "length", "mlp"), self.mesh_rules)
        return project(hidden_BxTxF, compute_weight(self.down_FxD, dt), transposed.get("down"))


class Block(nnx.Module):
    def __init__(self, config: ModelConfig, rngs: nnx.Rngs, mesh_rules: MeshRules | None = None):
        self.attn_norm = RMSNorm(config, rngs)
        self.attn = Attention(config, rngs, mesh_rules)
        self.mlp_norm = RMSNorm(config, rngs)
        self.mlp = MLP(config, rngs, mesh_rules)
        self.mesh_rules = mesh_rules

    def __call__(self, x_BxTxD, positions_BxT, key_valid_BxS, cache, cache_index, out_major: Projections | None = None):
        attn_out, new_cache = self.attn(self.attn_norm(x_BxTxD), positions_BxT, key_valid_BxS, cache, cache_index, out_major)
        x_BxTxD = x_BxTxD + attn_out
        x_BxTxD = x_BxTxD + self.mlp(self.mlp_norm(x_BxTxD), out_major)
        return constrain(x_BxTxD, ("batch", "length", "embed"), self.mesh_rules), new_cache


def _rematerialised_block(block: Block, x_BxTxD, positions_BxT, key_valid_BxS):
    """Training-time block whose activations are recomputed in the backward pass (saves memory).

    A pure `jax.checkpoint` over the block's state, not `nnx.remat`: nnx.remat writes the block's
    Variables back after the call, which fails ("Cannot mutate Param from a different trace level")
    when some of them come from outside the gradient's trace, as a LoRA state's frozen base does."""
    graphdef, state = nnx.split(block)

    def run(state, x_BxTxD):
        return nnx.merge(graphdef, state)(x_BxTxD, positions_BxT, key_valid_BxS, None, 0)[0]

    return jax.checkpoint(run)(state, x_BxTxD)


def default_positions(mask_BxT: jax.Array) -> jax.Array:
    """Position of each token among the real tokens of its row (left padding takes no positions)."""
    return jnp.maximum(jnp.cumsum(mask_BxT.astype(jnp.int32), axis=-1) - 1, 0)


class Llama(nnx.Module):
    """Decoder-only language model. `__call__` returns fp32 logits; `hidden` the final normed states."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs, mesh_rules: MeshRules | None = None):
        self.config = config
        self.mesh_rules = mesh_rules
        self.embed_VxD = _param(_normal, rngs, (config.vocab_size, config.hidden_size), config.param_dtype, ("vocab", "embed"))
        self.blocks = nnx.List([Block(config, rngs, mesh_rules) for _ in range(config.num_layers)])
        self.final_norm = RMSNorm(config, rngs)
        if not config.tie_embeddings:
            self.lm_head_DxV = _param(_normal, rngs, (config.hidden_size, config.vocab_size), config.param_dtype, ("embed", "vocab"))

    def hidden(
        self,
        tokens_BxT: jax.Array,
        mask_BxT: jax.Array | None = None,
        positions_BxT: jax.Array | None = None,
        cache: KVCache | None = None,
        cache_index: jax.Array | int = 0,
        out_major: tuple[Projections, ...] | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        if mask_BxT is None:
            mask_BxT = jnp.ones(tokens_BxT.shape, jnp.bool_)
        mask_BxT = mask_BxT.astype(jnp.bool_)
        if positions_BxT is None:
            positions_BxT = default_positions(mask_BxT)
        if cache is None:
            key_valid_BxS = mask_BxT
        else:
            key_valid_BxS = jax.lax.dynamic_update_slice(cache.valid_BxS, mask_BxT, (0, cache_index))

        dt = jnp.dtype(self.config.dtype)
        x_BxTxD = jnp.take(self.embed_VxD[...], tokens_BxT, axis=0).astype(dt)
        x_BxTxD = constrain(x_BxTxD, ("batch", "length", "embed"), self.mesh_rules)
        if self.config.scan_layers and cache is None:
            return self.final_norm(self._scanned_blocks(x_BxTxD, positions_BxT, key_valid_BxS)), None
        new_layers = []
        for i, block in enumerate(self.blocks):
            layer_cache = None if cache is None else cache.layers[i]
            if self.config.remat and cache is None:
                x_BxTxD = _rematerialised_block(block, x_BxTxD, positions_BxT, key_valid_BxS)
            else:
                x_BxTxD, layer_cache = block(x_BxTxD, positions_BxT, key_valid_BxS, layer_cache, cache_index,
                                             None if out_major is None else out_major[i])
            new_layers.append(layer_cache)
        new_cache = None if cache is None else KVCache(tuple(new_layers), key_valid_BxS)
        return self.final_norm(x_BxTxD), new_cache

    def _scanned_blocks(self, x_BxTxD, positions_BxT, key_valid_BxS) -> jax.Array:
        """Every block as one `lax.scan` step over the blocks' parameters stacked along a new leading
        axis (see ModelConfig.scan_layers); gradients flow back through the stack to each layer."""
        graphdef = nnx.graphdef(self.blocks[0])
        stacked_L = jax.tree.map(lambda *layers: jnp.stack(layers), *(nnx.state(b) for b in self.blocks))

        def step(x_BxTxD, layer_state):
            block = nnx.merge(graphdef, layer_state)
            return block(x_BxTxD, positions_BxT, key_valid_BxS, None, 0)[0], None

        if self.config.remat:
            step = jax.checkpoint(step)
        return jax.lax.scan(step, x_BxTxD, stacked_L)[0]

    def logits(self, hidden_BxTxD: jax.Array, out_major: bool = False) -> jax.Array:
        """fp32 logits. `out_major` (decode steps on CPU): a tied (V, D) embedding is already
        out-major, so it goes through `project_out_major`; an untied head keeps its layout."""
        dt = jnp.dtype(self.config.dtype)
        if self.config.tie_embeddings and out_major:
            logits = project_out_major(hidden_BxTxD, self.embed_VxD[...].astype(dt))
        elif self.config.tie_embeddings:
            logits = jnp.einsum("btd,vd->btv", hidden_BxTxD, self.embed_VxD[...].astype(dt))
        elif isinstance(head := compute_weight(self.lm_head_DxV, dt), AdaptedWeight):
            logits = project(hidden_BxTxD, head)  # a LoRA training pass with dropout
        else:
            logits = jnp.einsum("btd,dv->btv", hidden_BxTxD, head)
        return constrain(logits.astype(jnp.float32), ("batch", "length", "vocab"), self.mesh_rules)

    def __call__(self, tokens_BxT, mask_BxT=None, positions_BxT=None) -> jax.Array:
        hidden_BxTxD, _ = self.hidden(tokens_BxT, mask_BxT, positions_BxT)
        return self.logits(hidden_BxTxD)

    def decode(self, tokens_BxT, mask_BxT, positions_BxT, cache: KVCache, cache_index,
               out_major: tuple[Projections, ...] | None = None) -> tuple[jax.Array, KVCache]:
        """Run new tokens against (and into) the KV cache; returns their logits and the updated cache.

        `out_major`: `out_major_projections()`, for decode steps on CPU (see `project`)."""
        hidden_BxTxD, new_cache = self.hidden(tokens_BxT, mask_BxT, positions_BxT, cache, cache_index, out_major)
        return self.logits(hidden_BxTxD, out_major is not None), new_cache

    def out_major_projections(self) -> tuple[Projections, ...]:
        """Every block's projection weights as (out, in) matrices in the compute dtype, the layout
        `project` streams in few-row products. Build them once per generate, outside its decode
        loop: a transpose inside the loop would be redone every step."""
        config = self.config
        dt = jnp.dtype(config.dtype)
        d, f = config.hidden_size, config.intermediate_size
        heads_out = config.num_heads * config.resolved_head_dim

        def out_major(w: nnx.Param, fan_in: int) -> jax.Array:
            return w[...].astype(dt).reshape(fan_in, -1).T

        projections = tuple(
            {"q": out_major(b.attn.q_DxNxH, d), "k": out_major(b.attn.k_DxKxH, d), "v": out_major(b.attn.v_DxKxH, d),
             "o": out_major(b.attn.o_NxHxD, heads_out), "gate": out_major(b.mlp.gate_DxF, d),
             "up": out_major(b.mlp.up_DxF, d), "down": out_major(b.mlp.down_FxD, f)}
            for b in self.blocks
        )
        # Materialised here: otherwise XLA may fold each transpose into its product inside the loop.
        return jax.lax.optimization_barrier(projections)


class ScalarModel(nnx.Module):
    """A decoder with a scalar head on its final hidden states: the value model and the preference model.

    The backbone keeps the LM's parameter layout so it can start from any causal-LM checkpoint.
    """

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs, mesh_rules: MeshRules | None = None):
        self.backbone = Llama(config, rngs, mesh_rules)
        self.head_D = _param(jax.nn.initializers.zeros, rngs, (config.hidden_size,), config.param_dtype, ("embed",))
        self.head_bias = _param(jax.nn.initializers.zeros, rngs, (), config.param_dtype, ())

    def __call__(self, tokens_BxT, mask_BxT=None, positions_BxT=None) -> jax.Array:
        """Scalar per position, fp32, shape [B, T]."""
        hidden_BxTxD, _ = self.backbone.hidden(tokens_BxT, mask_BxT, positions_BxT)
        values = jnp.einsum("btd,d->bt", hidden_BxTxD.astype(jnp.float32), self.head_D[...].astype(jnp.float32))
        return values + self.head_bias[...].astype(jnp.float32)


def logical_axes_tree(model: nnx.Module):
    """State of `model` with each parameter replaced by its tuple of logical axis names."""
    return jax.tree.map(
        lambda v: v.get_metadata()["logical_axes"],
        nnx.state(model, nnx.Param),
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )

