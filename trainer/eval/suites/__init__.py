"""Evaluation suites: each `run(model, ctx) -> SuiteOutput`, metrics defined in its module docstring.

A suite sees the evaluated model only through `ModelUnderTest` (a `generate` callable and an
`OptionScorer`) and the judge only through `trainer.eval.judge.Judge`, so the same suites run
in-process (`cairl eval`) or with generation and scoring on Ray rollout workers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from trainer.constitution import Constitution
from trainer.eval.config import EvalConfig
from trainer.eval.results import MetricSample
from trainer.feedback import FeedbackConfig, OptionScorer

Generate = Callable[[Sequence[str]], list[str]]


@dataclasses.dataclass
class ModelUnderTest:
    source: str
    generate: Generate  # user prompts -> the model's greedy chat replies
    scorer: OptionScorer  # the model's own log-probabilities (BBQ answers; the model as a feedback model)


@dataclasses.dataclass
class SuiteContext:
    config: EvalConfig
    constitution: Constitution
    feedback: FeedbackConfig  # how the label stage scores (the model as a feedback model; the judge's preferences)
    judge: object | None = None  # trainer.eval.judge.Judge
    preference_model: object | None = None  # trainer.eval.sources.PreferenceModel
    baseline: ModelUnderTest | None = None


@dataclasses.dataclass
class SuiteOutput:
    metrics: dict[str, MetricSample]
    samples: list[dict] = dataclasses.field(default_factory=list)  # prompts, replies and scores, for reading
    notes: list[str] = dataclasses.field(default_factory=list)  # what was not measured, and why


def memoized(generate: Generate) -> Generate:
    """`generate` that answers a prompt list it has seen before from memory (a baseline's replies
    are needed by its own suites and as the reference of the helpful win rate)."""
    seen: dict[tuple[str, ...], list[str]] = {}

    def cached(prompts: Sequence[str]) -> list[str]:
        key = tuple(prompts)
        if key not in seen:
            seen[key] = list(generate(list(prompts)))
        return list(seen[key])

    return cached
