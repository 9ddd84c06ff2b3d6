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


def sft_pairs(records: list[dict]) -> list[tuple[list[dict], str]]:
    """(prompt chat messages, final revision) pairs (trainer.critique.sft_examples)."""
    from trainer.critique import CritiqueRecord, sft_examples

    fields = {f for f in CritiqueRecord.__dataclass_fields__}
    examples = sft_examples(CritiqueRecord.from_json({k: v for k, v in r.items() if k in fields}) for r in records)
    return [(list(e.messages), e.response) for e in examples]


def run_sl(ctx) -> None:
    import ray

    cfg = ctx.config
    prompts = {p.uid: p for p in ctx.prompts["sl"]}
    ledger = Ledger.open(ctx.run_dir / "samples" / "sl.jsonl", list(prompts))
    params = {"rounds": cfg.sl.rounds, "few_shot": cfg.sl.few_shot,
              "revision_style": cfg.sl.revision_style, "max_new_tokens": cfg.sl.max_new_tokens,
              "temperature": cfg.sl.temperature, "seed": cfg.run.seed}
    stats = dispatch_prompts(ctx, "sl", ledger, prompts, "sl", params, WeightHandle(0, None), desc="sl critique")
    ctx.stages.update("sl", critique_seconds=round(stats.seconds, 1), worker_deaths=stats.worker_deaths)
    pairs = sft_pairs(ledger.records())
    if not pairs:
        raise UserError("SL-CAI produced no non-empty revisions to fine-tune on (see samples/sl.jsonl): raise "
                        "sl.max_new_tokens, use more prompts (data.sl_prompts), or try sl.revision_style: fresh "
                        "or a larger model")
    start = ray.get(ctx.learner.setup.remote("sl"))["step"]
    ray.get(ctx.learner.set_sft_data.remote(pairs))
    learner_loop(ctx, "sl", cfg.sl.sft_steps, start, cfg.checkpoint.every_steps)
    ray.get(ctx.learner.save_final_params.remote())  # what later stages load: parameters only
    ray.get(ctx.learner.close.remote())
