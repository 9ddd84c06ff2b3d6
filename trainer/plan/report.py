"""The plan as a table for people and as plan.json for scripts."""

from __future__ import annotations

import json
from pathlib import Path

from trainer.plan.planner import Plan

COLUMNS = ("program", "stage", "params", "opt state", "temp", "peak", "+resident", "total", "TFLOPs", "est. time",
           "compile", "fits")


def _gib(n: int) -> str:
    """Bytes in binary units, three significant figures: 812K, 23.4M, 1.05G."""
    for unit, size in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n}B"


def _seconds(s: float | None) -> str:
    if s is None:
        return "n/a"
    if s < 1e-3:
        return f"{s * 1e6:.3g}µs"
    return f"{s * 1e3:.3g}ms" if s < 1 else f"{s:.3g}s"


def format_plan(plan: Plan) -> str:
    """A header naming target, mesh and budget, then one row per program (bytes are per device)."""
    capacity = "unknown" if plan.capacity_bytes is None else f"{_gib(plan.capacity_bytes)} per device"
    budget = "" if plan.budget_bytes is None else f", budget {_gib(plan.budget_bytes)} ({plan.margin:.0%} kept free)"
    model = plan.model
    lines = [
        f"target {plan.target}: {plan.devices} × {plan.device}, {capacity}{budget}",
        f"mesh {' × '.join(f'{k}={v}' for k, v in plan.mesh.items())}; model {model['source']} "
        f"({model['parameters'] / 1e6:,.3g}M parameters, {model['param_dtype']} weights, {model['dtype']} compute, "
        f"remat {'on' if model['remat'] else 'off'})",
        "bytes per device; est. time = roofline estimate from data-sheet peak FLOP/s and HBM bandwidth",
    ]
    rows = [COLUMNS] + [
        (p.name, p.stage, _gib(p.param_bytes), _gib(p.opt_state_bytes), _gib(p.temp_bytes), _gib(p.peak_bytes),
         _gib(p.resident_bytes), _gib(p.total_bytes), f"{p.flops / 1e12:.3g}", _seconds(p.est_seconds),
         f"{p.compile_seconds:.1f}s", "yes" if p.fits else "NO")
        for p in plan.programs
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.append(f"fits: {'yes' if plan.fits else 'NO'}")
    return "\n".join(lines)


def write_plan_json(plan: Plan, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "plan.json"
    path.write_text(json.dumps(plan.to_json(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path
