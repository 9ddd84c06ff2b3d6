"""Typed evaluation results: per-item values of each metric, kept so CIs and paired deltas can be formed.

    result = EvalResult(model="runs/demo:sl", judge=JudgeInfo(...), suites={"harmless": {"refusal_rate": sample}})
    summary = summarize(result, baseline)     # what eval.json holds (see trainer/eval/report.py)
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from trainer.eval.stats import Statistic, bootstrap_ci, mean, paired_difference_ci


@dataclasses.dataclass(frozen=True)
class MetricSample:
    """One metric of one model: per-item values, the statistic over them, and the items' ids.

    `values` is [n] or [n, k]; `item_ids` name the n items (prompt uids, BBQ row uids) so a paired
    comparison can check both models saw the same items. `reference` is what the metric means for
    a model compared with itself when it has no baseline run of its own (0.5 for a win rate).
    """

    values: np.ndarray
    item_ids: tuple[str, ...]
    statistic: Statistic = mean
    description: str = ""
    reference: float | None = None

    def __post_init__(self):
        if len(self.values) != len(self.item_ids):
            raise ValueError(f"metric sample: {len(self.values)} values for {len(self.item_ids)} item ids")

    @property
    def n(self) -> int:
        return len(self.item_ids)

    @property
    def value(self) -> float:
        return float(self.statistic(self.values)) if self.n else float("nan")


@dataclasses.dataclass(frozen=True)
class JudgeInfo:
    """Which model judged, in which format, and whether it is the evaluated model itself."""

    source: str
    format: str  # "choice" (multiple-choice option scoring) or "llama_guard"
    self_judged: bool

    def describe(self) -> str:
        text = f"{self.source} ({self.format})"
        return text + " — the model judges itself" if self.self_judged else text


@dataclasses.dataclass(frozen=True)
class EvalResult:
    """Every suite's metrics for one model."""

    model: str
    judge: JudgeInfo | None
    suites: dict[str, dict[str, MetricSample]]
    notes: tuple[str, ...] = ()  # what was skipped and why (e.g. no preference model given)


@dataclasses.dataclass(frozen=True)
class MetricSummary:
    """One row of eval.json: value with CI, and the comparison with the baseline."""

    value: float
    ci95: tuple[float, float]
    n: int
    baseline: float | None
    delta: float | None
    delta_ci95: tuple[float, float] | None

    def to_json(self) -> dict:
        def clean(x):
            return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(float(x), 6)

        pair = lambda p: None if p is None else [clean(p[0]), clean(p[1])]  # noqa: E731
        return {"value": clean(self.value), "ci95": pair(self.ci95), "n": self.n, "baseline": clean(self.baseline),
                "delta": clean(self.delta), "delta_ci95": pair(self.delta_ci95)}


def summarize_metric(sample: MetricSample, baseline: MetricSample | None, seed: int = 0) -> MetricSummary:
    """Value and bootstrap CI; against a baseline on the same items, the paired delta and its CI.

    Without a baseline run, a metric with a `reference` (a win rate against the baseline: 0.5)
    is compared with that constant: delta = value - reference, CI shifted from the value's CI.
    """
    value = sample.value
    ci = bootstrap_ci(sample.values, sample.statistic, seed=seed)
    if baseline is not None and baseline.item_ids == sample.item_ids:
        base = baseline.value
        delta_ci = paired_difference_ci(sample.values, baseline.values, sample.statistic, seed=seed)
        return MetricSummary(value, ci, sample.n, base, value - base, delta_ci)
    if sample.reference is not None:
        ref = sample.reference
        return MetricSummary(value, ci, sample.n, ref, value - ref, (ci[0] - ref, ci[1] - ref))
    return MetricSummary(value, ci, sample.n, None, None, None)


def summarize(result: EvalResult, baseline: EvalResult | None = None, seed: int = 0) -> dict[str, dict[str, MetricSummary]]:
    """{suite: {metric: summary}} of `result`, compared with `baseline` where both measured a metric."""
    out: dict[str, dict[str, MetricSummary]] = {}
    for suite, metrics in result.suites.items():
        base_metrics = baseline.suites.get(suite, {}) if baseline is not None else {}
        out[suite] = {name: summarize_metric(sample, base_metrics.get(name), seed) for name, sample in metrics.items()}
    return out


def _statistics() -> dict[str, Statistic]:
    """Statistics a stored result may name: a closed set, so reading a result file never imports code."""
    from trainer.eval import bbq, stats

    return {f.__name__: f for f in (stats.mean, bbq.bias_score, bbq.ambiguous_bias_score, bbq.accuracy)}


def result_to_json(result: EvalResult) -> dict:
    """Everything of `result`, per-item values included, so a resumed run compares against it unchanged."""
    def sample(s: MetricSample) -> dict:
        return {"values": np.asarray(s.values, np.float64).tolist(), "item_ids": list(s.item_ids),
                "statistic": s.statistic.__name__, "description": s.description, "reference": s.reference}

    judge = dataclasses.asdict(result.judge) if result.judge is not None else None
    return {"model": result.model, "judge": judge, "notes": list(result.notes),
            "suites": {suite: {name: sample(s) for name, s in metrics.items()} for suite, metrics in result.suites.items()}}


def result_from_json(data: dict) -> EvalResult:
    known = _statistics()

    def sample(d: dict) -> MetricSample:
        if d["statistic"] not in known:
            raise ValueError(f"stored metric uses statistic {d['statistic']!r}; known: {', '.join(known)}")
        return MetricSample(as_rows(d["values"]), tuple(d["item_ids"]), known[d["statistic"]], d["description"],
                            d["reference"])

    judge = JudgeInfo(**data["judge"]) if data["judge"] is not None else None
    suites = {suite: {name: sample(d) for name, d in metrics.items()} for suite, metrics in data["suites"].items()}
    return EvalResult(model=data["model"], judge=judge, suites=suites, notes=tuple(data["notes"]))


def as_rows(values) -> np.ndarray:
    """Per-item values as a float array (a list of numbers or of equal-length tuples)."""
    return np.asarray(values, np.float64)
