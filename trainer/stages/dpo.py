"""RL-CAI by DPO: the SL policy trained straight on the AI-labelled pairs (samples/labels.jsonl), with
no preference model and no sampling (trainer/dpo.py). Held-out pairs (the rm stage's split rule)
give the implicit-reward accuracy before and after training. The result is the run's RL policy
(checkpoints/dpo-params): evaluated as the `rl` point and exported.
"""

from __future__ import annotations

from trainer.stages.common import learner_loop
from trainer.stages.rm import accuracy_by_source, start_on_labels


def run_dpo(ctx) -> None:
    import ray

    cfg = ctx.config
    start, train, heldout = start_on_labels(ctx, "dpo", cfg.dpo.heldout_fraction)
    learner_loop(ctx, "dpo", cfg.dpo.steps, start, cfg.checkpoint.every_steps)
    after = ray.get(ctx.learner.evaluate.remote())
    ctx.metrics.write("dpo_eval", cfg.dpo.steps, after)
    # DPO publishes nothing while it trains: its policy takes the version after the one it started from
    # (SL's 1, else the initial 0), which its evaluation asks for (trainer.stages.evaluate).
    ctx.stages.update("dpo", heldout_accuracy=after["accuracy"], heldout_margin=after["margin"],
                      heldout_loss=after["loss"], train_pairs=len(train), heldout_pairs=len(heldout),
                      final_version=(1 if ctx.stages.done("sl") else 0) + 1,
                      heldout_accuracy_by_source=accuracy_by_source(ctx, heldout))
    ray.get(ctx.learner.finish.remote())  # checkpoints/dpo-params; the policy stays on the learner's devices
