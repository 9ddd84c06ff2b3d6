"""`cairl eval`: run evaluation suites on a model (optionally against a baseline), print the table,
write eval.json, eval.md, eval.png and samples.jsonl to --out."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from models.errors import UserError

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    from trainer.eval.config import SUITES, EvalConfig

    defaults = EvalConfig()
    parser = subparsers.add_parser("eval", help="evaluate a model on the harmlessness, helpfulness and bias suites")
    parser.add_argument("--model", required=True, action="append",
                        help="model source: registry name, HF directory, .gguf file, run directory, or a run's stage "
                             "RUN_DIR:base|sl|rl; repeat it to compare several on the same items (e.g. --model "
                             "runs/x:sl --model runs/x:rl --baseline runs/x:base)")
    parser.add_argument("--baseline", default=None, help="model to compare with (same forms as --model)")
    parser.add_argument("--suites", default=",".join(defaults.suites),
                        help=f"comma-separated, from {', '.join(SUITES)} (default: %(default)s)")
    parser.add_argument("--judge", default=None,
                        help="judge model (default: the run's base model for a run stage, else the baseline, else the "
                             "model itself)")
    parser.add_argument("--judge-format", default="auto", choices=("auto", "choice", "llama_guard"),
                        help="auto: llama_guard for Llama-Guard models, else multiple choice")
    parser.add_argument("--preference-model", default=None, help="a run's preference model, RUN_DIR:rm (hhh, pm_human)")
    parser.add_argument("--prompts", action="append", default=[], metavar="SUITE=FILE.jsonl",
                        help="replace a suite's prompt set (one {\"prompt\": ...} per line); repeatable")
    parser.add_argument("--data-dir", default="", help="directory holding bbq/, cai/evals/, hh-rlhf/ (bbq, hhh, pm_human)")
    parser.add_argument("--max-examples", action="append", default=[], metavar="SUITE=N",
                        help="items per suite (bbq: per category; pm_human: per subset); repeatable")
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens, help="greedy reply budget (default: %(default)s)")
    parser.add_argument("--constitution", default=None,
                        help="constitution for the judge's and feedback questions (default: the run's, else 'default')")
    parser.add_argument("--out", default="eval", help="output directory (default: %(default)s)")
    parser.set_defaults(handler=run)


def _pairs(items: list[str], flag: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise UserError(f"{flag} {item!r}: expected SUITE=VALUE, e.g. {flag} harmless=my_prompts.jsonl")
        out[key.strip()] = value.strip()
    return out


def _counts(items: list[str]) -> dict[str, int]:
    from trainer.eval.config import DEFAULT_MAX_EXAMPLES

    counts = dict(DEFAULT_MAX_EXAMPLES)
    for key, value in _pairs(items, "--max-examples").items():
        try:
            counts[key] = int(value)
        except ValueError:
            raise UserError(f"--max-examples {key}={value!r}: expected a whole number") from None
    return counts


def run(args) -> int:
    from trainer.eval.config import EvalConfig
    from trainer.eval.local import EvalRequest, evaluate_in_process
    from trainer.eval.report import markdown_report, write_outputs

    config = EvalConfig(suites=tuple(s.strip() for s in args.suites.split(",") if s.strip()),
                        judge=args.judge or "", judge_format=args.judge_format, data_dir=args.data_dir,
                        prompts=_pairs(args.prompts, "--prompts"), max_examples=_counts(args.max_examples),
                        max_new_tokens=args.max_new_tokens)
    start = time.perf_counter()
    results, baseline, samples = evaluate_in_process(EvalRequest(
        config, args.model[0], baseline=args.baseline, also=tuple(args.model[1:]),
        preference_model=args.preference_model, constitution=args.constitution))
    paths = write_outputs(Path(args.out), results, baseline, samples, config.bootstrap_seed)
    print(markdown_report(([baseline] if baseline is not None else []) + results, seed=config.bootstrap_seed))
    log.info("evaluated in %.1f s; wrote %s", time.perf_counter() - start, ", ".join(str(p) for p in paths))
    return 0
