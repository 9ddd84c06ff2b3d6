"""The in-process pieces of an evaluation: models loaded on this host, generation through the
project's sampler (`trainer.policy.Policy`), scoring through `LlamaOptionScorer`.

Inside `cairl train` the same `ModelUnderTest` / `Judge` interfaces are backed by rollout workers.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence

from trainer.eval.config import EvalConfig
from trainer.eval.judge import JudgeError, build_judge
from trainer.eval.results import EvalResult
from trainer.eval.sources import underlying_source
from trainer.eval.suites import ModelUnderTest, SuiteContext, memoized
from trainer.feedback import FeedbackConfig, LlamaOptionScorer

log = logging.getLogger(__name__)

GENERATION_BATCH = 16  # prompts per sampler call: bounds memory and the number of compiled shapes


def feedback_config_of(label: FeedbackConfig) -> FeedbackConfig:
    """The label stage's scoring settings from a run's `label:` section (a FeedbackConfig, or the run
    config's LabelSection, whose type the copy keeps), without chain-of-thought: evaluation scores the
    options directly."""
    return dataclasses.replace(label, chain_of_thought=False)


def policy_under_test(policy, source: str, max_new_tokens: int) -> ModelUnderTest:
    """A loaded Policy as a ModelUnderTest: greedy chat replies in batches, its own option scorer."""

    def generate(prompts: Sequence[str]) -> list[str]:
        replies: list[str] = []
        for start in range(0, len(prompts), GENERATION_BATCH):
            replies += policy.respond(list(prompts[start:start + GENERATION_BATCH]), max_new_tokens, temperature=0.0)[0]
        return replies

    return ModelUnderTest(source=source, generate=memoized(generate), scorer=LlamaOptionScorer(policy.model, policy.tokenizer))


@dataclasses.dataclass(frozen=True)
class EvalRequest:
    """What `cairl eval` asks for: model sources by name, settings validated in EvalConfig."""

    config: EvalConfig
    model: str
    baseline: str | None = None
    also: tuple[str, ...] = ()  # more models evaluated on the same items (e.g. a run's RL policy after its SL one)
    preference_model: str | None = None  # RUN_DIR:rm
    constitution: str | None = None  # default: the run's (for a run stage), else the shipped one


def run_settings(model: str, constitution: str | None):
    """(base model source or None, constitution source, feedback settings) of the run a stage names, else defaults."""
    from trainer.config import LabelSection
    from trainer.eval.sources import parse_run_stage, run_config

    stage = parse_run_stage(model)
    if stage is None:
        return None, constitution or "default", feedback_config_of(LabelSection())
    run = run_config(stage.run_dir)
    return run.model.source, constitution or run.constitution, feedback_config_of(run.label)


def evaluate_in_process(request: EvalRequest) -> tuple[list[EvalResult], EvalResult | None, list[dict]]:
    """(each model's result, baseline's result or None, samples): inputs checked first, then models loaded
    (each source once), then the baseline and the models evaluated on the same items."""
    from trainer.constitution import load_constitution
    from trainer.eval.data import check_inputs
    from trainer.eval.runner import JUDGED_SUITES, evaluate
    from trainer.eval.sources import load_policy, load_preference_model

    config = request.config
    check_inputs(config)  # every file before any model loads: bad input fails with nothing written
    run_base, constitution_source, feedback = run_settings(request.model, request.constitution)
    constitution = load_constitution(constitution_source)
    start = time.perf_counter()
    policies: dict = {}

    def policy(source):
        if source not in policies:
            policies[source] = load_policy(source)
        return policies[source]

    models = [policy_under_test(policy(source), source, config.max_new_tokens)
              for source in (request.model, *request.also)]
    baseline = None
    if request.baseline:
        baseline = policy_under_test(policy(request.baseline), request.baseline, config.max_new_tokens)
    judge = judge_info = None
    if any(s in JUDGED_SUITES for s in config.suites):
        judge_source = config.judge or run_base or request.baseline or request.model
        # as `underlying_source` names them, so that a run's base stage is recognised as its base model
        evaluated = [underlying_source(s) for s in (request.model, *request.also, request.baseline) if s]
        judge_policy = policy(judge_source)
        judge, judge_info = build_judge(LlamaOptionScorer(judge_policy.model, judge_policy.tokenizer),
                                        judge_policy.tokenizer, judge_source, config.judge_format, constitution,
                                        feedback, self_judged=underlying_source(judge_source) in evaluated)
        if judge_info.format == "llama_guard" and "helpful" in config.suites and baseline is not None:
            raise JudgeError(f"judge {judge_source} uses the llama_guard format, which scores safety only; the helpful "
                             f"suite's win rate needs a multiple-choice judge: run it with --judge-format choice")
    preference_model = load_preference_model(request.preference_model) if request.preference_model else None
    log.info("models loaded in %.1f s", time.perf_counter() - start)

    ctx = SuiteContext(config, constitution, feedback, judge=judge, preference_model=preference_model, baseline=baseline)
    baseline_result, samples = evaluate(baseline, ctx, judge_info) if baseline is not None else (None, [])
    results = []
    for model in models:
        result, model_samples = evaluate(model, ctx, judge_info)
        results.append(result)
        samples += model_samples
    return results, baseline_result, samples
