"""SL-CAI: answer → rounds of (principle, critique, revision) on the workers, then SFT on the revisions.

Records (samples/sl.jsonl, one per prompt uid): prompt, initial answer, each round's principle id,
critique and revision, the final revision, constitution hash, weight version.
"""

from __future__ import annotations

import logging

from trainer.ledger import Ledger
from trainer.stages.common import dispatch_prompts, learner_loop
from trainer.weights import WeightHandle

log = logging.getLogger(__name__)


def sft_pairs(records: list[dict]) -> list[tuple[list[dict], str]]:
    """(prompt chat messages, final revision) pairs (trainer.critique.sft_examples)."""
    from trainer.critique import CritiqueRecord, sft_examples

    fields = {f for f in CritiqueRecord.__dataclass_fields__}
    examples = sft_examples(CritiqueRecord.from_json({k: v for k, v in r.items() if k in fields}) for r in records)
    return [(list(e.messages), e.response) for e in examples]


def answer_record(uid: str, record: dict) -> dict:
    """A helpful prompt's answer as an SL record without rounds: its answer is its own SFT target."""
    answer = record["response"]
    return {"uid": uid, "prompt": record["prompt"], "initial_response": answer, "rounds": [],
            "final_revision": answer, "constitution_hash": record["constitution_hash"]}


def run_sl(ctx) -> None:
    import ray

    cfg = ctx.config
    helpful = set(cfg.sl.helpful_sources)
    prompts = {p.uid: p for p in ctx.prompts["sl"] if p.source not in helpful}
    answered = {p.uid: p for p in ctx.prompts["sl"] if p.source in helpful and p.uid not in prompts}
    ledger = Ledger.open(ctx.run_dir / "samples" / "sl.jsonl", list(prompts))
    params = {"rounds": cfg.sl.rounds, "few_shot": cfg.sl.few_shot,
              "revision_style": cfg.sl.revision_style, "max_new_tokens": cfg.sl.max_new_tokens,
              "temperature": cfg.sl.temperature, "seed": cfg.run.seed}
    stats = dispatch_prompts(ctx, "sl", ledger, prompts, "sl", params, WeightHandle(0, None), desc="sl critique")
    records = ledger.records()
    if answered:
        answers = Ledger.open(ctx.run_dir / "samples" / "sl_answers.jsonl", list(answered))
        dispatch_prompts(ctx, "sl", answers, answered, "respond",
                         {"max_new_tokens": cfg.sl.max_new_tokens, "temperature": cfg.sl.temperature},
                         WeightHandle(0, None), make_record=answer_record, desc="sl helpful answers")
        records += answers.records()
    ctx.stages.update("sl", critique_seconds=round(stats.seconds, 1), worker_deaths=stats.worker_deaths,
                      revised=len(prompts), answered=len(answered))
    pairs = sft_pairs(records)
    if not pairs:
        raise RuntimeError("SL-CAI produced no non-empty revisions to fine-tune on")
    start = ray.get(ctx.learner.setup.remote("sl"))["step"]
    ray.get(ctx.learner.set_sft_data.remote(pairs))
    learner_loop(ctx, "sl", cfg.sl.sft_steps, start, cfg.checkpoint.every_steps)
    ray.get(ctx.learner.save_final_params.remote())  # what later stages load: parameters only
    ray.get(ctx.learner.close.remote())
