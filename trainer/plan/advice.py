"""What to change when a plan does not fit, computed from the worst program's own figures.

Each suggestion is a config override with the figure it should bring the program to:
  more fsdp     states (params + optimizer) shrink by fsdp_old / fsdp_new
  remat         temporaries of a training step shrink to about 1/L (one block's activations kept)
  micro-batch   temporaries of a training step shrink by the accumulation factor
  bigger slice  devices × need / budget, rounded up to a power of two
  LoRA          parameters and optimizer state as they are with adapters of rank LORA_RANK on a frozen base
                (the planner's `lora_alternative`, counted from abstract states); temporaries as measured
  tensor        the sampler on an fsdp-only mesh: XLA moves each layer's weight all-gather out of the decode
                loop, so every device holds all the blocks' weights for the whole decode (Llama-3-8B, v5e-16:
                13.10 GiB of 13.10 GiB temporaries); tensor parallelism keeps them split (tensor 4: 4.61 GiB)
"""

from __future__ import annotations

import math

from models.lora import DEFAULT_TARGETS
from trainer.plan.planner import LORA_RANK, Plan, ProgramPlan

GIB = 1 << 30
_OPTIMIZER_KEYS = {"sl": ("sl.optimizer",), "rm": ("rm.optimizer",), "dpo": ("dpo.optimizer",),
                   "ppo": ("ppo.policy_optimizer", "ppo.value_optimizer")}
TRAINING = ("sft_update", "rm_update", "ppo_update", "dpo_update", "group_update")


def gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def _fsdp_advice(plan: Plan, worst: ProgramPlan) -> str | None:
    mesh = plan.mesh
    state = worst.param_bytes + worst.opt_state_bytes + worst.resident_bytes
    rest = worst.total_bytes - state
    room = plan.devices // mesh["tensor"]
    for fsdp in range(mesh["fsdp"] + 1, room + 1):
        if room % fsdp:
            continue
        need = rest + state * mesh["fsdp"] / fsdp
        if need <= plan.budget_bytes:
            return (f"model.mesh.fsdp={fsdp} model.mesh.data=-1 (parameters, optimizer state and frozen models split "
                    f"{fsdp} ways: about {gib(need)})")
    if mesh["fsdp"] < room:
        return f"model.mesh.fsdp={room} model.mesh.data=-1 (every device splits the states; not enough alone)"
    return None


def _lora_advice(plan: Plan, worst: ProgramPlan) -> str | None:
    """model.lora.rank=…, with the worst program's optimizer state and total as they would be (a run
    already on LoRA, or a program that holds no optimizer state, gets no such tip)."""
    if worst.name not in plan.lora_alternative:
        return None
    params, opt = plan.lora_alternative[worst.name]
    if opt >= worst.opt_state_bytes:
        return None
    need = worst.total_bytes - worst.param_bytes - worst.opt_state_bytes + params + opt
    targets = "/".join(t.removesuffix("_proj") for t in DEFAULT_TARGETS)
    return (f"model.lora.rank={LORA_RANK} (LoRA adapters on {targets} over a frozen base: optimizer state "
            f"{gib(worst.opt_state_bytes)} → {gib(opt)}, about {gib(need)} per device with the temporaries measured "
            f"without LoRA; plan again with it to measure them)")


def _sampler_tensor_advice(plan: Plan, ways: int = 4) -> str | None:
    """model.mesh.tensor=…, for a sampler whose mesh splits weights by fsdp alone: its decode loop holds every
    layer's weights gathered (the all-gathers are loop-invariant, so XLA hoists them), and tensor parallelism
    splits those `ways` ways. Not computed: the KV cache per device grows as the batch splits fewer ways."""
    mesh = plan.mesh
    if mesh["tensor"] != 1 or mesh["fsdp"] % ways:
        return None
    return (f"model.mesh.tensor={ways} model.mesh.fsdp={mesh['fsdp'] // ways} (the decode loop keeps every layer's "
            f"weights gathered across fsdp for all its steps; tensor parallelism splits them {ways} ways; plan again "
            f"to measure)")


def advise(plan: Plan) -> list[str]:
    """Suggestions for the program that overshoots the budget most."""
    worst = max(plan.programs, key=lambda p: p.total_bytes)
    budget = plan.budget_bytes
    tips = []
    fsdp = _fsdp_advice(plan, worst)
    if fsdp:
        tips.append(fsdp)
    if worst.name in TRAINING and not plan.model["remat"]:
        layers = plan.model["layers"]
        tips.append(f"model.remat=true (temporaries {gib(worst.temp_bytes)} → about {gib(worst.temp_bytes / layers)}, "
                    f"~⅓ more FLOPs)")
    if worst.name in TRAINING:
        keys = _OPTIMIZER_KEYS[worst.stage]
        over = worst.total_bytes - budget
        factor = 2 ** max(1, math.ceil(math.log2(max(worst.temp_bytes, 1) / max(worst.temp_bytes - over, 1))))
        if worst.temp_bytes > over:
            tips.append(" ".join(f"{k}.grad_accum_steps={factor}" for k in keys)
                        + f" (micro-batches of 1/{factor}: temporaries about {gib(worst.temp_bytes / factor)})")
        else:
            tips.append(" ".join(f"{k}.grad_accum_steps=2" for k in keys)
                        + " (smaller micro-batches; the states alone exceed the budget)")
    if worst.name == "rollout_sampler":
        tensor = _sampler_tensor_advice(plan)
        if tensor:
            tips.append(tensor)
        tips.append("rollout.batch_size or ppo.max_new_tokens smaller (the KV cache grows with both)")
    devices = 2 ** math.ceil(math.log2(plan.devices * worst.total_bytes / budget))
    if devices > plan.devices:
        tips.append(f"a bigger slice: about {devices} devices hold {gib(worst.total_bytes * plan.devices / devices)} "
                    f"each at this mesh's proportions")
    lora = _lora_advice(plan, worst)
    if lora:
        tips.append(lora)
    return tips


def refusal(plan: Plan) -> str:
    """One paragraph: what does not fit, by how much, and what to change."""
    over = [p for p in plan.programs if not p.fits]
    worst = max(over, key=lambda p: p.total_bytes)
    names = ", ".join(p.name for p in over)
    refused = f" The compiler refused it: {worst.compiler_error}" if worst.compiler_error else ""
    return (
        f"This run does not fit {plan.target} ({plan.devices} × {plan.device}, {gib(plan.capacity_bytes)} each, "
        f"budget {gib(plan.budget_bytes)} after a {plan.margin:.0%} margin, mesh "
        f"{'×'.join(f'{k}={v}' for k, v in plan.mesh.items())}): {names} over budget. The largest, {worst.name} "
        f"({worst.shape}), needs {gib(worst.total_bytes)} per device: parameters {gib(worst.param_bytes)}, "
        f"optimizer state {gib(worst.opt_state_bytes)}, temporaries {gib(worst.temp_bytes)}, other models resident "
        f"{gib(worst.resident_bytes)}.{refused} Try: " + "; ".join(advise(plan)) + "."
    )
