"""The `cairl train` driver: validate everything, start Ray, run sl → label → rm → ppo, report, export.

    run_dir = train(load_run_config("configs/demo.yaml"))

The driver owns the run: it validates the config, constitution, prompt files and model source
before Ray or any JAX backend starts; writes <run>/config.yaml (secrets redacted); starts a local
Ray cluster on 127.0.0.1 (or joins one); creates one Learner and N RolloutWorkers (none with
rollout.colocated: the learner process samples); and runs each selected stage not yet recorded
done in <run>/stages.json (trainer/stages/*.py). A rerun of the same run directory resumes:
finished stages are skipped, an interrupted stage continues from its ledger (completed prompt
uids) and its newest checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

from models.errors import UserError
from trainer import configlib, topology
from trainer.config import RunConfig, redacted, rl_stage, to_yaml
from trainer.durable import write_atomic
from trainer.pipeline_state import StageRecord
from trainer.run_lock import RunLock
from trainer.topology import RUN_FILE

log = logging.getLogger(__name__)


class RunDirError(UserError, ValueError):
    """A run directory that cannot be resumed with this config."""


@dataclasses.dataclass
class Validated:
    """What validation read, so the run does not read it twice."""

    constitution: object
    constitution_hash: str
    tokenizer: object  # the policy's, for the prompt-length rule


def validate(config: RunConfig) -> Validated:
    """Check every input file without starting Ray or a JAX backend: constitution, prompt files, model
    sources (opened: config, tokenizer, tensor headers)."""
    from trainer.constitution import load_constitution
    from trainer.data.load import DEFAULT_SETS
    from trainer.data.records import PromptFileError, read_prompt_file
    from trainer.preflight import check_model_source

    constitution = load_constitution(config.constitution)
    if not constitution.critique_principles and "sl" in config.run.stages:
        raise UserError(f"constitution {config.constitution}: no principle has a critique and revision request; "
                        f"the sl stage needs at least one")
    if not constitution.comparison_principles and "label" in config.run.stages:
        raise UserError(f"constitution {config.constitution}: no principle has a comparison question; the label "
                        f"stage needs at least one")
    for spec in (*config.data.prompts, *config.data.eval_prompts):
        if spec.startswith("default:"):
            if spec.split(":", 1)[1] not in DEFAULT_SETS:
                raise PromptFileError(f"data: no shipped prompt set {spec!r}; expected one of "
                                      f"{', '.join('default:' + n for n in DEFAULT_SETS)}")
        elif spec.endswith((".jsonl", ".jsonl.gz")) or Path(spec).exists():
            read_prompt_file(spec)  # raises with the file and line of the first bad record
    if config.ray.address:
        from trainer.ray_auth import require_join_token

        require_join_token(config.ray.address)
    tokenizer = check_model_source(config.model.source, "model.source")
    if config.model.feedback_source:
        check_model_source(config.model.feedback_source, "model.feedback_source")
    if config.eval.train_models:
        from trainer.eval.data import check_inputs

        check_inputs(config.eval)  # prompt files and data directories of the chosen suites
        if config.eval.judge:
            check_model_source(config.eval.judge, "eval.judge")
    return Validated(constitution=constitution, constitution_hash=constitution.hash, tokenizer=tokenizer)


# Settings a resumed run may change: which stages run, the stage lengths, and how the run executes (cluster,
# workers, timeouts, checkpoint cadence, where files live, the learner mesh: checkpoints restore onto
# another mesh). Any other change would mix two experiments in one run directory. A key ending in "." is a
# whole section.
RESUMABLE_CHANGES = ("run.stages", "run.export", "run.name", "run.runs_dir", "sl.sft_steps", "rm.steps", "dpo.steps",
                     "ppo.iterations", "rollout.colocated", "rollout.num_workers", "rollout.task_timeout_s",
                     "rollout.max_restarts", "rollout.num_cpus", "rollout.resources.", "rollout.memory_fraction",
                     "data.data_dir", "model.mesh.", "learner.", "ray.", "checkpoint.", "eval.train_models")
# run.json: what else a resume must match (the constitution's content hash), and the topology (trainer/topology.py)


def prepare_run_dir(config: RunConfig, resume: bool, constitution_hash: str = "") -> Path:
    """Create or reopen the run directory; a reopened one must have been made by the same resolved config
    (apart from RESUMABLE_CHANGES) and the same constitution text."""
    run_dir = config.run_dir
    saved = run_dir / "config.yaml"
    if saved.exists():
        changed = config_changes(_saved_config(saved), redacted(configlib.to_dict(config)))
        if changed:
            raise RunDirError(
                f"{run_dir} was started with other settings (see {saved}): {'; '.join(changed)}. Only "
                f"{', '.join(k + ('*' if k.endswith('.') else '') for k in RESUMABLE_CHANGES)} may change on resume; "
                f"resume with the saved settings (cairl train --resume {run_dir}), or choose another run.name")
        _check_constitution(run_dir, constitution_hash)
        log.info("resuming %s", run_dir)
    elif resume:
        raise _not_a_run_dir(run_dir)
    for sub in ("checkpoints", "samples", "plots"):
        (run_dir / sub).mkdir(parents=True, exist_ok=True)
    write_atomic(saved, to_yaml(config))
    if constitution_hash:
        write_atomic(run_dir / RUN_FILE, json.dumps({"constitution_hash": constitution_hash}) + "\n")
    return run_dir


def _not_a_run_dir(run_dir: Path) -> RunDirError:
    return RunDirError(f"--resume {run_dir}: no config.yaml there; it is not a cairl run directory")


def config_changes(previous: dict, current: dict) -> list[str]:
    """'key: old → new' for every resolved setting that differs and may not change on resume."""
    old, new = _flatten(_normalise(previous)), _flatten(_normalise(current))
    out = []
    for key in sorted(old.keys() | new.keys()):
        if old.get(key) != new.get(key) and not any(
                key == k or (k.endswith(".") and key.startswith(k)) for k in RESUMABLE_CHANGES):
            out.append(f"{key}: {old.get(key, '(absent)')!r} → {new.get(key, '(absent)')!r}")
    return out


def _flatten(tree, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree}
    out = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}{key}."))
    return out


def _saved_config(path: Path) -> dict:
    """A run's saved config with today's defaults filled in, so that a key added to cairl since the run
    started (at its default) does not read as a change; the raw file if it no longer parses."""
    from trainer.config import load_run_config

    try:
        return redacted(configlib.to_dict(load_run_config(path)))
    except UserError:
        return configlib.read_yaml(path)[0]


def _normalise(value):
    return json.loads(json.dumps(value, default=str))


def _check_constitution(run_dir: Path, constitution_hash: str) -> None:
    path = run_dir / RUN_FILE
    if not constitution_hash or not path.is_file():
        return
    before = json.loads(path.read_text(encoding="utf-8")).get("constitution_hash")
    if before and before != constitution_hash:
        raise RunDirError(
            f"{run_dir} was started with another constitution text (hash {before[:12]}…, now "
            f"{constitution_hash[:12]}…): "
            f"its samples and labels were made with the old principles. Restore the constitution file, or choose "
            f"another run.name")


def start_ray(config: RunConfig):
    """A local Ray cluster on 127.0.0.1 without dashboard, authenticated by a private per-run token, or join
    `ray.address` (token required)."""
    from trainer.ray_auth import private_token, require_join_token

    loopback = ("127.0.0.1", "localhost")
    if (config.ray.address or "").rsplit(":", 1)[0] in loopback or (not config.ray.address and config.ray.host in loopback):
        # Ray otherwise swaps a loopback _node_ip_address for the machine's routable address; with
        # clustering off it keeps every service on the loopback interface. Read when ray is imported.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        return sys.modules["ray"]
    # Before ray is imported: Ray reads its auth settings from the environment once per process.
    if config.ray.address:
        require_join_token(config.ray.address)
    else:
        private_token()
    import ray

    if config.ray.address:
        ray.init(address=config.ray.address, log_to_driver=True)
        return ray
    temp_dir = config.ray.temp_dir or tempfile.mkdtemp(prefix="cairl-ray-", dir="/tmp")
    try:
        ray.init(address=None, _node_ip_address=config.ray.host, include_dashboard=config.ray.dashboard,
                 _temp_dir=temp_dir, num_cpus=config.ray.num_cpus, log_to_driver=True,
                 # XLA's many threads each get a glibc malloc arena by default; freed arrays then stay in the
                 # process (RSS grew past 12 GB in PPO). Two arenas keep the learner near its live size.
                 runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "MALLOC_ARENA_MAX": "2"}})
    except Exception as err:  # Ray raises a bare Exception for a raylet that did not register
        explained = ray_start_error(err, temp_dir)
        if explained is None:
            raise
        raise explained from err
    return ray


class RayStartError(UserError, RuntimeError):
    """The local Ray cluster did not come up: said in one paragraph, not a traceback."""


def ray_start_error(err: Exception, temp_dir: str) -> RayStartError | None:
    """What `cairl train` stops with when ray.init of its local cluster raised `err`: a RayStartError when the
    raylet missed Ray's start-up deadline (a busy machine, not a fault of the run), else None (raise `err`).
    Not retried here: the half-started node's processes belong to no Ray handle this process could stop."""
    if "timed out during startup" not in str(err):
        return None
    return RayStartError(
        f"the local Ray cluster did not start: its raylet did not register within Ray's fixed 30 s ({err}). "
        f"This happens on a machine busy with other work; run the same command again (with --resume if the run "
        f"directory exists) when it is quieter. Ray's logs: {temp_dir}/session_latest/logs (raylet.err, gcs_server.err)")


@dataclasses.dataclass
class Context:
    """Everything a stage function needs."""

    config: RunConfig
    run_dir: Path
    constitution: object
    constitution_hash: str
    learner: object  # the learner actor, called as its handle (health.LearnerWatch: every call timed)
    pool: object  # dispatch.WorkerPool
    metrics: object  # metrics.MetricsLog
    stages: StageRecord
    prompts: dict  # name -> list[Prompt]
    tokenizer: object = None  # the policy's tokenizer (renders chats for evaluation's scoring questions)


def _interleave(sets: list[list], cycle: bool = False) -> list:
    """One item of each set in turn; a used-up set drops out, or with `cycle` starts again until the
    longest set is used up."""
    sets = [s for s in sets if s]
    out, longest = [], max((len(s) for s in sets), default=0)
    for i in range(longest):
        out.extend(s[i % len(s)] for s in sets if cycle or i < len(s))
    return out


def load_prompts(config: RunConfig, tokenizer=None) -> dict:
    """Train prompts split into disjoint sl / label / ppo slices (wrapping when there are too few) and eval,
    each fitted to data.max_prompt_tokens by the data.long_prompts rule when `tokenizer` is given."""
    from models.fetch import cache_root
    from trainer.data.load import load_prompt_set
    from trainer.preflight import fit_prompts

    data_dir = config.data.data_dir or str(cache_root() / "tfds")

    def load(specs, cycle=False, used=frozenset()):
        prompts = _interleave([_fresh_first(load_prompt_set(spec, data_dir), used) for spec in specs], cycle)
        if tokenizer is None:
            return prompts
        return fit_prompts(prompts, tokenizer, config.data.max_prompt_tokens, config.data.long_prompts)

    train, held = load(config.data.prompts, config.data.cycle_sets), load(config.data.eval_prompts)
    counts = {"sl": config.data.sl_prompts, "label": config.data.label_prompts, "ppo": config.data.ppo_prompts}
    out, offset = {}, 0
    for name, n in counts.items():
        out[name] = _wrapped_slice(train, offset, n)
        offset += n
    train_uids = {p.uid for p in train}
    if config.data.ppo_sets:
        used = {p.uid for name in ("sl", "label") for p in out[name]}
        rl = load(config.data.ppo_sets, config.data.cycle_sets, used)
        out["ppo"] = _wrapped_slice(rl, 0, config.data.ppo_prompts)
        train_uids |= {p.uid for p in rl}
    out["eval"] = [p for p in held if p.uid not in train_uids][: config.data.eval_count]
    return out


def _wrapped_slice(items: list, offset: int, n: int) -> list:
    """`n` items from `offset` on, wrapping round; never more than there are."""
    return [items[(offset + i) % len(items)] for i in range(min(n, len(items)))]


def _fresh_first(prompts: list, used_uids: set) -> list:
    """The prompts whose uid is not in `used_uids`, then the others, each in their order."""
    return [p for p in prompts if p.uid not in used_uids] + [p for p in prompts if p.uid in used_uids]


def _create_actors(config: RunConfig, run_dir: Path, worker_cls):
    """The learner actor(s) and the rollout worker actors (none with rollout.colocated)."""
    import ray

    from trainer.learner_group import start_learners
    from trainer.rollout import worker_options

    learners = start_learners(config, run_dir)
    remote_worker = ray.remote(worker_cls)
    workers = [remote_worker.options(**worker_options(config)).remote(config, i)
               for i in range(config.rollout.num_workers)]
    return learners, workers


def _worker_pool(config: RunConfig, workers: list, watch):
    """The pool the stages dispatch to: the worker actors, or with rollout.colocated the learner itself
    (through its watch: timed by ray.learner_timeout_s, and its death stops the run as a LearnerError)."""
    from trainer.dispatch import WorkerPool

    rollout = config.rollout
    if rollout.colocated:
        return WorkerPool([watch], ["learner"], float("inf"), rollout.max_staleness, 0, deaths_fatal=True)
    return WorkerPool(workers, [f"worker-{i}" for i in range(len(workers))], rollout.task_timeout_s,
                      rollout.max_staleness, rollout.max_restarts)


def train(config: RunConfig, resume: bool = False, worker_cls=None) -> Path:
    """Run the selected stages of `config` (resuming its run directory if it exists); returns the run dir.

    SIGTERM / SIGINT stop it at the next safe point with the current stage saved (trainer/signals.py):
    StopRequested is raised after Ray is shut down. A learner that dies or hangs stops it with a LearnerError
    (trainer/health.py).
    """
    validated = validate(config)
    prompts = load_prompts(config, validated.tokenizer)  # every prompt set read and fitted before anything is written
    if resume and not (config.run_dir / "config.yaml").exists():
        raise _not_a_run_dir(config.run_dir)
    lock = RunLock.acquire(config.run_dir)  # before anything is written: a second driver refuses here
    try:
        if config.run.preflight and config.learner.hosts == 1:
            # Compile the learner's programs for this host first; refuses what will not fit.
            from trainer.plan.preflight import preflight
            preflight(config)
        elif config.run.preflight:
            log.info("preflight skipped: it plans on this host's devices, and the %d learner hosts are others "
                     "(cairl plan --target <slice> plans them)", config.learner.hosts)
        run_dir = prepare_run_dir(config, resume, validated.constitution_hash)
        return _run(config, run_dir, validated, prompts, worker_cls)
    finally:
        lock.release()


def _run(config: RunConfig, run_dir: Path, validated: Validated, prompts: dict, worker_cls) -> Path:
    from trainer import signals
    from trainer import stages as stage_fns
    from trainer.health import LearnerWatch
    from trainer.metrics import MetricsLog
    from trainer.rollout import RolloutWorker
    from trainer.stages.evaluate import run_due_evaluations, write_comparison

    ray = start_ray(config)
    try:
        learners, workers = _create_actors(config, run_dir, worker_cls or RolloutWorker)
    except BaseException:
        ray.shutdown()
        raise
    signals.install()  # after ray.init, whose C++ logging installs its own fatal-signal handler for SIGTERM
    watch = LearnerWatch(learners, config.ray.learner_timeout_s)
    pool = _worker_pool(config, workers, watch)
    ctx = Context(config=config, run_dir=run_dir, constitution=validated.constitution,
                  constitution_hash=validated.constitution_hash, learner=watch, pool=pool,
                  metrics=MetricsLog(run_dir), stages=StageRecord(run_dir), prompts=prompts,
                  tokenizer=validated.tokenizer)
    try:
        per_learner = ray.get(watch.each("topology"))  # the first call: it waits for every learner to start
        topology.record(run_dir, topology.merge(per_learner), ctx.metrics)
        for stage in config.run.stages:
            run_due_evaluations(ctx)  # the base model before the first stage; SL's policy before label
            if ctx.stages.done(stage):
                log.info("stage %s: done already, skipped", stage)
                continue
            signals.check(f"before the {stage} stage")
            start = time.perf_counter()
            getattr(stage_fns, f"run_{stage}")(ctx)
            seconds = time.perf_counter() - start
            seconds += ctx.stages.info(stage).get("seconds_before_resume", 0.0)
            ctx.stages.update(stage, done=True, seconds=round(seconds, 1))
            log.info("stage %s: done in %.1f s", stage, seconds)
        run_due_evaluations(ctx)  # the RL policy
        write_comparison(run_dir)
        final = rl_stage(config.run.stages)  # the run's RL policy: PPO's or DPO's
        if config.run.export and final in config.run.stages and ctx.stages.done(final):
            ray.get(watch.export.remote(str(run_dir / "hf")))
        from trainer.report import write_report

        write_report(run_dir)
    except Exception as err:  # noqa: BLE001 - a learner failure is explained; anything else passes unchanged
        explained = watch.explain_failure(err)
        if explained is err:
            raise
        raise explained from None
    finally:
        _shut_down(ray, watch, ctx.metrics, config.ray.learner_timeout_s)
        signals.uninstall()
    return run_dir


def _shut_down(ray, watch, metrics, timeout_s: float) -> None:
    """Let the learner finish its pending checkpoint writes, close the run files, stop Ray — whatever state
    the learner is in (a dead one must not keep Ray running or hide the error that stopped the run)."""
    try:
        if watch.timed_out is None and watch.peer_failed is None:
            ray.get([h.close.remote() for h in watch.handles], timeout=timeout_s)
    except Exception as err:  # noqa: BLE001 - reported, never raised over the run's own outcome
        log.warning("the learner did not close cleanly (%s: %s)", type(err).__name__, str(err).splitlines()[0][:300])
    watch.stop_watching()
    metrics.close()
    ray.shutdown()
