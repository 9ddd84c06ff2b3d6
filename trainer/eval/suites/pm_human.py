"""`pm_human`: agreement with human preferences on hh-rlhf test pairs (Bai et al. 2022a), read
from <data_dir>/hh-rlhf/{harmless-base,helpful-base}/test.jsonl.gz through the TFDS builder.

Per subset (harmless-base, helpful-base), on `cap` pairs spread over the file; chance is 0.5:
  pm_accuracy[subset]         the preference model's r(chosen) > r(rejected) (with --preference-model)
  feedback_accuracy[subset]   the evaluated model as the feedback model, scored as the label stage
                              scores: how well its AI labels agree with the human ones
"""

from __future__ import annotations

from trainer.eval.data import HH_SUBSETS, load_human_pairs
from trainer.eval.results import MetricSample
from trainer.eval.suites import ModelUnderTest, SuiteContext, SuiteOutput
from trainer.eval.suites.pairs import KnownPreference, feedback_agreement, pm_agreement


def run(model: ModelUnderTest, ctx: SuiteContext) -> SuiteOutput:
    metrics, notes = {}, []
    for subset in HH_SUBSETS:
        pairs = [KnownPreference(p.uid, p.prompt, p.chosen, p.rejected) for p in load_human_pairs(ctx.config, subset)]
        uids = tuple(p.uid for p in pairs)
        if ctx.preference_model is not None:
            metrics[f"pm_accuracy[{subset}]"] = MetricSample(pm_agreement(pairs, ctx.preference_model), uids)
        metrics[f"feedback_accuracy[{subset}]"] = MetricSample(feedback_agreement(pairs, ctx, model.scorer), uids)
    if ctx.preference_model is None:
        notes.append("pm_human pm_accuracy: no preference model given (--preference-model RUN_DIR:rm)")
    return SuiteOutput(metrics, [], notes)
