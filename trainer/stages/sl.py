"""SL-CAI: answer → rounds of (principle, critique, revision) on the workers, then SFT on the revisions.

Records (samples/sl.jsonl, one per prompt uid): prompt, initial answer, each round's principle id,
critique and revision, the final revision, constitution hash, weight version.
"""

from __future__ import annotations

import logging

from models.errors import UserError
from trainer.ledger import Ledger
from trainer.stages.common import dispatch_prompts, learner_loop
from trainer.weights import WeightHandle

log = logging.getLogger(__name__)


def sft_data(records: list[dict]) -> list:
    """(prompt chat messages, final revision) examples of the sl.jsonl records (trainer.critique.sft_examples)."""
    from trainer.critique import CritiqueRecord, sft_examples

    fields = {f for f in CritiqueRecord.__dataclass_fields__}
    return sft_examples(CritiqueRecord.from_json({k: v for k, v in r.items() if k in fields}) for r in records)


def answer_record(uid: str, record: dict) -> dict:
    """A helpful prompt's answer as an SL record without rounds: its answer is its own SFT target."""
    from trainer.prompts import clean_generation

    answer = clean_generation(record["response"])
    return {"uid": uid, "prompt": record["prompt"], "initial_response": answer, "rounds": [],
            "final_revision": answer, "constitution_hash": record["constitution_hash"]}


def answer_helpful(ctx, prompts: dict) -> list[dict]:
    """The initial model's own answers to `prompts` (sl.helpful_sources), as SL records (samples/sl_answers.jsonl)."""
    from models.sampling import SamplingParams
    from trainer.rollout import RolloutSettings

    cfg = ctx.config.sl
    ledger = Ledger.open(ctx.run_dir / "samples" / "sl_answers.jsonl", list(prompts))
    settings = RolloutSettings(SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature))
    dispatch_prompts(ctx, "sl", ledger, prompts, "rollout", settings, WeightHandle(0, None),
                     make_record=answer_record, desc="sl helpful answers")
    return ledger.records()


def run_sl(ctx) -> None:
    import ray

    cfg = ctx.config
    helpful = set(cfg.sl.helpful_sources)
    prompts = {p.uid: p for p in ctx.prompts["sl"] if p.source not in helpful}
    answered = {p.uid: p for p in ctx.prompts["sl"] if p.source in helpful and p.uid not in prompts}
    ledger = Ledger.open(ctx.run_dir / "samples" / "sl.jsonl", list(prompts))
    stats = dispatch_prompts(ctx, "sl", ledger, prompts, "sl", cfg.sl, WeightHandle(0, None), desc="sl critique")
    records = ledger.records() + (answer_helpful(ctx, answered) if answered else [])
    ctx.stages.update("sl", critique_seconds=round(stats.seconds, 1), worker_deaths=stats.worker_deaths,
                      revised=len(prompts), answered=len(answered))
    examples = sft_data(records)
    if not examples:
        raise UserError("SL-CAI produced no non-empty revisions to fine-tune on (see samples/sl.jsonl): raise "
                        "sl.max_new_tokens, use more prompts (data.sl_prompts), or try sl.revision_style: fresh "
                        "or a larger model")
    start = ray.get(ctx.learner.setup.remote("sl")).step
    ray.get(ctx.learner.set_data.remote(examples))
    learner_loop(ctx, "sl", cfg.sl.sft_steps, start, cfg.checkpoint.every_steps)
    ray.get(ctx.learner.finish.remote())  # the SL policy stays on the learner's devices for later stages
    ray.get(ctx.learner.close.remote())
