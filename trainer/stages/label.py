"""AI feedback: two responses per prompt from the SL-CAI policy, scored by the feedback model.

Records (samples/labels.jsonl): prompt, response_a, response_b, p_a (soft probability that A is
the better answer), principle_ids, per-principle probabilities, constitution hash, weight version.
"""

from __future__ import annotations

from models.errors import UserError
from trainer.ledger import Ledger, read_records
from trainer.stages.common import dispatch_prompts
from trainer.weights import WeightHandle


def label_weights(ctx) -> WeightHandle:
    """The policy entering label/PPO: SL's (published as version 1) or the initial model (version 0)."""
    import ray

    if not ctx.stages.done("sl"):
        return WeightHandle(0, None)
    return ray.get(ctx.learner.publish.remote(1))


def revision_pairs(sl_records: list[dict], revision_p: float) -> dict[str, dict]:
    """uid -> label record preferring each prompt's final SL revision to its initial answer (p_a =
    revision_p); prompts whose revision is empty or equals the answer give no pair."""
    pairs = {}
    for r in sl_records:
        answer, revision = r["initial_response"].strip(), r["final_revision"].strip()
        if not r["rounds"] or not answer or not revision or answer == revision:
            continue
        principles = [round_["principle_id"] for round_ in r["rounds"]]
        pairs[r["uid"]] = {"prompt": r["prompt"], "response_a": revision, "response_b": answer, "p_a": revision_p,
                           "principle_ids": principles, "per_principle_probs": [revision_p] * len(principles),
                           "constitution_hash": r["constitution_hash"], "reasoning": [], "source": "sl_revision"}
    return pairs


def label_revisions(ctx) -> None:
    """labels.jsonl from SL-CAI's revisions (label.pairs: revisions): no sampling, no feedback model."""
    if not ctx.stages.done("sl"):
        raise UserError("label.pairs: revisions takes its pairs from SL-CAI's revisions, but the sl stage has not "
                        "run in this run directory; add sl to run.stages or use label.pairs: sampled")
    pairs = revision_pairs(read_records(ctx.run_dir / "samples" / "sl.jsonl"), ctx.config.label.revision_p)
    ledger = Ledger.open(ctx.run_dir / "samples" / "labels.jsonl", list(pairs))
    for uid in list(ledger.pending):
        ledger.complete(uid, pairs[uid])
    ctx.stages.update("label", pairs=len(ledger.done), source="sl_revisions")


def run_label(ctx) -> None:
    import ray

    cfg = ctx.config
    if cfg.label.pairs == "revisions":
        return label_revisions(ctx)
    ray.get(ctx.learner.setup.remote("label"))
    weights = label_weights(ctx)
    prompts = {p.uid: p for p in ctx.prompts["label"]}
    ledger = Ledger.open(ctx.run_dir / "samples" / "labels.jsonl", list(prompts))
    stats = dispatch_prompts(ctx, "label", ledger, prompts, "label", cfg.label, weights, desc="label pairs")
    ctx.stages.update("label", worker_deaths=stats.worker_deaths, pairs=len(ledger.done))
