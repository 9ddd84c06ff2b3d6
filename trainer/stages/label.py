"""AI feedback: two responses per prompt from the SL-CAI policy, scored by the feedback model.

Records (samples/labels.jsonl): prompt, response_a, response_b, p_a (soft probability that A is
the better answer), principle_ids, per-principle probabilities, constitution hash, weight version.
"""

from __future__ import annotations

from trainer.ledger import Ledger
from trainer.stages.common import dispatch_prompts
from trainer.weights import WeightHandle


def label_weights(ctx) -> WeightHandle:
    """The policy entering label/PPO: SL's (published as version 1) or the initial model (version 0)."""
    import ray

    if not ctx.stages.done("sl"):
        return WeightHandle(0, None)
    return ray.get(ctx.learner.publish.remote(1))


def run_label(ctx) -> None:
    import ray

    cfg = ctx.config
    ray.get(ctx.learner.setup.remote("label"))
    weights = label_weights(ctx)
    prompts = {p.uid: p for p in ctx.prompts["label"]}
    ledger = Ledger.open(ctx.run_dir / "samples" / "labels.jsonl", list(prompts))
    stats = dispatch_prompts(ctx, "label", ledger, prompts, "label", cfg.label, weights, desc="label pairs")
    ctx.stages.update("label", worker_deaths=stats.worker_deaths, pairs=len(ledger.done))
