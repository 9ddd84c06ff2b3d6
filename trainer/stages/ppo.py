"""RL-CAI: per iteration, workers sample rollouts at the current weight version; the learner scores
them with the preference model, computes reference log-probs and values, runs the PPO update; the
new weights are published (version + 1). Held-out prompts are answered (greedy) and scored by the
preference model before the first and after the last iteration.

With `ppo.algorithm` grpo or rloo the same loop runs without a value model: each prompt is answered
ppo.group.group_size times in one `group` task (one record per prompt uid: the ledger completes the
whole group at once, at one weight version) and the learner is trainer/learners/grpo.py.

Resume: the learner restores the newest PPO checkpoint (policy, value, β, step); rollouts and
metrics logged past that iteration are dropped and redone. Rollouts: samples/rollouts.jsonl, uids
'it<k>/<prompt uid>'.
"""

from __future__ import annotations

import time

import numpy as np

from models.sampling import SamplingParams
from trainer import signals
from trainer.learners.requests import Rollout
from trainer.ledger import Ledger, read_records, truncate_records
from trainer.rollout import RolloutSettings
from trainer.stages.common import dispatch_prompts, progress, stop_if_diverged
from trainer.state import NonFiniteGuard
from trainer.stages.label import label_weights
from trainer.weights import WeightHandle

LOGGED = ("reward_mean", "reward_std", "kl", "beta", "entropy", "clip_fraction", "approx_kl", "value_loss",
          "explained_variance", "response_length", "policy_loss", "score_seconds", "update_seconds", "epochs_run",
          "skipped", "policy_skipped", "value_skipped", "nonfinite_streak", "kl_ref", "degenerate_groups",
          "advantage_abs_mean")


def iteration_prompts(prompts: list, iteration: int, batch_size: int) -> list:
    """Batch k is prompts k·B … k·B+B−1 of the PPO set, wrapping: the data position is the iteration."""
    return [prompts[(iteration * batch_size + i) % len(prompts)] for i in range(batch_size)]


def batch_rollouts(records: dict, uids, grouped: bool) -> list[Rollout]:
    """The learner's batch, in `uids` order; grouped: each prompt's G responses consecutively (group-major)."""
    if grouped:
        return [r for u in uids for r in Rollout.group_from_record(records[u])]
    return [Rollout.from_record(records[u]) for u in uids]


def evaluate(ctx, tag: str, weights: WeightHandle) -> dict:
    """Greedy answers to the held-out prompts at `weights`, scored by the preference model."""
    import ray

    cfg = ctx.config
    prompts = {p.uid: p for p in ctx.prompts["eval"]}
    ledger = Ledger.open(ctx.run_dir / "samples" / f"eval_{tag}.jsonl", list(prompts))
    greedy = RolloutSettings(SamplingParams(max_new_tokens=cfg.ppo.eval_max_new_tokens, temperature=0.0),
                             cfg.data.max_prompt_tokens)
    dispatch_prompts(ctx, "eval", ledger, prompts, "rollout", greedy, weights, desc=f"eval {tag}")
    records = ledger.records()
    scores = ray.get(ctx.learner.score.remote([r["prompt_ids"] for r in records],
                                              [r["response_ids"] for r in records]))
    return {"pm_reward_mean": float(np.mean(scores)), "pm_reward_std": float(np.std(scores)),
            "scores": {r["uid"]: s for r, s in zip(records, scores)}, "version": weights.version}


def run_ppo(ctx) -> None:
    import ray

    cfg, learner = ctx.config, ctx.learner
    setup = ray.get(learner.setup.remote("ppo"))
    done_iterations = int(setup.extras.get("iteration", 0))
    extras = dict(setup.extras)
    base = 1 if ctx.stages.done("sl") else 0
    ctx.metrics.truncate("ppo", done_iterations)
    rollouts_path = ctx.run_dir / "samples" / "rollouts.jsonl"
    truncate_records(rollouts_path, lambda r: r.get("iteration", 0) < done_iterations)

    version = base + done_iterations
    weights = label_weights(ctx) if done_iterations == 0 else ray.get(learner.publish.remote(version))
    if "eval_before" not in extras:
        extras["eval_before"] = evaluate(ctx, "before", weights)
        ctx.stages.update("ppo", pm_reward_before=extras["eval_before"]["pm_reward_mean"])

    guard = NonFiniteGuard(cfg.run.max_nonfinite_updates)
    prompts = ctx.prompts["ppo"]
    kind = "group" if cfg.ppo.grouped else "rollout"
    sampling = RolloutSettings(cfg.ppo.sampling(), cfg.data.max_prompt_tokens,
                               cfg.ppo.group.group_size if cfg.ppo.grouped else 1)
    bar = progress(cfg.ppo.iterations, "ppo", initial=done_iterations)
    try:
        for it in range(done_iterations, cfg.ppo.iterations):
            batch = iteration_prompts(prompts, it, cfg.ppo.batch_size)
            by_uid = {f"it{it}/{p.uid}": p for p in batch}
            ledger = Ledger.open(rollouts_path, list(by_uid), strict=False)
            stale_before, fetch_before = ctx.pool.stats.stale_dropped, ctx.pool.stats.sync_seconds
            t0 = time.perf_counter()
            tokens_before = ctx.pool.stats.generated_tokens
            dispatch_prompts(ctx, "ppo", ledger, by_uid, kind, sampling, weights,
                             make_record=lambda uid, r, it=it: {**r, "iteration": it, "prompt_uid": uid.split("/", 1)[1]},
                             desc=f"ppo rollouts {it + 1}")
            rollout_seconds = time.perf_counter() - t0
            records = {r["uid"]: r for r in read_records(rollouts_path) if r["uid"] in by_uid}
            rollouts = batch_rollouts(records, by_uid, cfg.ppo.grouped)
            metrics = ray.get(learner.train_step.remote(rollouts))
            t1 = time.perf_counter()
            version += 1
            weights = ray.get(learner.publish.remote(version))
            sync_seconds = time.perf_counter() - t1
            generated = ctx.pool.stats.generated_tokens - tokens_before
            logged = {k: metrics[k] for k in LOGGED if k in metrics}
            # Weight sync of this version: its size, the driver's wait for it (learner gather + put), the
            # learner's own share, and the workers' fetch of the version these rollouts used.
            logged.update(sync_bytes=weights.nbytes, sync_learner_seconds=weights.seconds,
                          sync_worker_seconds=ctx.pool.stats.sync_seconds - fetch_before)
            logged.update(rollout_seconds=rollout_seconds, sync_seconds=sync_seconds,
                          tokens_per_s=generated / max(rollout_seconds, 1e-9), version=version,
                          stale_dropped=ctx.pool.stats.stale_dropped - stale_before)
            ctx.metrics.write("ppo", it + 1, logged)
            bar.update(1)
            bar.set_postfix(reward=f"{logged['reward_mean']:.3f}", kl=f"{logged.get('kl', 0.0):.3f}")
            extras.update(iteration=it + 1, version=version, data_position=(it + 1) * cfg.ppo.batch_size)
            stop_if_diverged(ctx, guard, it + 1, metrics, extras)
            if (it + 1) % cfg.checkpoint.every_steps == 0 and it + 1 < cfg.ppo.iterations:
                ray.get(learner.save.remote(it + 1, extras))
            signals.check(f"after PPO iteration {it + 1}")
    except signals.StopRequested:  # SIGTERM/SIGINT here or while sampling: keep the iterations done, then stop
        if extras.get("iteration", 0) > done_iterations:
            ray.get(learner.save.remote(extras["iteration"], extras, True))
        raise
    finally:
        bar.close()
    extras["eval_after"] = evaluate(ctx, "after", weights)
    ray.get(learner.save.remote(cfg.ppo.iterations, extras, True))
    ray.get(learner.finish.remote())  # checkpoints/ppo-params: the RL policy alone
    # final_version: the RL policy's weight version, which its evaluation asks for (trainer.stages.evaluate)
    ctx.stages.update("ppo", algorithm=cfg.ppo.algorithm, pm_reward_before=extras["eval_before"]["pm_reward_mean"],
                      pm_reward_after=extras["eval_after"]["pm_reward_mean"], final_version=version,
                      stale_dropped=ctx.pool.stats.stale_dropped, worker_deaths=ctx.pool.stats.worker_deaths)
