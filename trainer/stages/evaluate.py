"""Evaluation inside `cairl train` (`eval:` of the run config): the base model before SL, the SL policy
after SL and the RL policy after PPO (or DPO), each on eval.suites, generated and scored on the rollout
workers (trainer/eval/workers.py) with the same suites as `cairl eval`.

Points (eval.train_models) run when their stage is done: `base` before the first stage, `sl` right
after SL (before label), `rl` after the RL stage (ppo, or dpo: trainer.config.rl_stage). Each point's
weights come from what the stage saved (checkpoints/<stage>-params), so a resumed run evaluates exactly
what the stage produced. Per point: run_dir/eval/points/<point>.json (per-item values: CIs and paired deltas are formed against it later),
<point>-samples.jsonl, a metrics.jsonl row (stage "eval", step 0/1/2), and stages.json["eval"]. When
all points are in, run_dir/eval/ holds eval-*.json, eval.md and eval.png: base | SL | RL, deltas vs base.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time

from trainer.durable import write_atomic
from trainer.weights import WeightHandle

log = logging.getLogger(__name__)

POINT_STEPS = {"base": 0, "sl": 1, "rl": 2}  # metrics.jsonl step of each point's "eval" row
POINT_STAGES = {"base": None, "sl": "sl", "rl": "ppo"}  # the stage whose end a point follows (rl: point_stage)
POINT_LABELS = {"base": "base", "sl": "SL", "rl": "RL"}


def points_dir(run_dir):
    return run_dir / "eval" / "points"


def point_stage(config, point: str) -> str | None:
    """The stage whose end `point` follows: None (base), sl, or the run's RL stage (ppo or dpo)."""
    from trainer.config import rl_stage

    return rl_stage(config.run.stages) if point == "rl" else POINT_STAGES[point]


def point_version(config, stages, point: str) -> int:
    """The weight version a point's policy had in the run, so that workers that already hold the policy
    (right after its stage) fetch nothing: 0 base, 1 after SL, and for `rl` the final version its stage
    recorded in `stages` (a StageRecord; ppo: one version per iteration, dpo: the one after SL's)."""
    if point == "base":
        return 0
    after_sl = 1 if "sl" in config.run.stages else 0
    if point == "sl":
        return after_sl
    stage = point_stage(config, point)
    recorded = stages.info(stage).get("final_version")
    if recorded is not None:
        return int(recorded)
    # A run dir from before stages recorded final_version: derived from the config, which is right unless
    # ppo.iterations changed after the stage finished.
    return after_sl + (1 if stage == "dpo" else config.ppo.iterations)


def due_points(ctx) -> list[str]:
    """Points configured, not yet evaluated, whose stage is done (base: always) — in a run that trains the
    policy (sl, ppo or dpo among run.stages): a run of label or rm alone has no policy to compare."""
    if not {"sl", "ppo", "dpo"} & set(ctx.config.run.stages):
        return []
    done = set(ctx.stages.info("eval").get("points", []))
    return [p for p in ctx.config.eval.train_models
            if p not in done and (point_stage(ctx.config, p) is None or ctx.stages.done(point_stage(ctx.config, p)))]


def _pool_model(ctx, point: str):
    import ray

    from trainer.eval.workers import PoolModel

    version, stage = point_version(ctx.config, ctx.stages, point), point_stage(ctx.config, point) or "base"

    def weights() -> WeightHandle:
        return ray.get(ctx.learner.publish_stage.remote(stage, version))

    return PoolModel(ctx, point, weights, ctx.config.eval.max_new_tokens)


def _judge(ctx, models: dict, point: str):
    """(Judge, JudgeInfo) on the workers' judge model, or (None, None) when no chosen suite asks one."""
    from trainer.eval.judge import build_judge
    from trainer.eval.local import feedback_config_of
    from trainer.eval.runner import JUDGED_SUITES
    from trainer.eval.workers import PoolScorer
    from trainer.preflight import check_model_source

    cfg = ctx.config
    if not any(s in JUDGED_SUITES for s in cfg.eval.suites):
        return None, None
    source = cfg.eval.judge or cfg.model.source
    tokenizer = ctx.tokenizer if source == cfg.model.source else check_model_source(source, "eval.judge")
    # Judge tasks go with the evaluated point's version, so the workers need not switch weights for them.
    scorer = PoolScorer(models[point], "judge", tokenizer)
    return build_judge(scorer, tokenizer, source, cfg.eval.judge_format, ctx.constitution,
                       feedback_config_of(cfg.label), self_judged=source == cfg.model.source)


def evaluate_point(ctx, point: str) -> None:
    """Evaluate one point (see the module docstring) and record it."""
    from trainer.eval.local import feedback_config_of
    from trainer.eval.results import result_from_json, result_to_json
    from trainer.eval.runner import evaluate
    from trainer.eval.suites import SuiteContext

    cfg = ctx.config
    start = time.perf_counter()
    models = {p: _pool_model(ctx, p) for p in ("base", point)}
    judge, judge_info = _judge(ctx, models, point)
    baseline = None
    if point != "base":  # the helpful win rate is against the base model's replies (read from its ledger)
        baseline = models["base"].under_test(f"{ctx.run_dir.name}:base", ctx.tokenizer)
    suite_ctx = SuiteContext(cfg.eval, ctx.constitution, feedback_config_of(cfg.label), judge=judge, baseline=baseline)
    under_test = models[point].under_test(f"{ctx.run_dir.name}:{point}", ctx.tokenizer)
    result, samples = evaluate(under_test, suite_ctx, judge_info)

    out = points_dir(ctx.run_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / f"{point}-samples.jsonl", "".join(json.dumps(s) + "\n" for s in samples))
    write_atomic(out / f"{point}.json", json.dumps(result_to_json(result)) + "\n")
    result = result_from_json(json.loads((out / f"{point}.json").read_text()))  # what later points compare with
    ctx.metrics.write("eval", POINT_STEPS[point], flat_values(result))
    seconds = time.perf_counter() - start
    info = ctx.stages.info("eval")
    ctx.stages.update("eval", points=[p for p in POINT_STEPS if p in {*info.get("points", []), point}],
                      seconds={**info.get("seconds", {}), point: round(seconds, 1)})
    log.info("eval %s: done in %.1f s", point, seconds)


def flat_values(result) -> dict[str, float]:
    """{'<suite>/<metric>': value}: one metrics.jsonl row per evaluated policy."""
    return {f"{suite}/{name}": sample.value for suite, metrics in result.suites.items() for name, sample in metrics.items()}


def run_due_evaluations(ctx) -> None:
    for point in due_points(ctx):
        evaluate_point(ctx, point)


def load_points(run_dir) -> dict:
    """point -> EvalResult of each evaluated point of a run, in base, sl, rl order."""
    from trainer.eval.results import result_from_json

    directory = points_dir(run_dir)
    return {p: result_from_json(json.loads((directory / f"{p}.json").read_text()))
            for p in POINT_STEPS if (directory / f"{p}.json").is_file()}


def write_comparison(run_dir) -> list:
    """run_dir/eval/: eval-*.json (each policy vs base), eval.md (base | SL | RL), eval.png, samples.jsonl."""
    from trainer.eval.report import write_outputs
    from trainer.ledger import read_records

    results = load_points(run_dir)
    if not results:
        return []
    samples = [s for p in results for s in read_records(points_dir(run_dir) / f"{p}-samples.jsonl")]
    baseline = results.pop("base", None)
    if baseline is not None and results:  # its notes say what it lacked as a baseline of nothing
        baseline = dataclasses.replace(baseline, notes=())
    evaluated = list(results.values()) or [baseline]
    return write_outputs(run_dir / "eval", evaluated, baseline if results else None, samples, 0)
