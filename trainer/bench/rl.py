"""RL update cost by algorithm: time and peak memory per iteration of PPO, GRPO and RLOO, and the ratio to PPO.

    cairl bench rl --algorithm grpo --model smollm2-135m --batch 8 --seq-len 256

Each algorithm gets the same iteration: `--batch` sampled responses of `--seq-len` tokens (for
GRPO/RLOO, batch / group-size prompts × group-size responses), random weights of the model preset. An
iteration's learner side is timed: PPO's value estimates of the rollout plus its update (policy and
value), GRPO's / RLOO's update alone (the work all three share — preference-model scores and reference
log-probs — is left out). Peak memory is XLA's figure for the compiled programs (arguments + outputs −
donated + temporaries, the largest of an iteration's programs): it holds the value model and its
optimizer state for PPO only. PPO is always measured too, for the ratio.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

from models.errors import UserError

log = logging.getLogger("cairl.bench.rl")
ALGORITHMS = ("ppo", "grpo", "rloo")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--algorithm", default="grpo", choices=ALGORITHMS, help="the algorithm compared with PPO")
    parser.add_argument("--model", default="smollm2-135m", help="model preset (shapes only; weights are random)")
    parser.add_argument("--batch", type=int, default=8, help="sampled responses per iteration")
    parser.add_argument("--group-size", type=int, default=4, help="GRPO/RLOO responses per prompt")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (prompt + response)")
    parser.add_argument("--response-len", type=int, default=128, help="response tokens at the end of each sequence")
    parser.add_argument("--dtype", default="float32", help="compute dtype (params stay fp32)")
    parser.add_argument("--runs", type=int, default=3, help="timed iterations after the warm-up (median reported)")


def peak_bytes(compiled) -> int:
    """Per-device peak of a compiled program, from XLA's memory analysis."""
    m = compiled.memory_analysis()
    return int(max(m.peak_memory_in_bytes if hasattr(m, "peak_memory_in_bytes") else 0,
                   m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes))


def _programs(algorithm: str, config, mesh_rules, group_size: int, max_new_tokens: int):
    """(state, [(name, jitted, takes_state_and_batch)]) of one iteration's learner side."""
    from models.llama import Llama, ScalarModel
    from trainer.optim import OptimizerConfig
    from trainer.state import create_train_state

    optimizer = OptimizerConfig(learning_rate=1e-6)
    policy = create_train_state(lambda r: Llama(config, r, mesh_rules), optimizer, mesh_rules, 0)
    if algorithm == "ppo":
        from trainer.ppo import PPOConfig, create_ppo_state, make_ppo_step, make_token_fn

        value = create_train_state(lambda r: ScalarModel(config, r, mesh_rules), optimizer, mesh_rules, 1)
        ppo = PPOConfig()
        state = create_ppo_state(policy, value, ppo.kl)
        return state, make_token_fn(value, mesh_rules, "values"), make_ppo_step(state, ppo, mesh_rules)
    from trainer.grpo import GroupConfig, GroupState, make_group_step

    state = GroupState(policy=policy)
    return state, None, make_group_step(state, algorithm, GroupConfig(group_size=group_size), max_new_tokens,
                                        mesh_rules)


def measure(algorithm: str, args) -> dict:
    import jax

    from models.config import preset
    from trainer.bench.ppo import synthetic_batch
    from trainer.mesh import MeshConfig, build_mesh_rules

    config = preset(args.model).replace(dtype=args.dtype)
    mesh_rules = build_mesh_rules(MeshConfig(data=1), devices=[jax.devices()[0]])
    state, values_fn, step = _programs(algorithm, config, mesh_rules, args.group_size, args.response_len)
    batch = jax.device_put(synthetic_batch(config, args.batch, args.seq_len, args.response_len))
    peaks = [peak_bytes(step.lower(state, batch).compile())]
    if values_fn is not None:
        peaks.append(peak_bytes(values_fn.lower(state.value, batch["tokens_BxT"], batch["attention_mask_BxT"]).compile()))

    def iteration(state):
        if values_fn is not None:  # PPO's extra forward pass: the value model on the rollout
            batch["old_values_BxT"] = values_fn(state.value, batch["tokens_BxT"], batch["attention_mask_BxT"])
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        return state

    start = time.perf_counter()
    state = iteration(state)
    first_s = time.perf_counter() - start
    times = []
    for _ in range(args.runs):
        start = time.perf_counter()
        state = iteration(state)
        times.append(time.perf_counter() - start)
    median_s = statistics.median(times)
    log.info("%s: %.3f s per iteration, peak %.1f MiB", algorithm, median_s, max(peaks) / 2**20)
    return {"median_s": median_s, "run_s": [round(t, 3) for t in times], "compile_s": max(first_s - median_s, 0.0),
            "peak_bytes": max(peaks)}


def run(args) -> dict:
    import os

    for name in ("batch", "seq_len", "response_len", "runs", "group_size"):
        if getattr(args, name) <= 0:
            raise UserError(f"bench rl: --{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.response_len >= args.seq_len:
        raise UserError("bench rl: --response-len must be smaller than --seq-len")
    if args.algorithm != "ppo" and (args.group_size < 2 or args.batch % args.group_size):
        raise UserError(f"bench rl: --batch ({args.batch}) must be whole groups of --group-size ({args.group_size} "
                        f"≥ 2) for {args.algorithm}")
    results = {"ppo": measure("ppo", args)}
    if args.algorithm != "ppo":
        results[args.algorithm] = measure(args.algorithm, args)
    mine, ppo = results[args.algorithm], results["ppo"]
    return {"algorithm": args.algorithm, "model": args.model, "batch": args.batch, "seq_len": args.seq_len,
            "group_size": args.group_size, "dtype": args.dtype, "results": results,
            "time_ratio_to_ppo": mine["median_s"] / ppo["median_s"],
            "memory_ratio_to_ppo": mine["peak_bytes"] / ppo["peak_bytes"],
            "cpu_count": os.cpu_count(), "load_avg_1m": os.getloadavg()[0]}
