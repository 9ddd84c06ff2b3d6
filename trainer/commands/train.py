"""`cairl train --config FILE [key=value ...]`: run sl → label → rm → ppo (resumable)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train", help="run the constitutional pipeline (SL-CAI, AI labels, preference model, PPO)",
        description="Run the stages of a run config. A run directory that exists is resumed: finished stages "
                    "are skipped and an interrupted stage continues from its ledger and newest checkpoint.")
    parser.add_argument("--config", required=False, help="run config YAML (e.g. configs/demo.yaml)")
    parser.add_argument("--resume", metavar="RUN_DIR", help="resume this run directory (uses its config.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. ppo.iterations=4")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from models.errors import UserError
    from trainer.config import load_run_config

    if args.resume:
        run_dir = Path(args.resume)
        saved = run_dir / "config.yaml"
        if not saved.is_file():
            raise UserError(f"--resume {run_dir}: no config.yaml there; expected a cairl run directory")
        overrides = [f"run.runs_dir={run_dir.parent}", f"run.name={run_dir.name}", *args.overrides]
        config = load_run_config(args.config or saved, overrides)
    elif args.config:
        config = load_run_config(args.config, args.overrides)
    else:
        raise UserError("cairl train: give --config FILE (or --resume RUN_DIR)")
    from trainer.pipeline import train
    from trainer.signals import StopRequested

    try:
        run_dir = train(config, resume=bool(args.resume))
    except StopRequested as stop:
        print(f"cairl train: {stop}; its progress is saved: continue with cairl train --resume {config.run_dir}",
              file=sys.stderr)
        return stop.exit_code
    print(f"run finished: {run_dir}/report.md")
    return 0
