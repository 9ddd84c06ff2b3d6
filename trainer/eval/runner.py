"""Run the chosen suites on one model: the same code in `cairl eval` and inside `cairl train`.

    ctx = SuiteContext(config, constitution, feedback, judge=judge, baseline=base_model)
    result, samples = evaluate(model, ctx, judge_info)
"""

from __future__ import annotations

import importlib
import logging
import time

from trainer.eval.results import EvalResult, JudgeInfo
from trainer.eval.suites import ModelUnderTest, SuiteContext

log = logging.getLogger(__name__)

# Suites that ask the judge something.
JUDGED_SUITES = ("harmless", "helpful")


def suite_module(name: str):
    return importlib.import_module(f"trainer.eval.suites.{name}")


def evaluate(model: ModelUnderTest, ctx: SuiteContext, judge: JudgeInfo | None) -> tuple[EvalResult, list[dict]]:
    """Every suite of `ctx.config.suites` on `model`: its metrics, plus the samples they read."""
    suites, samples, notes = {}, [], []
    for name in ctx.config.suites:
        start = time.perf_counter()
        output = suite_module(name).run(model, ctx)
        suites[name] = output.metrics
        samples += [{"model": model.source, **s} for s in output.samples]
        notes += output.notes
        log.info("eval %s on %s: %.1f s", name, model.source, time.perf_counter() - start)
    used_judge = judge if any(s in JUDGED_SUITES for s in ctx.config.suites) else None
    return EvalResult(model=model.source, judge=used_judge, suites=suites, notes=tuple(notes)), samples
