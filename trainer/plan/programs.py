"""The XLA programs a run executes, built from abstract states exactly as the learner builds them.

    for program in run_programs(run_config, model_config, states, mesh_rules):
        compiled = program.lower().compile()

Per stage (the learner holds one stage's models at a time):
  sl   sft_update                                    policy train state
  rm   rm_update, rm_scores (held-out evaluation)    preference-model train state
  ppo  ppo_update, reference_logprobs, value_estimates, pm_scores, rollout_sampler
                                                     PPO state (policy + value), frozen reference and PM
       with ppo.algorithm grpo / rloo: group_update, reference_logprobs, pm_scores, rollout_sampler
                                                     the policy alone, frozen reference and PM
  dpo  dpo_update, dpo_eval, reference_logprobs      policy train state, frozen reference
The label stage runs in rollout workers and holds nothing on the learner. The rollout sampler is
planned colocated on the learner's mesh (how one accelerator host runs it), so it shares the
device with every PPO model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from models.config import ModelConfig
from models.sharding import MeshRules
from trainer.plan import estimate
from trainer.plan.abstract import AbstractStates
from trainer.steps import check_accumulation

STAGE_ORDER = ("sl", "dpo", "rm", "ppo")


@dataclasses.dataclass(frozen=True)
class Program:
    """One compiled program of the run: how to lower it and what else is resident while it runs."""

    name: str
    stage: str
    shape: str  # the batch it is compiled for, in words
    jitted: Callable
    args: tuple  # abstract arguments (ShapeDtypeStructs with shardings)
    params: object  # the arguments' parameter part, for the report's split
    opt_state: object  # the arguments' optimizer-state part (None for frozen models)
    others: tuple  # states alive on the devices during this program but not its arguments
    flops: float  # whole-program FLOPs, all devices together (estimate.py)
    steps: int = 1  # sequential weight passes a memory-bound estimate counts (decode steps)

    def lower(self):
        return self.jitted.lower(*self.args)


def _batch(mesh_rules: MeshRules, shapes: dict) -> dict:
    from trainer.steps import batch_sharding

    sharding = batch_sharding(mesh_rules)
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding) for k, (shape, dtype) in shapes.items()}


def _round_up(n: int, multiple: int = 16) -> int:
    return -(-n // multiple) * multiple


def _weights(state):
    """A train state's model weights: its params, and with LoRA the frozen base they sit on."""
    return (state.params, state.frozen)


def ppo_sequence_length(config) -> int:
    """Tokens per PPO row: the learner pads prompt + response to one fixed length (`Learner._sequence_arrays`)."""
    return _round_up(config.data.max_prompt_tokens + max(config.ppo.max_new_tokens, config.ppo.eval_max_new_tokens))


def sl_programs(config, model: ModelConfig, states: AbstractStates, rules: MeshRules) -> list[Program]:
    from trainer.steps import make_sft_step

    b, t = config.sl.batch_size, config.sl.max_seq_len
    check_accumulation(rules, b, config.sl.optimizer.grad_accum_steps, "sl.batch_size")
    batch = _batch(rules, {k: ((b, t), jnp.int32) for k in ("tokens_BxT", "attention_mask_BxT", "loss_mask_BxT")})
    state = states.policy_sl
    return [Program("sft_update", "sl", f"batch {b} × {t} tokens", make_sft_step(state, rules), (state, batch),
                    _weights(state), state.opt_state, (), estimate.train_flops(model, b, t, lm_head=True))]


def rm_programs(config, model: ModelConfig, states: AbstractStates, rules: MeshRules) -> list[Program]:
    from trainer.steps import make_rm_step, sequence_scores

    b, t = config.rm.batch_size, config.rm.max_seq_len
    check_accumulation(rules, b, config.rm.optimizer.grad_accum_steps, "rm.batch_size")
    shapes = {k: ((b, t), jnp.int32) for k in ("chosen_tokens_BxT", "chosen_mask_BxT", "rejected_tokens_BxT",
                                                "rejected_mask_BxT")}
    batch = _batch(rules, {**shapes, "p_chosen_B": ((b,), jnp.float32)})
    state = states.pm
    tokens = _batch(rules, {"t": ((b, t), jnp.int32), "m": ((b, t), jnp.int32)})
    # As `Learner._scores_of` compiles it: no explicit shardings, the state's own placement.
    scores = jax.jit(lambda s, tk, m: sequence_scores(s.model(), tk, m))
    return [
        Program("rm_update", "rm", f"{b} pairs × {t} tokens", make_rm_step(state, rules), (state, batch),
                _weights(state), state.opt_state, (), estimate.train_flops(model, 2 * b, t, lm_head=False)),
        Program("rm_scores", "rm", f"batch {b} × {t} tokens", scores, (state, tokens["t"], tokens["m"]),
                _weights(state), None, (), estimate.forward_flops(model, b, t, lm_head=False)),
    ]


def dpo_programs(config, model: ModelConfig, states: AbstractStates, rules: MeshRules) -> list[Program]:
    """As trainer/learners/dpo.py compiles them: the update, the held-out evaluation (its batches carry
    `valid_B`) and the frozen reference's sequence log-probs (computed once per pair, the state resident)."""
    from trainer.dpo import DPO_BATCH_KEYS, make_dpo_eval, make_dpo_step, make_sequence_logprob_fn

    b, t = config.dpo.batch_size, config.dpo.max_seq_len
    check_accumulation(rules, b, config.dpo.optimizer.grad_accum_steps, "dpo.batch_size")
    state = states.policy_dpo
    shapes = {k: ((b,), jnp.float32) if k.endswith("_B") else ((b, t), jnp.int32) for k in DPO_BATCH_KEYS}
    batch = _batch(rules, shapes)
    heldout = _batch(rules, {**shapes, "valid_B": ((b,), jnp.float32)})
    rows = _batch(rules, {k: ((b, t), jnp.int32) for k in ("t", "a", "m")})
    ref = states.reference
    pairs = f"{b} pairs × {t} tokens"
    return [
        Program("dpo_update", "dpo", pairs, make_dpo_step(state, config.dpo, rules), (state, batch),
                _weights(state), state.opt_state, (ref,), estimate.train_flops(model, 2 * b, t, lm_head=True)),
        Program("dpo_eval", "dpo", pairs, make_dpo_eval(state, config.dpo, rules), (state, heldout),
                _weights(state), state.opt_state, (ref,), estimate.forward_flops(model, 2 * b, t, lm_head=True)),
        Program("reference_logprobs", "dpo", f"batch {b} × {t} tokens",
                make_sequence_logprob_fn(states.llama_graphdef, rules), (ref, rows["t"], rows["a"], rows["m"]), ref,
                None, (state,), estimate.forward_flops(model, b, t, lm_head=True)),
    ]


def group_programs(config, model: ModelConfig, states: AbstractStates, rules: MeshRules) -> list[Program]:
    """The RL stage with ppo.algorithm grpo / rloo: no value model; batch_size prompts × group_size rows."""
    from trainer.grpo import GROUP_BATCH_KEYS, GroupState, make_group_step
    from trainer.ppo import make_frozen_fns

    group = config.ppo.group
    b, t = config.ppo.batch_size * group.group_size, ppo_sequence_length(config)
    check_accumulation(rules, b, config.ppo.policy_optimizer.grad_accum_steps, "GRPO/RLOO batch (prompts × group_size)")
    state = GroupState(policy=states.policy)
    batch = _batch(rules, {k: ((b,), jnp.float32) if k == "scores_B" else
                           ((b, t), jnp.float32 if "logprobs" in k else jnp.int32) for k in GROUP_BATCH_KEYS})
    tokens = _batch(rules, {"t": ((b, t), jnp.int32), "m": ((b, t), jnp.int32)})
    ref, pm, policy = states.reference, states.pm_frozen, states.policy
    ref_fn, pm_fn = make_frozen_fns(states.llama_graphdef, states.scalar_graphdef)  # as the learner jits them
    shape = f"batch {b} × {t} tokens"
    step = make_group_step(state, config.ppo.algorithm, group, config.ppo.max_new_tokens, rules)
    return [
        Program("group_update", "ppo", f"{shape}, {group.epochs} epoch(s)", step, (state, batch), _weights(policy),
                policy.opt_state, (ref, pm), group.epochs * estimate.train_flops(model, b, t, lm_head=True)),
        Program("reference_logprobs", "ppo", shape, ref_fn, (ref, tokens["t"], tokens["m"]), ref, None,
                (state, pm), estimate.forward_flops(model, b, t, lm_head=True)),
        Program("pm_scores", "ppo", shape, pm_fn, (pm, tokens["t"], tokens["m"]), pm, None, (state, ref),
                estimate.forward_flops(model, b, t, lm_head=False)),
        _sampler_program(config, model, states, rules, others=(state, ref, pm),
                         rows=config.rollout.batch_size * group.group_size),
    ]


def ppo_programs(config, model: ModelConfig, states: AbstractStates, rules: MeshRules) -> list[Program]:
    from trainer import ppo

    if config.ppo.grouped:
        return group_programs(config, model, states, rules)
    b, t = config.ppo.batch_size, ppo_sequence_length(config)
    minibatch = b // config.ppo.update.minibatches
    for key in ("policy_optimizer", "value_optimizer"):
        accum = getattr(config.ppo, key).grad_accum_steps
        check_accumulation(rules, minibatch, accum, "PPO minibatch (ppo.batch_size / ppo.update.minibatches)")
    ppo_state = ppo.abstract_ppo_state(states.policy, states.value)
    shapes = {k: ((b, t), jnp.float32 if "logprobs" in k or "values" in k else jnp.int32)
              for k in ppo.PPO_BATCH_KEYS if k != "scores_B"}
    batch = _batch(rules, {**shapes, "scores_B": ((b,), jnp.float32)})
    tokens = _batch(rules, {"t": ((b, t), jnp.int32), "m": ((b, t), jnp.int32)})
    ref, pm, policy, value = states.reference, states.pm_frozen, states.policy, states.value
    ref_fn, pm_fn = ppo.make_frozen_fns(states.llama_graphdef, states.scalar_graphdef)  # as the learner jits them
    epochs = config.ppo.update.epochs
    update_flops = epochs * (estimate.train_flops(model, b, t, lm_head=True)
                             + estimate.train_flops(model, b, t, lm_head=False))
    forward_lm = estimate.forward_flops(model, b, t, lm_head=True)
    forward_scalar = estimate.forward_flops(model, b, t, lm_head=False)
    shape = f"batch {b} × {t} tokens"
    return [
        Program("ppo_update", "ppo", f"{shape}, {epochs} epoch(s) × {config.ppo.update.minibatches} minibatch(es)",
                ppo.make_ppo_step(ppo_state, config.ppo.update, rules), (ppo_state, batch),
                (_weights(policy), _weights(value)), (policy.opt_state, value.opt_state), (ref, pm), update_flops),
        Program("reference_logprobs", "ppo", shape, ref_fn, (ref, tokens["t"], tokens["m"]), ref, None,
                (ppo_state, pm), forward_lm),
        Program("value_estimates", "ppo", shape, ppo.make_token_fn(value, rules, "values"),
                (value, tokens["t"], tokens["m"]), _weights(value), value.opt_state, (policy, ref, pm), forward_scalar),
        Program("pm_scores", "ppo", shape, pm_fn, (pm, tokens["t"], tokens["m"]), pm, None, (ppo_state, ref),
                forward_scalar),
        _sampler_program(config, model, states, rules, others=(ppo_state, ref, pm)),
    ]


def _sampler_program(config, model: ModelConfig, states: AbstractStates, rules: MeshRules, others,
                     rows: int | None = None) -> Program:
    """The rollout sampler's prefill + decode loop for the PPO rollout bucket (models/generation.py); `rows`
    sequences per task (default rollout.batch_size: one response per prompt)."""
    from models.generation import Buckets, bucket_program
    from models.sampling import SamplingParams

    buckets = Buckets()
    params = SamplingParams(max_new_tokens=config.ppo.max_new_tokens, temperature=config.ppo.temperature,
                            top_k=config.ppo.top_k, top_p=config.ppo.top_p)
    batch_multiple = int(np.prod([rules.mesh.shape[a] for a in rules.rules.activations.get("batch", ())]))
    b = buckets.batch_size(rows or config.rollout.batch_size, batch_multiple)
    p = buckets.prompt_length(config.data.max_prompt_tokens)
    n = buckets.new_token_count(config.ppo.max_new_tokens)
    program = bucket_program(states.llama_graphdef, rules, params.mode(model.vocab_size), n, stop_ids=(0,), pad_id=0)
    rows = _batch(rules, {"prompt": ((b, p), jnp.int32), "mask": ((b, p), jnp.bool_), "max_new": ((b,), jnp.int32)})
    keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), b))
    keys = jax.ShapeDtypeStruct(keys.shape, keys.dtype, sharding=rows["max_new"].sharding)
    scalar = jax.ShapeDtypeStruct((), jnp.float32)
    args = (states.reference, rows["prompt"], rows["mask"], rows["max_new"], keys, scalar, scalar)
    return Program("rollout_sampler", "ppo", f"batch {b}, prompt {p} + {n} new tokens", program, args,
                   states.reference, None, others, estimate.sample_flops(model, b, p, n), steps=n)


PROGRAMS_BY_STAGE = {"sl": sl_programs, "dpo": dpo_programs, "rm": rm_programs, "ppo": ppo_programs}


def run_programs(config, model: ModelConfig, states: AbstractStates, rules: MeshRules,
                 only: tuple[str, ...] = ()) -> list[Program]:
    """Every program of the run's learner stages (or only those named), in stage order."""
    programs = []
    for stage in STAGE_ORDER:
        if stage in config.run.stages:
            programs += PROGRAMS_BY_STAGE[stage](config, model, states, rules)
    unknown = sorted(set(only) - {p.name for p in programs})
    if unknown:
        from trainer.plan.abstract import PlanInputError

        raise PlanInputError(f"--only {' '.join(unknown)}: not a program of this run's stages "
                             f"({', '.join(config.run.stages)}); its programs: {', '.join(p.name for p in programs)}")
    return [p for p in programs if not only or p.name in only]
