"""`cairl plan --config FILE [key=value ...] [--target T]`: will this run fit, and how fast? No weights, no hardware.

Compiles every learner program of the run for the target (compile-only TPU or GPU devices, or this
process's devices), prints per-device memory and an estimated time per program, writes plan.json
to --out, and exits 2 with advice when the run does not fit.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    from trainer.plan.planner import DEFAULT_MARGIN
    from trainer.plan.targets import SYNTAX

    parser = subparsers.add_parser(
        "plan", help="compile a run for target hardware (without having it) and check that it fits",
        description="Compile every learner program of a run config for a target and report per-device memory, "
                    "FLOPs and estimated time. Exit 2, with advice, when the run does not fit.")
    parser.add_argument("--config", required=True, help="run config YAML (e.g. configs/demo.yaml)")
    parser.add_argument("--target", default="local", help=f"{SYNTAX} (default: %(default)s)")
    parser.add_argument("--out", default=".", help="directory for plan.json (default: the current directory)")
    parser.add_argument("--margin", type=float, default=DEFAULT_MARGIN,
                        help="fraction of device memory kept free (default: %(default)s)")
    parser.add_argument("--only", nargs="*", default=(), metavar="PROGRAM",
                        help="compile only these programs (e.g. ppo_update rollout_sampler)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. model.mesh.fsdp=4")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import os

    from models.errors import UserError
    from trainer.config import load_run_config
    from trainer.plan.targets import parse_target

    if not 0 <= args.margin < 1:
        raise UserError(f"--margin must be in [0, 1), got {args.margin}")
    config = load_run_config(args.config, args.overrides)
    target = parse_target(args.target)
    if target.kind == "local":
        from trainer.runtime import configure_jax

        configure_jax()  # the persistent compilation cache: the learner then finds these compiles there
    elif not os.environ.get("JAX_PLATFORMS"):
        import jax

        jax.config.update("jax_platforms", "cpu")  # compile-only devices: never open this machine's accelerator
    from trainer.plan.advice import refusal
    from trainer.plan.planner import make_plan
    from trainer.plan.report import format_plan, write_plan_json

    plan = make_plan(config, target, args.margin, tuple(args.only), progress=lambda n: log.info("compiling %s", n))
    print(format_plan(plan))
    path = write_plan_json(plan, Path(args.out))
    log.info("wrote %s", path)
    if not plan.fits:
        print(refusal(plan))
        return 2
    return 0
