"""`cairl eval`: run evaluation suites on a model (optionally against a baseline), print the table,
write eval.json, eval.md, eval.png and samples.jsonl to --out."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from models.errors import UserError

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    from trainer.eval.config import SUITES

    parser = subparsers.add_parser("eval", help="evaluate a model on the harmlessness, helpfulness and bias suites")
    parser.add_argument("--model", required=True,
                        help="model source: registry name, HF directory, .gguf file, run directory, or a run's stage "
                             "RUN_DIR:base|sl|rl")
    parser.add_argument("--baseline", default=None, help="model to compare with (same forms as --model)")
    parser.add_argument("--suites", default="harmless,overrefusal,helpful",
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
    parser.add_argument("--max-new-tokens", type=int, default=64, help="greedy reply budget (default: %(default)s)")
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


def _run_settings(model: str, constitution: str | None):
    """(base model source, constitution, label section, seed) from the run a stage names, else defaults."""
    from trainer.config import LabelSection, from_yaml_file
    from trainer.eval.sources import parse_run_stage

    stage = parse_run_stage(model)
    if stage is None:
        return None, constitution or "default", LabelSection(), 0
    run = from_yaml_file(stage.run_dir / "config.yaml")
    return run.model.source, constitution or run.constitution, run.label, run.run.seed


def run(args) -> int:
    from trainer.constitution import load_constitution
    from trainer.eval.config import EvalConfig
    from trainer.eval.data import check_inputs
    from trainer.eval.judge import JudgeError
    from trainer.eval.local import build_judge, feedback_config_of, policy_under_test
    from trainer.eval.report import markdown_report, write_outputs
    from trainer.eval.runner import JUDGED_SUITES, evaluate
    from trainer.eval.sources import load_policy, load_preference_model, underlying_source
    from trainer.eval.suites import SuiteContext

    config = EvalConfig(suites=tuple(s.strip() for s in args.suites.split(",") if s.strip()),
                        judge=args.judge or "", judge_format=args.judge_format, data_dir=args.data_dir,
                        prompts=_pairs(args.prompts, "--prompts"), max_examples=_counts(args.max_examples),
                        max_new_tokens=args.max_new_tokens)
    check_inputs(config)  # every file before any model loads: bad input fails with nothing written
    run_base, constitution_source, label, seed = _run_settings(args.model, args.constitution)
    constitution = load_constitution(constitution_source)
    feedback = feedback_config_of(label, seed)

    start = time.perf_counter()
    policies = {}

    def policy(source):
        if source not in policies:
            policies[source] = load_policy(source)
        return policies[source]

    model = policy_under_test(policy(args.model), args.model, config.max_new_tokens)
    baseline = policy_under_test(policy(args.baseline), args.baseline, config.max_new_tokens) if args.baseline else None
    judge = judge_info = None
    if any(s in JUDGED_SUITES for s in config.suites):
        judge_source = config.judge or run_base or args.baseline or args.model
        judge, judge_info = build_judge(policy(judge_source), judge_source, config.judge_format, constitution, feedback,
                                        evaluated=[underlying_source(s) for s in (args.model, args.baseline) if s])
        if judge_info.format == "llama_guard" and "helpful" in config.suites and baseline is not None:
            raise JudgeError(f"judge {judge_source} uses the llama_guard format, which scores safety only; the helpful "
                             f"suite's win rate needs a multiple-choice judge: run it with --judge-format choice")
    preference_model = load_preference_model(args.preference_model) if args.preference_model else None
    log.info("models loaded in %.1f s", time.perf_counter() - start)

    ctx = SuiteContext(config, constitution, feedback, judge=judge, preference_model=preference_model, baseline=baseline)
    baseline_result, samples = None, []
    if baseline is not None:
        baseline_result, samples = evaluate(baseline, ctx, judge_info)
    result, model_samples = evaluate(model, ctx, judge_info)
    paths = write_outputs(Path(args.out), result, baseline_result, samples + model_samples, config.bootstrap_seed)
    results = [baseline_result, result] if baseline_result is not None else [result]
    print(markdown_report(results, seed=config.bootstrap_seed))
    log.info("evaluated in %.1f s; wrote %s", time.perf_counter() - start, ", ".join(str(p) for p in paths))
    return 0
