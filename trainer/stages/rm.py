"""Preference model: Bradley–Terry with soft AI labels; held-out accuracy before and after training."""

from __future__ import annotations

import zlib

from models.errors import UserError
from trainer.learners.requests import PreferenceData, PreferencePair
from trainer.ledger import read_records
from trainer.stages.common import learner_loop


def split_labels(records: list[dict], heldout_fraction: float) -> tuple[list[dict], list[dict]]:
    """A split fixed by each uid's hash, so a resumed or repeated run holds out the same pairs."""
    train, heldout = [], []
    for r in records:
        bucket = (zlib.crc32(r["uid"].encode()) % 1000) / 1000.0
        (heldout if bucket < heldout_fraction else train).append(r)
    if not heldout and len(train) > 1:
        heldout.append(train.pop())
    if not train and len(heldout) > 1:
        train.append(heldout.pop())
    return train, heldout


def start_on_labels(ctx, stage: str, heldout_fraction: float, extra_train=lambda: []) -> tuple[int, list, list]:
    """Set up `stage`'s learner on the AI-labelled pairs (samples/labels.jsonl, split by `split_labels`;
    `extra_train()` records join training only). A fresh stage is evaluated on the held-out pairs first
    (metrics `<stage>_eval` step 0, stages.json heldout_accuracy_before). Returns (start step, train, heldout)."""
    import ray

    labels = read_records(ctx.run_dir / "samples" / "labels.jsonl")
    if len(labels) < 2:
        raise UserError(f"the {stage} stage needs at least 2 labelled pairs, found {len(labels)} in "
                        f"samples/labels.jsonl; run the label stage first (run.stages), or raise data.label_prompts")
    train, heldout = split_labels(labels, heldout_fraction)
    train += extra_train()
    start = ray.get(ctx.learner.setup.remote(stage)).step
    ray.get(ctx.learner.set_data.remote(PreferenceData(train=tuple(map(PreferencePair.from_record, train)),
                                                       heldout=tuple(map(PreferencePair.from_record, heldout)))))
    if start == 0:
        before = ray.get(ctx.learner.evaluate.remote())
        ctx.metrics.write(f"{stage}_eval", 0, before)
        ctx.stages.update(stage, heldout_accuracy_before=before["accuracy"])
    return start, train, heldout


def accuracy_by_source(ctx, heldout: list[dict]) -> dict[str, dict]:
    """Held-out accuracy per pair source (labels.jsonl `source`: sl_revision, refusal_contrast, …) when
    the held-out set mixes sources: one overall figure can hide a source the model gets wrong, and
    that source is what RL then learns from."""
    import ray

    groups: dict[str, list[dict]] = {}
    for record in heldout:
        groups.setdefault(record.get("source", "unknown"), []).append(record)
    if len(groups) < 2:
        return {}
    return {source: {"accuracy": ray.get(ctx.learner.evaluate.remote(tuple(map(PreferencePair.from_record,
                                                                                 records))))["accuracy"],
                     "pairs": len(records)}
            for source, records in sorted(groups.items())}


def _human_pairs(cfg):
    """Human helpfulness pairs (rm.human_pairs): they join training only, held-out accuracy stays on AI labels."""
    if not cfg.rm.human_pairs:
        return []
    from trainer.data.human_pairs import human_pair_records

    return human_pair_records(cfg.rm.human_pairs, cfg.rm.human_pairs_count)


def run_rm(ctx) -> None:
    import ray

    cfg = ctx.config
    start, train, heldout = start_on_labels(ctx, "rm", cfg.rm.heldout_fraction, lambda: _human_pairs(cfg))
    learner_loop(ctx, "rm", cfg.rm.steps, start, cfg.checkpoint.every_steps)
    after = ray.get(ctx.learner.evaluate.remote())
    ctx.metrics.write("rm_eval", cfg.rm.steps, after)
    ctx.stages.update("rm", heldout_accuracy=after["accuracy"], heldout_bt_loss=after["bt_loss"],
                      train_pairs=len(train), heldout_pairs=len(heldout),
                      heldout_accuracy_by_source=accuracy_by_source(ctx, heldout))
    ray.get(ctx.learner.finish.remote())  # the preference model stays on the learner's devices for PPO
    ray.get(ctx.learner.close.remote())
