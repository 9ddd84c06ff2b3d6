"""Sampler decode throughput: tokens/s of one compiled generate after warm-up, compile time separately.

    cairl bench sampler --model smollm2-135m-instruct --batch 8 --prompt-len 32 --new-tokens 128

Every sequence runs to --new-tokens (no stop token) unless --stop-at-eos, so runs are comparable.
tokens_per_s = generated tokens / median wall time of a whole `generate` (prefill included).

Decode is bound by memory bandwidth: each step streams every weight once plus the filled part of
the KV cache, so tokens/s <= batch × bandwidth / (weight bytes + cache bytes per step). The
bandwidth is measured on the same device in the same run, and roofline_fraction reports how close
the sampler comes to that bound.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

from models.errors import UserError

RANDOM_PREFIX = "random:"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m-instruct",
                        help="model source (registry name, HF dir, .gguf) or random:PRESET for random weights")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3, help="timed runs after the warm-up (median reported)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--stop-at-eos", action="store_true", help="let sequences end at the tokenizer's stop ids")
    parser.add_argument("--dtype", default=None, help="compute dtype (default: the model's)")
    parser.add_argument("--seed", type=int, default=0)


def load_model(source: str, dtype: str | None = None):
    """(model, stop_ids, pad_id) for a model source, or random weights for random:PRESET."""
    from flax import nnx

    from models.config import preset
    from models.llama import Llama

    if source.startswith(RANDOM_PREFIX):
        config = preset(source[len(RANDOM_PREFIX):])
        if dtype:  # random weights are stored in the compute dtype, as a serving copy would be
            config = config.replace(dtype=dtype, param_dtype=dtype)
        return Llama(config, nnx.Rngs(0)), (), 0
    from models.sources import load

    loaded = load(source, dtype=dtype)
    return loaded.model, tuple(loaded.tokenizer.stop_ids), loaded.tokenizer.pad_id


def measure_bandwidth_gbs(device=None, n_bytes: int = 1 << 30, repeats: int = 5, threads: int = 2) -> float:
    """Best read bandwidth (GB/s) of float32 sums over `n_bytes` on `device` (default: the first).

    On CPU, numpy sums (single-threaded, releasing the GIL) on 1 and on `threads` Python threads,
    each summing a slice, measure what that many cores can stream; the better figure is returned.
    On an accelerator, a jitted sum over an array resident in its memory.
    """
    import jax
    import jax.numpy as jnp

    device = device or jax.devices()[0]
    best = float("inf")
    if device.platform != "cpu":
        array = jax.device_put(jnp.ones(n_bytes // 4, jnp.float32), device)
        total = jax.jit(jnp.sum)
        total(array).block_until_ready()
        for _ in range(2 * repeats):
            start = time.perf_counter()
            total(array).block_until_ready()
            best = min(best, time.perf_counter() - start)
        return n_bytes / best / 1e9
    from concurrent.futures import ThreadPoolExecutor

    array = np.ones(n_bytes // 4, np.float32)
    array.sum()
    with ThreadPoolExecutor(threads) as pool:
        for workers in sorted({1, threads}):
            parts = np.array_split(array, workers)
            for _ in range(repeats):
                start = time.perf_counter()
                list(pool.map(np.sum, parts))
                best = min(best, time.perf_counter() - start)
    return array.nbytes / best / 1e9


def decode_bytes_per_step(config, weight_bytes: int, batch: int, prompt_len: int, new_tokens: int) -> float:
    """Bytes a decode step must read: every weight once plus the KV cache filled so far (keys and
    values of every layer, compute dtype), averaged over the decode steps."""
    mean_context = prompt_len + new_tokens / 2
    per_token = config.num_layers * 2 * config.num_kv_heads * config.resolved_head_dim * np.dtype(config.dtype).itemsize
    return weight_bytes + batch * mean_context * per_token


def weight_bytes(model) -> int:
    """Bytes of the model's parameters as stored."""
    import jax
    from flax import nnx

    return sum(leaf.nbytes for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))


def random_prompts(batch: int, prompt_len: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, vocab_size, size=(batch, prompt_len)).tolist()


def measure(sampler, prompts, params, runs: int = 3, seed: int = 0) -> dict:
    """Time one warm-up generate (compile + run) and `runs` more; compile_s = warm-up - median run."""
    if runs < 1:
        raise UserError(f"bench sampler: --runs must be >= 1, got {runs}")
    start = time.perf_counter()
    samples = sampler.generate(prompts, params, seed=seed)
    first_s = time.perf_counter() - start
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        samples = sampler.generate(prompts, params, seed=seed)
        times.append(time.perf_counter() - start)
    median_s = statistics.median(times)
    generated = int(samples.lengths.sum())
    return {
        "tokens_per_s": generated / median_s,
        "compile_s": max(first_s - median_s, 0.0),
        "median_s": median_s,
        "run_s": [round(t, 4) for t in times],
        "ms_per_step": 1000 * median_s / max(int(samples.lengths.max()), 1),
        "generated_tokens": generated,
        "tokens": samples.tokens,
    }


def run(args) -> dict:
    import jax

    from models.generation import Sampler
    from models.sampling import SamplingParams

    for name in ("batch", "prompt_len", "new_tokens"):
        if getattr(args, name) <= 0:
            raise UserError(f"bench sampler: --{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    model, stop_ids, pad_id = load_model(args.model, args.dtype)
    sampler = Sampler(model, stop_ids=stop_ids if args.stop_at_eos else (), pad_id=pad_id)
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    prompts = random_prompts(args.batch, args.prompt_len, model.config.vocab_size, args.seed)
    result = measure(sampler, prompts, params, args.runs, args.seed)
    result.pop("tokens")
    device = jax.devices()[0]
    bandwidth = measure_bandwidth_gbs(device)
    weights = weight_bytes(model)
    roofline = args.batch * bandwidth * 1e9 / decode_bytes_per_step(
        model.config, weights, args.batch, args.prompt_len, args.new_tokens)
    return {
        **result,
        "bandwidth_gbs": bandwidth,
        "weight_bytes": weights,
        "roofline_tokens_per_s": roofline,
        "roofline_fraction": result["tokens_per_s"] / roofline,
        "model": args.model,
        "batch": args.batch,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "dtype": model.config.dtype,
        "device": str(device.platform),
        "device_kind": device.device_kind,
        "load_avg_1m": os.getloadavg()[0],
    }
