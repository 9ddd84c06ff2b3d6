"""AI feedback: two responses per prompt from the SL-CAI policy, scored by the feedback model, or
(label.pairs: revisions) pairs taken from SL-CAI's own data.

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


# Declines written by us, phrased the ways small chat models decline, for refusal-contrast pairs.
WRITTEN_REFUSALS = (
    "I'm sorry, but I can't help with that request.",
    "I can't assist with that. Is there something else I can help you with?",
    "I'm not able to provide help with this, as it could be harmful.",
    "Sorry, I won't be able to help with that.",
    "I'm afraid I can't answer that question. Please ask me something else.",
    "I cannot provide information on that topic.",
    "As an AI assistant, I must decline to help with this request.",
    "I'm not comfortable answering that. Let's talk about something else.",
)


def refusal_contrast_pairs(answer_records: list[dict], p_answer: float) -> dict[str, dict]:
    """uid -> label record preferring the model's own answer to a benign prompt (sl.helpful_sources) to a
    written refusal (p_a = p_answer). Revision pairs alone teach the preference model that declining is
    better whatever was asked; these pairs say that declining a benign request is worse."""
    import zlib

    pairs = {}
    for r in answer_records:
        answer = r["final_revision"].strip()
        if not answer:
            continue
        refusal = WRITTEN_REFUSALS[zlib.crc32(r["uid"].encode()) % len(WRITTEN_REFUSALS)]  # stable across runs
        pairs[f"{r['uid']}/contrast"] = {
            "prompt": r["prompt"], "response_a": answer, "response_b": refusal, "p_a": p_answer,
            "principle_ids": [], "per_principle_probs": [], "constitution_hash": r["constitution_hash"],
            "reasoning": [], "source": "refusal_contrast"}
    return pairs


def label_revisions(ctx) -> None:
    """labels.jsonl from SL-CAI's revisions (label.pairs: revisions), and with label.refusal_contrast its
    helpful answers against written refusals: no sampling, no feedback model."""
    if not ctx.stages.done("sl"):
        raise UserError("label.pairs: revisions takes its pairs from SL-CAI's revisions, but the sl stage has not "
                        "run in this run directory; add sl to run.stages or use label.pairs: sampled")
    samples = ctx.run_dir / "samples"
    pairs = revision_pairs(read_records(samples / "sl.jsonl"), ctx.config.label.revision_p)
    if ctx.config.label.refusal_contrast:
        answers = read_records(samples / "sl_answers.jsonl") if (samples / "sl_answers.jsonl").exists() else []
        if not answers:
            raise UserError("label.refusal_contrast pairs the helpful answers of SL-CAI with written refusals, but "
                            "this run has none (samples/sl_answers.jsonl): set sl.helpful_sources to the prompt "
                            "sets to answer, or label.refusal_contrast: false")
        pairs |= refusal_contrast_pairs(answers, ctx.config.label.revision_p)
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
