"""RL-CAI by DPO: the SL policy trained straight on the AI-labelled pairs (samples/labels.jsonl), with
no preference model and no sampling (trainer/dpo.py). Held-out pairs (the rm stage's split rule)
give the implicit-reward accuracy before and after training. The result is the run's RL policy
(checkpoints/dpo-params): evaluated as the `rl` point and exported.
"""

from __future__ import annotations

from models.errors import UserError
from trainer.learners.requests import PreferenceData, PreferencePair
from trainer.ledger import read_records
from trainer.stages.common import learner_loop
from trainer.stages.rm import split_labels


def run_dpo(ctx) -> None:
    import ray

    cfg = ctx.config
    labels = read_records(ctx.run_dir / "samples" / "labels.jsonl")
    if len(labels) < 2:
        raise UserError(f"the dpo stage needs at least 2 labelled pairs, found {len(labels)} in samples/labels.jsonl; "
                        f"run the label stage first (run.stages), or raise data.label_prompts")
    train, heldout = split_labels(labels, cfg.dpo.heldout_fraction)
    start = ray.get(ctx.learner.setup.remote("dpo")).step
    ray.get(ctx.learner.set_data.remote(PreferenceData(train=tuple(map(PreferencePair.from_record, train)),
                                                       heldout=tuple(map(PreferencePair.from_record, heldout)))))
    if start == 0:
        before = ray.get(ctx.learner.evaluate.remote())
        ctx.metrics.write("dpo_eval", 0, before)
        ctx.stages.update("dpo", heldout_accuracy_before=before["accuracy"])
    learner_loop(ctx, "dpo", cfg.dpo.steps, start, cfg.checkpoint.every_steps)
    after = ray.get(ctx.learner.evaluate.remote())
    ctx.metrics.write("dpo_eval", cfg.dpo.steps, after)
    ctx.stages.update("dpo", heldout_accuracy=after["accuracy"], heldout_margin=after["margin"],
                      heldout_loss=after["loss"], train_pairs=len(train), heldout_pairs=len(heldout))
    ray.get(ctx.learner.finish.remote())  # checkpoints/dpo-params; the policy stays on the learner's devices
