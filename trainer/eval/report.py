"""eval.json, eval.md and a plot from evaluation results.

eval.json (a stable layout for scripts):
    {"model": str, "baseline": str | null, "judge": str | null,
     "suites": {SUITE: {METRIC: {"value", "ci95": [lo, hi], "n", "baseline", "delta", "delta_ci95"}}}}
Values that could not be computed (e.g. a bias score when every answer was "unknown") are null.
The markdown table puts several models side by side (e.g. base | SL | RL): each column after the
first shows value [CI] and the delta vs the first column with its paired-bootstrap CI.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from trainer.eval.results import EvalResult, MetricSummary, summarize


def eval_json(result: EvalResult, baseline: EvalResult | None, seed: int = 0) -> dict:
    summaries = summarize(result, baseline, seed)
    return {
        "model": result.model,
        "baseline": baseline.model if baseline is not None else None,
        "judge": result.judge.describe() if result.judge is not None else None,
        "suites": {suite: {name: s.to_json() for name, s in metrics.items()} for suite, metrics in summaries.items()},
    }


def _number(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.3g}" if abs(x) >= 10 else f"{x:.3f}"


def _cell(summary: MetricSummary | None, compared: bool) -> str:
    if summary is None:
        return "—"
    text = f"{_number(summary.value)} [{_number(summary.ci95[0])}, {_number(summary.ci95[1])}]"
    if compared and summary.delta is not None:
        lo, hi = summary.delta_ci95
        sign = "+" if summary.delta >= 0 else ""
        text += f" (Δ {sign}{_number(summary.delta)} [{_number(lo)}, {_number(hi)}])"
    return text


def markdown_table(results: Sequence[EvalResult], labels: Sequence[str] | None = None, seed: int = 0) -> str:
    """One row per (suite, metric), one column per model; deltas vs the first model (paired, same items)."""
    labels = list(labels or [r.model for r in results])
    first = results[0]
    summaries = [summarize(r, None if i == 0 else first, seed) for i, r in enumerate(results)]
    rows = []
    keys = []
    for summary in summaries:
        for suite, metrics in summary.items():
            keys += [(suite, m) for m in metrics if (suite, m) not in keys]
    header = "| suite | metric | n | " + " | ".join(labels) + " |"
    rows = [header, "|" + "---|" * (3 + len(labels))]
    for suite, metric in keys:
        cells = [summaries[i].get(suite, {}).get(metric) for i in range(len(results))]
        n = next((c.n for c in cells if c is not None), 0)
        rows.append(f"| {suite} | {metric} | {n} | " + " | ".join(_cell(c, i > 0 or (c is not None and c.delta is not None))
                                                               for i, c in enumerate(cells)) + " |")
    return "\n".join(rows)


def markdown_report(results: Sequence[EvalResult], labels: Sequence[str] | None = None, seed: int = 0) -> str:
    judges = {r.judge.describe() for r in results if r.judge is not None}
    lines = ["# Evaluation", "", f"Models: {', '.join(r.model for r in results)}."]
    lines.append(f"Judge: {'; '.join(sorted(judges))}." if judges else "Judge: none of the chosen suites uses one.")
    lines += ["", "Values with 95 % bootstrap CIs; Δ = difference vs the first column (paired bootstrap CI; a win rate "
              "is compared with 0.5).", "", markdown_table(results, labels, seed)]
    notes = sorted({n for r in results for n in r.notes})
    if notes:
        lines += ["", "Not measured:", *[f"- {n}" for n in notes]]
    return "\n".join(lines) + "\n"


def plot(results: Sequence[EvalResult], path: Path, labels: Sequence[str] | None = None, seed: int = 0) -> Path:
    """One horizontal error-bar panel per suite: each metric's value with its 95 % CI, one colour per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(labels or [r.model for r in results])
    summaries = [summarize(r, None, seed) for r in results]
    suites = list(dict.fromkeys(s for summary in summaries for s in summary))
    fig, axes = plt.subplots(len(suites), 1, figsize=(8, 1.2 + 0.45 * max(
        len(summaries[0].get(s, {})) for s in suites) * len(suites)), squeeze=False)
    for ax, suite in zip(axes[:, 0], suites):
        metrics = list(dict.fromkeys(m for summary in summaries for m in summary.get(suite, {})))
        for k, (summary, label) in enumerate(zip(summaries, labels)):
            for j, metric in enumerate(metrics):
                s = summary.get(suite, {}).get(metric)
                if s is None or math.isnan(s.value):
                    continue
                lo, hi = s.ci95
                err = [[max(s.value - lo, 0.0)], [max(hi - s.value, 0.0)]] if not math.isnan(lo) else None
                ax.errorbar([s.value], [j + 0.15 * k], xerr=err, fmt="o", color=f"C{k}",
                            label=label if j == 0 else None, capsize=3)
        ax.set_yticks(range(len(metrics)), metrics)
        ax.set_title(suite, fontsize=10)
    axes[0, 0].legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_outputs(out_dir: Path, evaluated: Sequence[EvalResult], baseline: EvalResult | None, samples: list[dict],
                  seed: int = 0) -> list[Path]:
    """eval.json (eval-1.json, eval-2.json, ... in order for several models), eval.md (one column per
    model, the baseline first), eval.png and samples.jsonl into `out_dir`; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    results = ([baseline] if baseline is not None else []) + list(evaluated)
    names = ["eval.json"] if len(evaluated) == 1 else [f"eval-{i}.json" for i in range(1, len(evaluated) + 1)]
    paths = [out_dir / name for name in names] + [out_dir / "eval.md", out_dir / "eval.png", out_dir / "samples.jsonl"]
    for path, result in zip(paths, evaluated):
        path.write_text(json.dumps(eval_json(result, baseline, seed), indent=2) + "\n")
    paths[-3].write_text(markdown_report(results, seed=seed))
    plot(results, paths[-2], seed=seed)
    with paths[-1].open("w") as handle:
        for sample in samples:
            handle.write(json.dumps(sample) + "\n")
    return paths
