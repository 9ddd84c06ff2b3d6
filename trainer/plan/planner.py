"""Compile every program of a run for a target and measure what each needs per device.

    plan = make_plan(run_config, parse_target("tpu:v5e:4x4"))
    plan.fits, plan.programs[0].peak_bytes, plan.to_json()

Per program, from XLA's own buffer assignment (`compiled.memory_analysis()`): argument, output,
temporary and peak bytes of one device. Added to the peak: the states the learner keeps on the
devices during that program without passing them in (e.g. the frozen reference and preference
model during the PPO update). A TPU compile that exceeds HBM fails with RESOURCE_EXHAUSTED; the
figures of its message are kept. GPU compiles never refuse, so every target is checked the same
way: total ≤ capacity × (1 − margin).

A run that does not fit and trains without LoRA is also described as if it did (`lora_alternative`:
adapters of rank LORA_RANK on models/lora.py's default targets, from abstract states, nothing
compiled), so that the advice can say what `model.lora.rank=…` saves.
"""

from __future__ import annotations

import dataclasses
import re
import time

from trainer.plan import estimate
from trainer.plan.abstract import abstract_states, per_device_bytes, plan_mesh_rules, plan_model_config
from trainer.plan.programs import Program, run_programs
from trainer.plan.targets import Target

DEFAULT_MARGIN = 0.1  # keep 10% of device memory free: allocator fragmentation, runtime buffers
LORA_RANK = 8  # the rank the advice proposes (models.lora.LoraConfig's default, on its default targets)
_HBM_EXCEEDED = re.compile(r"\(([\d.]+)([KMGT]?)\) exceeds available HBM \(([\d.]+)([KMGT]?)\)")
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


@dataclasses.dataclass(frozen=True)
class ProgramPlan:
    """One program's per-device figures (bytes, FLOPs) and whether it fits."""

    name: str
    stage: str
    shape: str
    param_bytes: int
    opt_state_bytes: int
    argument_bytes: int
    output_bytes: int
    temp_bytes: int
    peak_bytes: int  # the program alone (XLA buffer assignment)
    resident_bytes: int  # other states on the device meanwhile
    total_bytes: int  # peak + resident: what the device must hold
    flops: float  # per device
    est_seconds: float | None
    compile_seconds: float  # wall clock
    compile_cpu_seconds: float  # this process's CPU time: comparable across loaded and idle machines
    fits: bool
    compiler_error: str = ""  # a refusal by the compiler (TPU: out of HBM)


@dataclasses.dataclass(frozen=True)
class Plan:
    target: str
    device: str  # chip or device kind
    devices: int
    mesh: dict
    model: dict  # name, parameters, dtypes, remat
    capacity_bytes: int | None
    margin: float
    programs: tuple[ProgramPlan, ...]
    # Per program name: (parameter, optimizer-state) bytes per device with LoRA adapters of rank LORA_RANK;
    # empty unless the run trains without LoRA and does not fit. For the advice; not in plan.json.
    lora_alternative: dict = dataclasses.field(default_factory=dict)

    @property
    def budget_bytes(self) -> int | None:
        return None if self.capacity_bytes is None else int(self.capacity_bytes * (1 - self.margin))

    @property
    def fits(self) -> bool:
        return all(p.fits for p in self.programs)

    def to_json(self) -> dict:
        """Stable keys for scripts (documented in docs/planning.md)."""
        return {"target": self.target, "device": self.device, "devices": self.devices, "mesh": self.mesh,
                "model": self.model, "capacity_bytes": self.capacity_bytes, "margin": self.margin,
                "budget_bytes": self.budget_bytes, "fits": self.fits,
                "programs": [dataclasses.asdict(p) for p in self.programs]}


def _parse_hbm_error(message: str) -> int | None:
    match = _HBM_EXCEEDED.search(message)
    return None if not match else int(float(match[1]) * _UNITS[match[2]])


def compile_program(program: Program, target: Target, devices: int, budget: int | None) -> ProgramPlan:
    """Lower and compile one program; measure it, or keep the compiler's refusal."""
    resident = sum(per_device_bytes(s) for s in program.others)
    params, opt = per_device_bytes(program.params), per_device_bytes(program.opt_state)
    start, start_cpu = time.perf_counter(), time.process_time()
    error = ""
    try:
        compiled = program.lower().compile()
        stats = compiled.memory_analysis()
        argument, output, temp = stats.argument_size_in_bytes, stats.output_size_in_bytes, stats.temp_size_in_bytes
        # XLA's heap-simulated peak; on TPU it can be below the temporaries' total, which is what the
        # compiler itself checks against HBM, so the larger of the two counts.
        live = argument + output - stats.alias_size_in_bytes + temp
        peak = max(getattr(stats, "peak_memory_in_bytes", 0), live)
    except Exception as err:  # noqa: BLE001 - only the compiler's out-of-memory refusal is expected here
        if "RESOURCE_EXHAUSTED" not in str(err):
            raise
        error = str(err).strip().splitlines()[0][:400]
        argument, output = params + opt, 0
        temp = _parse_hbm_error(str(err)) or 0
        peak = argument + temp
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
    total = peak + resident
    flops = program.flops / devices
    traffic = argument + output + temp + (program.steps - 1) * argument
    spec = target.spec
    est = estimate.roofline_seconds(flops, traffic, spec.peak_flops if spec else None,
                                    spec.hbm_bandwidth if spec else None)
    fits = not error and (budget is None or total <= budget)
    return ProgramPlan(name=program.name, stage=program.stage, shape=program.shape, param_bytes=params,
                       opt_state_bytes=opt, argument_bytes=argument, output_bytes=output, temp_bytes=temp,
                       peak_bytes=peak, resident_bytes=resident, total_bytes=total, flops=flops, est_seconds=est,
                       compile_seconds=round(seconds, 2),
                       compile_cpu_seconds=round(cpu_seconds, 2), fits=fits, compiler_error=error)


def lora_alternative(config, model, rules, only: tuple[str, ...] = ()) -> dict[str, tuple[int, int]]:
    """Per program: (parameter, optimizer-state) bytes per device were the run's trained models LoRA
    adapters of rank LORA_RANK on a frozen base: the same programs built from abstract states, not compiled."""
    from models.lora import LoraConfig

    adapted = dataclasses.replace(config, model=dataclasses.replace(config.model, lora=LoraConfig(rank=LORA_RANK)))
    programs = run_programs(adapted, model, abstract_states(adapted, model, rules), rules, only)
    return {p.name: (per_device_bytes(p.params), per_device_bytes(p.opt_state)) for p in programs}


def make_plan(config, target: Target, margin: float = DEFAULT_MARGIN, only: tuple[str, ...] = (),
              progress=None) -> Plan:
    """Compile the run's programs for `target` (see the module docstring). `progress(name)` is told
    before each compile (they take seconds to tens of seconds each)."""
    devices = target.devices()
    model = plan_model_config(config)
    rules = plan_mesh_rules(config, devices, target.name, local=target.kind == "local")
    devices = list(rules.mesh.devices.flat)
    states = abstract_states(config, model, rules)
    capacity = target.capacity_bytes(devices[0], len(devices))
    budget = None if capacity is None else int(capacity * (1 - margin))
    results = []
    for program in run_programs(config, model, states, rules, only):
        if progress:
            progress(program.name)
        results.append(compile_program(program, target, len(devices), budget))
    lora = config.model.lora
    alternative = {}
    if lora is None and not all(r.fits for r in results):
        alternative = lora_alternative(config, model, rules, only)
    spec = target.spec
    return Plan(
        target=target.name, device=spec.name if spec else devices[0].device_kind, devices=len(devices),
        mesh=dict(rules.mesh.shape), capacity_bytes=capacity, margin=margin, programs=tuple(results),
        model={"source": config.model.source, "parameters": model.num_params(), "dtype": model.dtype,
               "param_dtype": model.param_dtype, "remat": model.remat, "layers": model.num_layers,
               "lora": None if lora is None else {"rank": lora.rank, "targets": list(lora.targets)}},
        lora_alternative=alternative,
    )
