"""The in-process pieces of an evaluation: models loaded on this host, generation through the
project's sampler (`trainer.policy.Policy`), scoring through `LlamaOptionScorer`.

Inside `cairl train` the same `ModelUnderTest` / `Judge` interfaces are backed by rollout workers.
"""

from __future__ import annotations

from collections.abc import Sequence

from trainer.eval.judge import ChoiceJudge, LlamaGuardJudge, detect_format
from trainer.eval.results import JudgeInfo
from trainer.eval.sources import underlying_source
from trainer.eval.suites import ModelUnderTest, memoized
from trainer.feedback import FeedbackConfig, LlamaOptionScorer

GENERATION_BATCH = 16  # prompts per sampler call: bounds memory and the number of compiled shapes


def feedback_config_of(label, seed: int) -> FeedbackConfig:
    """The FeedbackConfig the label stage builds from a run's `label:` section (see trainer/rollout.py)."""
    return FeedbackConfig(scoring=label.scoring, num_principles=label.principles_per_pair, num_few_shot=label.few_shot,
                          debias_order=label.debias_order, chain_of_thought=False, seed=seed)


def policy_under_test(policy, source: str, max_new_tokens: int) -> ModelUnderTest:
    """A loaded Policy as a ModelUnderTest: greedy chat replies in batches, its own option scorer."""

    def generate(prompts: Sequence[str]) -> list[str]:
        replies: list[str] = []
        for start in range(0, len(prompts), GENERATION_BATCH):
            replies += policy.respond(list(prompts[start:start + GENERATION_BATCH]), max_new_tokens, temperature=0.0)[0]
        return replies

    return ModelUnderTest(source=source, generate=memoized(generate), scorer=LlamaOptionScorer(policy.model, policy.tokenizer))


def build_judge(policy, source: str, requested_format: str, constitution, feedback: FeedbackConfig,
                evaluated: Sequence[str]):
    """(Judge, JudgeInfo) for a loaded judge policy; `evaluated` names the models it will judge
    (as `underlying_source` names them, so that a run's base stage is recognised as its base model)."""
    judge_format = detect_format(requested_format, source, policy.tokenizer)
    scorer = LlamaOptionScorer(policy.model, policy.tokenizer)
    if judge_format == "llama_guard":
        judge = LlamaGuardJudge(scorer, policy.tokenizer, source)
    else:
        judge = ChoiceJudge(scorer, constitution, feedback)
    return judge, JudgeInfo(source=source, format=judge_format, self_judged=underlying_source(source) in evaluated)
