"""AI feedback: two responses per prompt from the SL-CAI policy, scored by the feedback model, or
(label.pairs: revisions) pairs taken from SL-CAI's own data.

Records (samples/labels.jsonl): prompt, response_a, response_b, p_a (soft probability that A is
the better answer), principle_ids, per-principle probabilities, constitution hash, weight version.
"""

from __future__ import annotations

import collections
import zlib

from models.errors import UserError
from trainer.eval.refusal import is_refusal_or_redirect
from trainer.ledger import Ledger, read_records
from trainer.stages.common import dispatch_prompts
from trainer.weights import WeightHandle


def label_weights(ctx) -> WeightHandle:
    """The policy entering label/PPO: SL's (published as version 1) or the initial model (version 0)."""
    import ray

    if not ctx.stages.done("sl"):
        return WeightHandle(0, None)
    return ray.get(ctx.learner.publish.remote(1))


def revision_pairs(sl_records: list[dict], revision_p: float, only_declines: bool = False) -> dict[str, dict]:
    """uid -> label record preferring each prompt's final SL revision to its initial answer (p_a =
    revision_p); prompts whose revision is empty or equals the answer give no pair. `only_declines`
    (label.revision_filter: declines) keeps only revisions that refuse or redirect an answer that did not."""
    pairs = {}
    for r in sl_records:
        answer, revision = r["initial_response"].strip(), r["final_revision"].strip()
        if not r["rounds"] or not answer or not revision or answer == revision:
            continue
        if only_declines and (not is_refusal_or_redirect(revision) or is_refusal_or_redirect(answer)):
            continue
        principles = [round_["principle_id"] for round_ in r["rounds"]]
        pairs[r["uid"]] = {"prompt": r["prompt"], "response_a": revision, "response_b": answer, "p_a": revision_p,
                           "principle_ids": principles, "per_principle_probs": [revision_p] * len(principles),
                           "constitution_hash": r["constitution_hash"], "reasoning": [], "source": "sl_revision"}
    return pairs


# Declines written by us, phrased the ways small chat models decline, for refusal-contrast pairs. Each is as
# long as the model's own answers (48-50 words on average at sl.max_new_tokens 64): with one-line declines against
# full answers, the preference model learned "a short reply to a harmful request wins", and GRPO on it
# shortened every reply to a few words (run 8, docs/recipe.md).
WRITTEN_REFUSALS = (
    "I'm sorry, but I can't help with that request. What you're asking for could hurt someone or break the law, "
    "and I don't want to contribute to that. If there's a safe goal behind your question, tell me a little more "
    "and I'll gladly help you find a good way to reach it.",
    "I can't assist with that. Giving you these details could put you or other people at real risk, so it's "
    "something I won't do. Is there something else I can help you with? I'm happy to explain the safety side of "
    "this topic or point you to people who can help.",
    "I'm not able to provide help with this, as it could be harmful. Requests like this can lead to injury, loss "
    "or legal trouble for the people involved. If you're dealing with a difficult situation, I'd be glad to talk "
    "through safer options with you or suggest where to find support.",
    "Sorry, I won't be able to help with that. It asks for something that could be used to harm, deceive or "
    "take advantage of others, and that goes against the way I try to help. If you have a related question that "
    "doesn't involve hurting anyone, I'm here for it.",
    "I'm afraid I can't answer that question. Helping with it could cause harm, even if that isn't what you "
    "intend, so I have to decline. Please ask me something else, or tell me what you are trying to achieve and I "
    "will try to suggest a safe and legal way to do it.",
    "I cannot provide information on that topic. It could be used to cause serious harm to people, property or "
    "yourself, and I'd rather not take that risk. If you're curious about the subject in general, I can share "
    "some background on why it's dangerous and how people stay safe.",
    "As an AI assistant, I must decline to help with this request. It involves something that could hurt others "
    "or break the law, and I aim to be helpful without causing harm. If there's another way I can support you, "
    "for example with information on safety or on getting help, just let me know.",
    "I'm not comfortable answering that. Doing what you describe could cause real harm to someone, and I don't "
    "want to play a part in it. Let's talk about something else, or if something is worrying you, I'm happy to "
    "help you think about a safer way to handle it.",
)


def _written_refusal(uid: str) -> str:
    return WRITTEN_REFUSALS[zlib.crc32(uid.encode()) % len(WRITTEN_REFUSALS)]  # stable across runs


def _contrast_record(record: dict, preferred: str, rejected: str, p_a: float, source: str) -> dict:
    return {"prompt": record["prompt"], "response_a": preferred, "response_b": rejected, "p_a": p_a,
            "principle_ids": [], "per_principle_probs": [], "constitution_hash": record["constitution_hash"],
            "reasoning": [], "source": source}


def refusal_contrast_pairs(answer_records: list[dict], p_answer: float) -> dict[str, dict]:
    """uid -> label record preferring the model's own answer to a benign prompt (sl.helpful_sources) to a
    written refusal (p_a = p_answer). Revision pairs alone teach the preference model that declining is
    better whatever was asked; these pairs say that declining a benign request is worse."""
    pairs = {}
    for r in answer_records:
        answer = r["final_revision"].strip()
        if answer:
            pairs[f"{r['uid']}/contrast"] = _contrast_record(r, answer, _written_refusal(r["uid"]), p_answer,
                                                             "refusal_contrast")
    return pairs


def harmful_contrast_pairs(sl_records: list[dict], p_refusal: float) -> dict[str, dict]:
    """uid -> label record preferring a written refusal to the model's initial answer to a harmful request
    (the prompts SL-CAI revised) where that answer neither refuses nor redirects (phrase classifier): the
    mirror of `refusal_contrast_pairs`, so the same written refusals are preferred on harmful requests."""
    pairs = {}
    for r in sl_records:
        answer = r["initial_response"].strip()
        if answer and not is_refusal_or_redirect(answer):
            pairs[f"{r['uid']}/harmful-contrast"] = _contrast_record(r, _written_refusal(r["uid"]), answer,
                                                                     p_refusal, "harmful_contrast")
    return pairs


def own_decline_pairs(answer_records: list[dict], declines: list[str], p_answer: float) -> dict[str, dict]:
    """uid -> label record preferring the model's own answer to a benign prompt to one of the model's own
    declines (`declines`: SL-CAI revisions that declined a harmful request), chosen by a stable hash of the
    uid. PPO samples the policy's own way of declining, which revision pairs show only ever preferred;
    the written refusals of `refusal_contrast_pairs` do not look like it (run 5, docs/recipe.md)."""
    pool = sorted(set(declines))
    if not pool:
        return {}
    pairs = {}
    for r in answer_records:
        answer = r["final_revision"].strip()
        if answer:
            decline = pool[zlib.crc32(r["uid"].encode()) % len(pool)]
            pairs[f"{r['uid']}/own-decline"] = _contrast_record(r, answer, decline, p_answer, "own_decline_contrast")
    return pairs


def stable_subset(pairs: dict[str, dict], size: int) -> dict[str, dict]:
    """`size` of `pairs`: those whose uid hashes lowest (a choice that is stable across runs and independent
    of file order), in their original order."""
    chosen = set(sorted(pairs, key=lambda uid: (zlib.crc32(uid.encode()), uid))[:size])
    return {uid: pairs[uid] for uid in pairs if uid in chosen}


def balanced(first: dict[str, dict], second: dict[str, dict]) -> tuple[dict[str, dict], dict[str, dict]]:
    """Both pair sets cut to the smaller one's size (`stable_subset`)."""
    size = min(len(first), len(second))
    return stable_subset(first, size), stable_subset(second, size)


def own_declines_against_revisions(answers: list[dict], pairs: dict[str, dict], p_answer: float) -> dict[str, dict]:
    """label.own_declines: as many own-decline pairs (a decline rejected on a benign request) as there are
    revision pairs whose revision declines (the same declines preferred on harmful requests)."""
    declines = [p["response_a"] for p in pairs.values()
                if p["source"] == "sl_revision" and is_refusal_or_redirect(p["response_a"])]
    if not declines:
        raise UserError(f"label.own_declines rejects the model's own declines on benign requests, but none of "
                        f"this run's {sum(p['source'] == 'sl_revision' for p in pairs.values())} SL-CAI revision "
                        "pairs declines (phrase classifier, trainer/eval/refusal.py); set label.own_declines: false")
    return stable_subset(own_decline_pairs(answers, declines, p_answer), len(declines))


def label_revisions(ctx) -> None:
    """labels.jsonl from SL-CAI's revisions (label.pairs: revisions), and with label.refusal_contrast its
    helpful answers against written refusals: no sampling, no feedback model."""
    if not ctx.stages.done("sl"):
        raise UserError("label.pairs: revisions takes its pairs from SL-CAI's revisions, but the sl stage has not "
                        "run in this run directory; add sl to run.stages or use label.pairs: sampled")
    cfg, samples = ctx.config.label, ctx.run_dir / "samples"
    sl_records = read_records(samples / "sl.jsonl")
    pairs = revision_pairs(sl_records, cfg.revision_p, only_declines=cfg.revision_filter == "declines")
    if cfg.refusal_contrast:
        answers = read_records(samples / "sl_answers.jsonl") if (samples / "sl_answers.jsonl").exists() else []
        if not answers:
            raise UserError("label.refusal_contrast pairs the helpful answers of SL-CAI with written refusals, but "
                            "this run has none (samples/sl_answers.jsonl): set sl.helpful_sources to the prompt "
                            "sets to answer, or label.refusal_contrast: false")
        benign = refusal_contrast_pairs(answers, cfg.revision_p)
        if cfg.harmful_contrast:
            benign, harmful = balanced(benign, harmful_contrast_pairs(sl_records, cfg.revision_p))
            pairs |= harmful
        if cfg.own_declines:
            pairs |= own_declines_against_revisions(answers, pairs, cfg.revision_p)
        pairs |= benign
    ledger = Ledger.open(ctx.run_dir / "samples" / "labels.jsonl", list(pairs))
    for uid in list(ledger.pending):
        ledger.complete(uid, pairs[uid])
    by_source = collections.Counter(record["source"] for record in pairs.values())
    ctx.stages.update("label", pairs=len(ledger.done), source="sl_revisions", pairs_by_source=dict(by_source))


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
