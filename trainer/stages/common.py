"""Pieces the stages share: progress bars, prompt dispatch through the ledger, learner loops."""

from __future__ import annotations

import sys

from trainer import signals
from trainer.ledger import Ledger
from trainer.rollout import Task, task_seed
from trainer.weights import WeightHandle


def progress(total: int, desc: str, initial: int = 0):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, file=sys.stderr, dynamic_ncols=True, leave=True)


def dispatch_prompts(ctx, stage: str, ledger: Ledger, prompts: dict, kind: str, settings,
                     weights: WeightHandle, make_record=None, desc: str | None = None):
    """Run every pending uid of `ledger` through the workers as `kind` tasks with `settings` (the kind's
    typed config, see trainer.rollout.Task) at `weights`; each record (plus the prompt text and
    constitution hash) is completed in the ledger."""
    import ray

    def make_task(uids):
        return Task(kind=kind, uids=tuple(uids), texts=tuple(prompts[u].text for u in uids), weights=weights,
                    seed=task_seed(ctx.config.run.seed, stage, uids, weights.version), settings=settings)

    def on_record(uid, record, result):
        record = dict(record)
        record.setdefault("prompt", prompts[uid].text)
        record["constitution_hash"] = ctx.constitution_hash
        record["worker"] = result.worker
        if make_record is not None:
            record = make_record(uid, record)
        ledger.complete(uid, record)

    bar = progress(len(ledger.uids), desc or stage, initial=len(ledger.done))
    try:
        return ctx.pool.run(ledger, make_task, on_record, current_version=lambda: weights.version,
                            batch_size=ctx.config.rollout.batch_size, progress=bar)
    finally:
        bar.close()
        del ray


def stop_if_diverged(ctx, guard, step: int, metrics: dict, extras: dict) -> None:
    """After `guard.max_in_a_row` updates in a row were skipped as non-finite: save the stage's state
    at `step` (a resume continues from there, e.g. with a lower learning rate) and stop the run with
    TrainingDivergedError. Nothing after it (later stages, export) runs on diverged weights."""
    import ray

    from trainer.state import TrainingDivergedError

    try:
        guard.check(metrics)
    except TrainingDivergedError:
        ray.get(ctx.learner.save.remote(step, extras, True))
        raise


def learner_loop(ctx, stage: str, total_steps: int, start_step: int, every: int, extras=None) -> list[dict]:
    """Run `learner.train_step` from `start_step` to `total_steps`, logging metrics and checkpointing."""
    import ray

    from trainer.state import NonFiniteGuard

    learner = ctx.learner
    guard = NonFiniteGuard(ctx.config.run.max_nonfinite_updates)
    logged = []
    bar = progress(total_steps, f"{stage} train", initial=start_step)
    try:
        for step in range(start_step, total_steps):
            metrics = ray.get(learner.train_step.remote())
            ctx.metrics.write(stage, step + 1, metrics)
            stop_if_diverged(ctx, guard, step + 1, metrics, extras or {})
            logged.append(metrics)
            bar.update(1)
            bar.set_postfix(loss=f"{metrics.get('loss', float('nan')):.3f}")
            if (step + 1) % every == 0 and step + 1 < total_steps:
                ray.get(learner.save.remote(step + 1, extras or {}))
            if signals.stop_requested() and step + 1 < total_steps:  # SIGTERM/SIGINT: save, then stop
                ray.get(learner.save.remote(step + 1, extras or {}, True))
                signals.check(f"after {stage} step {step + 1}")
    finally:
        bar.close()
    ray.get(learner.save.remote(total_steps, extras or {}, True))
    return logged
