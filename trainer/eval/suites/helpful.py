"""`helpful`: held-out helpful requests (shipped: trainer/data/eval_helpful.jsonl, written by us).

Metrics:
  win_rate      against the baseline model's replies to the same prompts: the judge's
                p(model's reply better) with both answer orders averaged (the label stage's question),
                per prompt win = 1 if p > 0.5, 0.5 if p = 0.5 (a tie counts half), 0 otherwise;
                the mean over prompts. Measured only when there is a baseline (0.5 = as good).
  win_rate[principle]   the same over the prompts whose judgement sampled that comparison principle.
  mean_words    mean reply length in words (whitespace-separated), a check on evasive short answers.
"""

from __future__ import annotations

import collections

import numpy as np

from trainer.eval.data import load_prompts
from trainer.eval.results import MetricSample
from trainer.eval.stats import win_value
from trainer.eval.suites import ModelUnderTest, SuiteContext, SuiteOutput
from trainer.feedback import LabelRecord


def per_principle_win_rates(labels: list[LabelRecord]) -> dict[str, MetricSample]:
    """win_rate[principle id]: the win rate over the prompts whose judgement sampled that principle."""
    by_principle: dict[str, list[tuple[str, float]]] = collections.defaultdict(list)
    for label in labels:
        for principle_id, p in zip(label.principle_ids, label.per_principle_probs):
            by_principle[principle_id].append((label.uid, p))
    return {f"win_rate[{pid}]": MetricSample(win_value([p for _, p in rows]), tuple(u for u, _ in rows), reference=0.5)
            for pid, rows in sorted(by_principle.items())}


def run(model: ModelUnderTest, ctx: SuiteContext) -> SuiteOutput:
    prompts = load_prompts(ctx.config, "helpful")
    texts, uids = [p.text for p in prompts], tuple(p.uid for p in prompts)
    replies = model.generate(texts)
    metrics = {"mean_words": MetricSample(np.array([len(r.split()) for r in replies], np.float64), uids,
                                          description="mean reply length in words")}
    samples = [{"suite": "helpful", "uid": u, "prompt": t, "reply": r} for u, t, r in zip(uids, texts, replies)]
    notes = []
    if ctx.baseline is None:
        notes.append("helpful win_rate: measured against a baseline only (give --baseline)")
    if ctx.baseline is None or ctx.baseline is model:  # the baseline itself: its win rate is 0.5 by definition
        return SuiteOutput(metrics, samples, notes)
    reference = ctx.baseline.generate(texts)
    labels = ctx.judge.preference_labels(texts, replies, reference)
    p_better = np.array([label.p_a for label in labels], np.float64)
    metrics["win_rate"] = MetricSample(win_value(p_better), uids, reference=0.5,
                                       description=f"judge prefers the reply over {ctx.baseline.source}'s")
    metrics.update(per_principle_win_rates(labels))
    for sample, ref, p in zip(samples, reference, p_better):
        sample.update(baseline_reply=ref, p_better=float(p))
    return SuiteOutput(metrics, samples, notes)
