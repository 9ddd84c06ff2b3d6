"""PPO update throughput (policy + value, random init) against the measured matmul peak.

    cairl bench ppo --model smollm2-135m --batch 4 --seq-len 256
    cairl bench ppo --model smollm2-135m --batch 4 --seq-len 256 --lora 16    # the same with LoRA adapters

Times the whole jitted PPO update (reward shaping, GAE, policy and value forward + backward, two
AdamW updates) after a warm-up call, and a large fp32 matmul on the same devices in the same run,
before and after. Wall-clock ratios are only meaningful on an idle machine; the `*_cpu` figures divide
by process CPU time instead (× the threads in use), which other processes' load disturbs much less.
model_flops counts matmul FLOPs only (6 × matmul parameters × tokens, plus
attention scores and values), the usual MFU convention; everything else the step does
(log-softmax and entropy over the vocabulary, norms, the optimizer) is overhead against it.
With --lora the FLOP count is left as for full fine-tuning (the adapters' own products are small),
so time and memory compare directly; `trainable_params` and `state_bytes` (params, frozen base and
optimizer moments of both models) show what LoRA saves where the device reports no peak memory (CPU).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time

import numpy as np

from models.errors import UserError

log = logging.getLogger("cairl.bench.ppo")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m", help="model preset (shapes only; weights are random)")
    parser.add_argument("--batch", type=int, default=4, help="sequences per PPO batch")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (prompt + response)")
    parser.add_argument("--response-len", type=int, default=128, help="response tokens at the end of each sequence")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--minibatches", type=int, default=1)
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per minibatch update")
    parser.add_argument("--dtype", default="float32", help="compute dtype (params stay fp32)")
    parser.add_argument("--remat", action="store_true", help="recompute block activations in the backward pass")
    parser.add_argument("--attention", default="xla", choices=("xla", "cudnn"), help="full-sequence attention kernel")
    parser.add_argument("--lora", type=int, default=0, metavar="RANK",
                        help="train LoRA adapters of this rank on a frozen base (0: full fine-tuning)")
    parser.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                        help="comma-separated modules that get adapters (as model.lora.targets)")
    parser.add_argument("--runs", type=int, default=3, help="timed updates after the warm-up (median reported)")
    parser.add_argument("--matmul-size", type=int, default=0,
                        help="n of the n×n×n matmul measuring the peak (0: 2048 on CPU, 8192 on accelerators)")


# Vendor dense (no sparsity) matrix peaks, FLOP/s, by device kind and compute dtype: MFU's usual
# denominator. The measured matmul peak is reported beside it because clocks and power caps vary.
DATASHEET_PEAKS = {
    "H100": {"bfloat16": 989.4e12, "float16": 989.4e12},  # SXM; the PCIe card is lower
    "H200": {"bfloat16": 989.4e12, "float16": 989.4e12},
}


def matmul_flops_per_token(config, lm_head: bool) -> float:
    """Forward matmul FLOPs per token, excluding attention scores: 2 × parameters used in matmuls."""
    d, f, hd = config.hidden_size, config.intermediate_size, config.resolved_head_dim
    per_layer = d * hd * (2 * config.num_heads + 2 * config.num_kv_heads) + 3 * d * f
    return 2.0 * (config.num_layers * per_layer + (config.vocab_size * d if lm_head else 0))


def attention_flops_per_sequence(config, length: int) -> float:
    """Forward FLOPs of QKᵀ and AV over the full (masked, not skipped) T × T grid, all layers."""
    return 4.0 * config.num_layers * length * length * config.num_heads * config.resolved_head_dim


def ppo_update_flops(config, batch: int, length: int, epochs: int) -> float:
    """Training = 3 × forward (forward, and a backward twice its cost); policy with, value without, the LM head."""
    attention = batch * attention_flops_per_sequence(config, length)
    policy = batch * length * matmul_flops_per_token(config, lm_head=True) + attention
    value = batch * length * matmul_flops_per_token(config, lm_head=False) + attention
    return 3.0 * epochs * (policy + value)


def measure_matmul_peak(n: int, dtype: str = "float32", repeats: int = 5) -> tuple[float, float]:
    """Best FLOP/s of a jitted n×n @ n×n matmul in `dtype` (the machine's practical peak for dense
    math), by wall time and by process CPU time per thread."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, b).block_until_ready()
    best = float("inf")
    start_cpu = time.process_time()  # summed over the repeats: CPU-time clocks tick coarsely
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    cpu_per_thread = (time.process_time() - start_cpu) / _threads()
    return 2.0 * n**3 / best, repeats * 2.0 * n**3 / cpu_per_thread


def _threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def synthetic_batch(config, batch: int, length: int, response_len: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    response = np.zeros((batch, length), np.float32)
    response[:, length - response_len:] = 1.0
    noise = lambda scale: (scale * rng.normal(size=(batch, length))).astype(np.float32)  # noqa: E731
    uniform_logprob = -float(np.log(config.vocab_size))  # what a random-init policy assigns, roughly
    return {
        "tokens_BxT": rng.integers(0, config.vocab_size, (batch, length)).astype(np.int32),
        "attention_mask_BxT": np.ones((batch, length), bool), "response_mask_BxT": response,
        "old_logprobs_BxT": uniform_logprob + noise(0.1), "ref_logprobs_BxT": uniform_logprob + noise(0.1),
        "old_values_BxT": noise(0.1), "scores_B": rng.normal(size=batch).astype(np.float32),
    }


def run(args) -> dict:
    import jax

    from models import lora
    from models.config import preset
    from models.llama import Llama, ScalarModel
    from trainer.mesh import MeshConfig, build_mesh_rules
    from trainer.optim import OptimizerConfig
    from trainer.ppo import PPOConfig, create_ppo_state, make_ppo_step
    from trainer.state import create_train_state

    for name in ("batch", "seq_len", "response_len", "runs", "epochs", "minibatches", "grad_accum"):
        if getattr(args, name) <= 0:
            raise UserError(f"bench ppo: --{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.response_len >= args.seq_len:
        raise UserError("bench ppo: --response-len must be smaller than --seq-len")
    if args.lora < 0:
        raise UserError(f"bench ppo: --lora must be a rank ≥ 1, or 0 for full fine-tuning, got {args.lora}")
    config = preset(args.model).replace(dtype=args.dtype, remat=args.remat, attention=args.attention)
    spec = None
    if args.lora:  # alpha = 2 × rank, a common choice; it scales the update, not the cost
        targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
        spec = lora.resolve(config, lora.LoraConfig(rank=args.lora, alpha=2.0 * args.lora, targets=targets))
    device = jax.devices()[0]
    mesh_rules = build_mesh_rules(MeshConfig(data=1), devices=[device])
    optimizer = OptimizerConfig(learning_rate=1e-6, grad_accum_steps=args.grad_accum)
    ppo = PPOConfig(epochs=args.epochs, minibatches=args.minibatches)
    matmul_size = args.matmul_size or (2048 if device.platform == "cpu" else 8192)

    peak_before, peak_before_cpu = measure_matmul_peak(matmul_size, config.dtype)
    log.info("matmul peak %.3g FLOP/s; creating policy and value states", peak_before)
    policy = create_train_state(lambda r: Llama(config, r, mesh_rules), optimizer, mesh_rules, 0, spec)
    value = create_train_state(lambda r: ScalarModel(config, r, mesh_rules), optimizer, mesh_rules, 1, spec)
    state = create_ppo_state(policy, value, ppo.kl)
    trainable_params = sum(x.size for s in (policy, value) for x in jax.tree.leaves(s.params))
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    step = make_ppo_step(state, ppo, mesh_rules)
    batch = jax.device_put(synthetic_batch(config, args.batch, args.seq_len, args.response_len))
    log.info("states ready; compiling and running the first update")

    start = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    first_s = time.perf_counter() - start
    log.info("first update (compile included) took %.1f s", first_s)
    times, cpu_times = [], []
    for _ in range(args.runs):
        start, start_cpu = time.perf_counter(), time.process_time()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
        cpu_times.append((time.process_time() - start_cpu) / _threads())
    peak_after, peak_after_cpu = measure_matmul_peak(matmul_size, config.dtype)

    median_s = statistics.median(times)
    flops = ppo_update_flops(config, args.batch, args.seq_len, args.epochs)
    peak = max(peak_before, peak_after)
    peak_cpu = max(peak_before_cpu, peak_after_cpu)
    median_cpu_s = statistics.median(cpu_times)
    datasheet = next((peaks.get(config.dtype) for kind, peaks in DATASHEET_PEAKS.items() if kind in device.device_kind), None)
    return {
        "model": args.model,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "tokens_per_update": args.batch * args.seq_len * args.epochs,
        "dtype": args.dtype,
        "remat": args.remat,
        "attention": args.attention,
        "lora_rank": args.lora,
        "trainable_params": trainable_params,
        "state_bytes": state_bytes,
        "median_s": median_s,
        "run_s": [round(t, 3) for t in times],
        "compile_s": max(first_s - median_s, 0.0),
        "model_flops_per_update": flops,
        "model_flops_per_s": flops / median_s,
        "matmul_peak_flops_per_s": peak,
        "matmul_peak_before_after": [peak_before, peak_after],
        "fraction_of_peak": flops / median_s / peak,
        "model_flops_per_s_cpu": flops / median_cpu_s,
        "matmul_peak_flops_per_s_cpu": peak_cpu,
        "fraction_of_peak_cpu": flops / median_cpu_s / peak_cpu,
        "datasheet_peak_flops_per_s": datasheet,
        "mfu_datasheet": flops / median_s / datasheet if datasheet else None,
        "matmul_size": matmul_size,
        "threads": _threads(),
        "policy_loss": float(metrics["policy_loss"]),
        "device": str(device.platform),
        "device_kind": device.device_kind,
        "peak_memory_bytes": (device.memory_stats() or {}).get("peak_bytes_in_use"),
        "cpu_count": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0],
    }
