"""`bbq`: the BBQ bias benchmark (Parrish et al. 2022), read from <data_dir>/bbq through the TFDS builder.

The model answers cloze-style: each of the three answer texts is scored as the assistant's reply
to "context + question", normalised by its length in characters (lm-eval's acc_norm), and the
best one is the prediction. Metrics (definitions in trainer/eval/bbq.py), pooled over the
categories present and per category ("s_amb[Age]"):
  s_dis, s_amb           bias scores ×100 (0 = unbiased; positive = towards the stereotype)
  accuracy_ambig         accuracy on ambiguous contexts (the right answer is "unknown")
  accuracy_disambig      accuracy on disambiguated contexts
CIs by bootstrap over rows.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence

import numpy as np

from trainer.eval import bbq as scores
from trainer.eval.data import load_bbq_rows
from trainer.eval.results import MetricSample
from trainer.eval.suites import ModelUnderTest, SuiteContext, SuiteOutput
from trainer.feedback import OptionScorer
from trainer.prompts import message

METRICS = (
    ("s_dis", "disambig", scores.bias_score),
    ("s_amb", "ambig", scores.ambiguous_bias_score),
    ("accuracy_ambig", "ambig", scores.accuracy),
    ("accuracy_disambig", "disambig", scores.accuracy),
)


def cloze_predictions(rows: Sequence[Mapping], scorer: OptionScorer) -> np.ndarray:
    """Index (0..2) of the answer with the highest log-probability per character as the assistant's reply."""
    if not rows:
        return np.zeros((0,), np.int64)
    contexts = [scorer.render([message("user", f"{row['context'].strip()}\n{row['question'].strip()}")]) for row in rows]
    answers = [[row[f"ans{i}"].strip() for i in range(3)] for row in rows]
    lengths = np.array([[max(len(a), 1) for a in row] for row in answers], np.float64)
    return np.argmax(scorer.score(contexts, answers) / lengths, axis=-1)


def metrics_of(rows: Sequence[Mapping], predictions: Sequence[int]) -> dict[str, MetricSample]:
    """Every BBQ metric, pooled ('s_dis') and per category ('s_dis[Age]')."""
    flags = np.array([scores.row_flags(row, int(p)) for row, p in zip(rows, predictions)], np.float64).reshape(-1, 3)
    groups: dict[str, list[int]] = collections.defaultdict(list)
    for i, row in enumerate(rows):
        groups[row["category"]].append(i)
    out: dict[str, MetricSample] = {}
    for scope, indices in [("", list(range(len(rows))))] + sorted(groups.items()):
        for name, condition, statistic in METRICS:
            cell = [i for i in indices if rows[i]["context_condition"] == condition]
            key = f"{name}[{scope}]" if scope else name
            out[key] = MetricSample(flags[cell].reshape(-1, 3), tuple(rows[i]["uid"] for i in cell), statistic)
    return out


def run(model: ModelUnderTest, ctx: SuiteContext) -> SuiteOutput:
    rows = load_bbq_rows(ctx.config)
    predictions = cloze_predictions(rows, model.scorer)
    samples = [{"suite": "bbq", "uid": row["uid"], "category": row["category"], "condition": row["context_condition"],
                "prediction": int(p), "label": int(row["label"]), "target": scores.target_loc(row)}
               for row, p in zip(rows, predictions)]
    return SuiteOutput(metrics_of(rows, predictions), samples)
