"""Generation with a KV cache (the `Sampler`): prefill and the whole decode loop as one compiled XLA
program. The per-step token choice (temperature, top-k, top-p, log-probs) is models/sampling.py.

`Sampler.generate` left-pads the prompts into a (batch, prompt-length, new-tokens) shape bucket and
runs one jitted program: it allocates the KV cache, prefills it with the prompts, then a
`lax.while_loop` decodes one token per step until every sequence has produced a stop token or its
token budget. Model weights are an argument of the program (NNX graphdef/state split outside jit),
so new policy weights (`update_weights`) never trigger a recompile; only a new bucket or sampling
mode does.

Cache layout: slots [0, P) hold the left-padded prompt, slot P + i the i-th new token (the same slot
for every row); a token's RoPE position is its index among its row's real tokens.
The cache is allocated inside the program and updated in place by the while loop (XLA aliases
loop-carried buffers), so it never exists outside the program: there is no input cache to donate,
and peak memory holds exactly one cache.
B batch, P prompt slots, N new-token slots, S = P + N cache slots, V vocab.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.errors import UserError
from models.llama import LAYER_CACHE_AXES, KVCache, Llama, default_positions
from models.sampling import SamplingMode, SamplingParams, sample_step
from models.sharding import MeshRules, state_shardings

__all__ = ["Buckets", "Sampler", "SamplerError", "Samples", "SamplingParams"]


class SamplerError(UserError, ValueError):
    """Prompts, weights or bucket settings the sampler cannot run."""


# On CPU, decode steps of 2-16 rows stream transposed weight copies (see `models.llama.project`).
# SmolLM2-135M, 2 cores, tokens/s vs the plain layout: batch 4 and 8 +12-13%, 16 +3%; batch 1 and
# 32 lose ~4% (a matrix-vector product, and a product large enough for the GEMM's packing to pay).
# Accelerators' matmul libraries take either layout at full speed, so they never get the copies.
_OUT_MAJOR_MAX_BATCH = 16


def _powers_of_two(lo: int, hi: int) -> tuple[int, ...]:
    return tuple(2**i for i in range(int(math.log2(lo)), int(math.log2(hi)) + 1))


def _ladder(lo: int, hi: int) -> tuple[int, ...]:
    """Powers of two and the 1.5x steps between them (16, 24, 32, 48, ...): at most 1/3 padding."""
    sizes = [s for p in _powers_of_two(lo, hi) for s in (p, p * 3 // 2)]
    return tuple(s for s in sizes if s <= hi)


@dataclasses.dataclass(frozen=True)
class Buckets:
    """Allowed compiled shapes; each request is rounded up to the next size in each list.

    A batch larger than the largest batch bucket is split into several programs' worth of rows.
    """

    # Prefill cost grows with the padded prompt length, so prompt buckets are finer than the rest.
    prompt_lengths: tuple[int, ...] = _ladder(16, 8192)
    batch_sizes: tuple[int, ...] = _powers_of_two(1, 512)
    new_tokens: tuple[int, ...] = _powers_of_two(16, 8192)

    def __post_init__(self):
        for name in ("prompt_lengths", "batch_sizes", "new_tokens"):
            sizes = getattr(self, name)
            if not sizes or any(not isinstance(s, int) or s <= 0 for s in sizes) or list(sizes) != sorted(set(sizes)):
                raise SamplerError(f"sampler buckets: {name} must be a non-empty increasing list of positive integers, got {sizes!r}")

    @staticmethod
    def _round_up(value: int, sizes: tuple[int, ...], what: str) -> int:
        for size in sizes:
            if size >= value:
                return size
        raise SamplerError(f"sampler: {what} {value} exceeds the largest bucket {sizes[-1]}; add a larger bucket")

    def prompt_length(self, n: int) -> int:
        return self._round_up(n, self.prompt_lengths, "prompt length")

    def new_token_count(self, n: int) -> int:
        return self._round_up(n, self.new_tokens, "max_new_tokens")

    def batch_size(self, n: int, multiple: int = 1) -> int:
        """Smallest batch bucket >= n that the mesh's batch axes divide."""
        for size in self.batch_sizes:
            if size >= n and size % multiple == 0:
                return size
        return -(-n // multiple) * multiple


@dataclasses.dataclass
class Samples:
    """Generated responses (response tokens only), batch-major numpy arrays. T = max_new_tokens."""

    tokens: np.ndarray  # [B, T] int32, pad_id after the end
    mask: np.ndarray  # [B, T] bool, True for generated tokens including the stop token
    logprobs: np.ndarray  # [B, T] float32, log-prob under the sampling distribution (0 when greedy)
    policy_logprobs: np.ndarray  # [B, T] float32, under the unmodified policy (temperature 1, no filtering)
    lengths: np.ndarray  # [B] int32


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything the compiled program is specialised on besides input shapes."""

    mode: SamplingMode
    num_new: int  # N, new-token slots
    stop_ids: tuple[int, ...]
    pad_id: int
    out_major_decode: bool  # decode with `Llama.out_major_projections`


def _batch_spec(mesh_rules: MeshRules | None, *rest) -> Any:
    if mesh_rules is None:
        return None
    return mesh_rules.activation_sharding(("batch", *rest))


def _generate_program(graphdef, static: _Static, mesh_rules: MeshRules | None, state, prompt_BxP, prompt_mask_BxP,
                      max_new_B, keys_B, temperature, top_p):
    """Prefill + decode loop. Returns (tokens_BxN, mask_BxN, logprob_BxN, policy_logprob_BxN)."""
    model: Llama = nnx.merge(graphdef, state)
    config = model.config
    batch, prompt_slots = prompt_BxP.shape
    num_new = static.num_new
    cache = KVCache.zeros(config, batch, prompt_slots + num_new)
    if mesh_rules is not None:
        cache = jax.tree.map(
            lambda x: mesh_rules.constrain(x, LAYER_CACHE_AXES if x.ndim == 4 else ("batch", "length")), cache
        )

    # Prefill: only the last slot's logits are needed (left padding puts every row's last token there).
    hidden_BxPxD, cache = model.hidden(prompt_BxP, prompt_mask_BxP, default_positions(prompt_mask_BxP), cache, 0)
    logits_BxV = model.logits(hidden_BxPxD[:, -1:])[:, 0]
    prompt_len_B = jnp.sum(prompt_mask_BxP, axis=-1, dtype=jnp.int32)
    stop_ids = jnp.asarray(static.stop_ids or (-1,), jnp.int32)  # -1: no token stops
    out_major = model.out_major_projections() if static.out_major_decode else None

    def sample_into(step, logits_BxV, done_B, out):
        tokens_BxN, mask_BxN, logprob_BxN, policy_BxN = out
        step_keys_B = jax.vmap(jax.random.fold_in, (0, None))(keys_B, step)
        token_B, logprob_B, policy_B = sample_step(logits_BxV, step_keys_B, static.mode, temperature, top_p)
        active_B = ~done_B
        token_B = jnp.where(active_B, token_B, static.pad_id)
        is_stop_B = jnp.any(token_B[:, None] == stop_ids[None, :], axis=-1)
        done_B = done_B | (active_B & (is_stop_B | (step + 1 >= max_new_B)))
        zero = jnp.zeros_like(logprob_B)
        out = (
            tokens_BxN.at[:, step].set(token_B),
            mask_BxN.at[:, step].set(active_B),
            logprob_BxN.at[:, step].set(jnp.where(active_B, logprob_B, zero)),
            policy_BxN.at[:, step].set(jnp.where(active_B, policy_B, zero)),
        )
        return token_B, done_B, out

    out = (
        jnp.full((batch, num_new), static.pad_id, jnp.int32),
        jnp.zeros((batch, num_new), jnp.bool_),
        jnp.zeros((batch, num_new), jnp.float32),
        jnp.zeros((batch, num_new), jnp.float32),
    )
    if mesh_rules is not None:
        out = tuple(mesh_rules.constrain(x, ("batch", "length")) for x in out)
    done_B = max_new_B <= 0  # batch-padding rows
    token_B, done_B, out = sample_into(0, logits_BxV, done_B, out)

    def cond(carry):
        step, _, done_B, _, _ = carry
        return (step < num_new) & ~jnp.all(done_B)

    def body(carry):
        step, token_B, done_B, cache, out = carry
        # Feed the previous step's token (slot P + step - 1) and sample this step's token.
        positions_Bx1 = (prompt_len_B + step - 1)[:, None]
        logits_Bx1xV, cache = model.decode(
            token_B[:, None], jnp.ones_like(token_B[:, None], jnp.bool_), positions_Bx1, cache, prompt_slots + step - 1,
            out_major,
        )
        token_B, done_B, out = sample_into(step, logits_Bx1xV[:, 0], done_B, out)
        return step + 1, token_B, done_B, cache, out

    _, _, _, _, out = jax.lax.while_loop(cond, body, (jnp.int32(1), token_B, done_B, cache, out))
    return out


def bucket_program(graphdef, mesh_rules: MeshRules | None, mode: SamplingMode, num_new: int,
                   stop_ids: Sequence[int], pad_id: int):
    """The jitted prefill + decode program of one bucket and sampling mode, unbound to any weights:
    `(state, prompt_BxP, prompt_mask_BxP, max_new_B, keys_B, temperature, top_p) -> outputs`.
    For compiling ahead of time (`cairl plan`); `Sampler` builds the same program per bucket."""
    static = _Static(mode=mode, num_new=num_new, stop_ids=tuple(stop_ids), pad_id=pad_id, out_major_decode=False)
    return jax.jit(lambda *args: _generate_program(graphdef, static, mesh_rules, *args))


class Sampler:
    """Generates responses from a `Llama` with one compiled program per shape bucket and sampling mode.

    stop_ids: tokens that end a sequence (kept in the response); empty: every sequence runs to its budget.
    pad_id: fills prompt padding and the response after its end.
    mesh_rules: where to run (default: the model's own); batch over the rules' batch axes.
    """

    def __init__(
        self,
        model: Llama,
        stop_ids: Sequence[int],
        pad_id: int,
        mesh_rules: MeshRules | None = None,
        buckets: Buckets = Buckets(),
    ):
        vocab = model.config.vocab_size
        for name, ids in (("stop_ids", list(stop_ids)), ("pad_id", [pad_id])):
            bad = [i for i in ids if not isinstance(i, (int, np.integer)) or not 0 <= i < vocab]
            if bad:
                raise SamplerError(f"sampler: {name} {bad} are not token ids of a vocabulary of {vocab}")
        self.config = model.config
        self.stop_ids = tuple(int(i) for i in stop_ids)
        self.pad_id = int(pad_id)
        self.mesh_rules = mesh_rules if mesh_rules is not None else model.mesh_rules
        self.buckets = buckets
        device = self.mesh_rules.mesh.devices.flat[0] if self.mesh_rules is not None else jax.devices()[0]
        self._on_cpu = device.platform == "cpu"
        self._graphdef, state = nnx.split(model)
        self._state = self._place(state)
        self.num_traces = 0  # programs traced so far (one per compile)
        self._program = jax.jit(self._traced_program, static_argnums=(0,))

    # -- weights -------------------------------------------------------------------------------
    def _place(self, state):
        """Weights on the sampler's mesh, laid out by their logical axes (no-op without a mesh)."""
        if self.mesh_rules is None:
            return state
        return jax.device_put(state, state_shardings(state, self.mesh_rules))

    def update_weights(self, model_or_state) -> None:
        """Replace the policy weights (an NNX model or its `nnx.state`) without recompiling.

        Values are matched to the sampler's parameters by path; the sampler keeps its own Variable
        metadata, so the compiled programs' input structure never changes.
        """
        if isinstance(model_or_state, nnx.Module):
            model_or_state = nnx.state(model_or_state)
        if not isinstance(model_or_state, nnx.State):
            raise SamplerError(f"sampler: update_weights expects an NNX model or state, got {type(model_or_state).__name__}")
        new = dict(nnx.to_flat_state(model_or_state))
        old = list(nnx.to_flat_state(self._state))
        problems = sorted({".".join(map(str, p)) for p in set(new) ^ {p for p, _ in old}})
        problems += [
            f"{'.'.join(map(str, p))}: {tuple(new[p].shape)} {jnp.dtype(new[p].dtype)} != {tuple(v.shape)} {jnp.dtype(v.dtype)}"
            for p, v in old
            if p in new and (tuple(new[p].shape) != tuple(v.shape) or jnp.dtype(new[p].dtype) != jnp.dtype(v.dtype))
        ]
        if problems:
            raise SamplerError(
                "sampler: update_weights got weights that do not fit the sampler's model (build the sampler from "
                f"a model of the same config); mismatched parameters: {', '.join(problems[:5])}"
            )
        state = nnx.from_flat_state([(p, v.replace(new[p][...])) for p, v in old])
        self._state = self._place(state)

    # -- generation ----------------------------------------------------------------------------
    def _traced_program(self, static: _Static, *args):
        self.num_traces += 1
        return _generate_program(self._graphdef, static, self.mesh_rules, *args)

    def _batch_multiple(self) -> int:
        if self.mesh_rules is None:
            return 1
        axes = self.mesh_rules.rules.activations.get("batch", ())
        return int(np.prod([self.mesh_rules.mesh.shape[a] for a in axes]))

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        seed: int = 0,
        *,
        max_new_tokens: Sequence[int] | None = None,
    ) -> Samples:
        """Sample one response per prompt (token id lists, no padding).

        `max_new_tokens` optionally caps each sequence separately (each <= params.max_new_tokens).
        Row b draws from a key derived from (seed, b) only, so results do not depend on the bucket.
        """
        prompts = [list(map(int, p)) for p in prompts]
        if not prompts:
            raise SamplerError("sampler: generate needs at least one prompt")
        for i, p in enumerate(prompts):
            if not p:
                raise SamplerError(f"sampler: prompt {i} is empty; every prompt needs at least one token")
        limit = params.max_new_tokens
        caps = [limit] * len(prompts) if max_new_tokens is None else [int(c) for c in max_new_tokens]
        if len(caps) != len(prompts) or any(not 0 < c <= limit for c in caps):
            raise SamplerError(
                f"sampler: max_new_tokens must give one value in [1, {limit}] per prompt ({len(prompts)} prompts)"
            )
        longest = max(len(p) for p in prompts)
        if longest + limit > self.config.max_position_embeddings:
            raise SamplerError(
                f"sampler: prompt of {longest} tokens + {limit} new tokens exceeds the model's "
                f"max_position_embeddings {self.config.max_position_embeddings}"
            )
        for i, p in enumerate(prompts):
            bad = [t for t in p if not 0 <= t < self.config.vocab_size]
            if bad:
                raise SamplerError(f"sampler: prompt {i} has token ids {bad[:5]} outside the vocabulary of {self.config.vocab_size}")

        chunk = self.buckets.batch_sizes[-1]
        parts = [
            self._generate_chunk(prompts[i : i + chunk], caps[i : i + chunk], params, seed, row_offset=i)
            for i in range(0, len(prompts), chunk)
        ]
        return Samples(*(np.concatenate(arrays, axis=0) for arrays in zip(*(dataclasses.astuple(p) for p in parts))))

    def _generate_chunk(self, prompts, caps, params: SamplingParams, seed: int, row_offset: int) -> Samples:
        n = len(prompts)
        batch = self.buckets.batch_size(n, self._batch_multiple())
        prompt_slots = self.buckets.prompt_length(max(len(p) for p in prompts))
        static = _Static(
            mode=params.mode(self.config.vocab_size),
            num_new=self.buckets.new_token_count(params.max_new_tokens),
            stop_ids=self.stop_ids,
            pad_id=self.pad_id,
            out_major_decode=self._on_cpu and 1 < batch <= _OUT_MAJOR_MAX_BATCH,
        )
        prompt_BxP = np.full((batch, prompt_slots), self.pad_id, np.int32)
        mask_BxP = np.zeros((batch, prompt_slots), np.bool_)
        for row, p in enumerate(prompts):
            prompt_BxP[row, prompt_slots - len(p) :] = p
            mask_BxP[row, prompt_slots - len(p) :] = True
        mask_BxP[n:, -1] = True  # batch-padding rows: one dummy token, and a budget of 0 below
        max_new_B = np.zeros((batch,), np.int32)
        max_new_B[:n] = caps
        base = jax.random.key(seed)
        keys_B = jax.vmap(jax.random.fold_in, (None, 0))(base, jnp.arange(row_offset, row_offset + batch))

        args = [prompt_BxP, mask_BxP, max_new_B, keys_B]
        if self.mesh_rules is not None:
            args = [jax.device_put(a, _batch_spec(self.mesh_rules, *(["length"] * (a.ndim - 1)))) for a in args]
        temperature = jnp.float32(params.temperature if params.temperature > 0 else 1.0)
        top_p = jnp.float32(params.top_p)
        out = self._program(static, self._state, *args, temperature, top_p)
        tokens, mask, logprob, policy = (np.asarray(x)[:n, : params.max_new_tokens] for x in out)
        return Samples(
            tokens=tokens.astype(np.int32),
            mask=mask,
            logprobs=logprob.astype(np.float32),
            policy_logprobs=policy.astype(np.float32),
            lengths=mask.sum(axis=1).astype(np.int32),
        )
