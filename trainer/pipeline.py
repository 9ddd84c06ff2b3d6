"""The `cairl train` driver: validate everything, start Ray, run sl → label → rm → ppo, report, export.

    run_dir = train(load_run_config("configs/demo.yaml"))

The driver owns the run: it validates the config, constitution, prompt files and model source
before Ray or any JAX backend starts; writes <run>/config.yaml (secrets redacted); starts a local
Ray cluster on 127.0.0.1 (or joins one); creates one Learner and N RolloutWorkers; and runs each
selected stage not yet recorded done in <run>/stages.json (trainer/stages/*.py). A rerun of the
same run directory resumes: finished stages are skipped, an interrupted stage continues from its
ledger (completed prompt uids) and its newest checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import time
from pathlib import Path

from models.errors import UserError
from trainer import configlib
from trainer.config import RunConfig, redacted, to_yaml
from trainer.pipeline_state import StageRecord

log = logging.getLogger(__name__)


class RunDirError(UserError, ValueError):
    """A run directory that cannot be resumed with this config."""


@dataclasses.dataclass
class Validated:
    """What validation read, so the run does not read it twice."""

    constitution: object
    constitution_hash: str


def validate(config: RunConfig) -> Validated:
    """Check every input file without starting Ray or a JAX backend: constitution, prompt files, model."""
    from models import fetch
    from trainer.constitution import load_constitution
    from trainer.data.load import DEFAULT_SETS
    from trainer.data.records import PromptFileError, read_prompt_file

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
    source = config.model.source
    for name in (source, config.model.feedback_source):
        if name and name not in fetch.EMBEDDED and not Path(name).expanduser().exists():
            raise UserError(f"model.source {name!r}: no such file or directory, and not a registry name "
                            f"({', '.join(sorted(fetch.EMBEDDED))})")
    return Validated(constitution=constitution, constitution_hash=constitution.hash)


def prepare_run_dir(config: RunConfig, resume: bool) -> Path:
    """Create or reopen the run directory; a reopened one must have been made by the same config
    apart from run.stages and the stage lengths (which may grow on resume)."""
    run_dir = config.run_dir
    saved = run_dir / "config.yaml"
    if saved.exists():
        previous = _saved_config(saved)
        current = redacted(configlib.to_dict(config))
        for section in ("model", "constitution", "data"):
            if _normalise(previous.get(section)) != _normalise(current.get(section)):
                raise RunDirError(
                    f"{run_dir} was started with a different '{section}' section (see {saved}); resume it with "
                    f"the same config, or choose another run.name")
        log.info("resuming %s", run_dir)
    elif resume:
        raise RunDirError(f"--resume {run_dir}: no config.yaml there; it is not a cairl run directory")
    for sub in ("checkpoints", "samples", "plots"):
        (run_dir / sub).mkdir(parents=True, exist_ok=True)
    saved.write_text(to_yaml(config), encoding="utf-8")
    return run_dir


def _saved_config(path: Path) -> dict:
    """A run's saved config with today's defaults filled in, so that a key added to cairl since the run
    started (at its default) does not read as a change; the raw file if it no longer parses."""
    from trainer.config import load_run_config

    try:
        return redacted(configlib.to_dict(load_run_config(path)))
    except UserError:
        return configlib.read_yaml(path)[0]


def _normalise(value):
    import json

    return json.loads(json.dumps(value, default=str))


def start_ray(config: RunConfig):
    """A local Ray cluster on 127.0.0.1 without dashboard (token auth left on), or join `ray.address`."""
    if not config.ray.address and config.ray.host in ("127.0.0.1", "localhost"):
        # Ray otherwise swaps a loopback _node_ip_address for the machine's routable address; with
        # clustering off it keeps every service on the loopback interface. Read when ray is imported.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():
        return ray
    if config.ray.address:
        ray.init(address=config.ray.address, log_to_driver=True)
        return ray
    temp_dir = config.ray.temp_dir or tempfile.mkdtemp(prefix="cairl-ray-", dir="/tmp")
    ray.init(address=None, _node_ip_address=config.ray.host, include_dashboard=config.ray.dashboard,
             _temp_dir=temp_dir, num_cpus=config.ray.num_cpus, log_to_driver=True,
             # XLA's many threads each get a glibc malloc arena by default; freed arrays then stay in the
             # process (RSS grew past 12 GB in PPO). Two arenas keep the learner near its live size.
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "MALLOC_ARENA_MAX": "2"}})
    return ray


@dataclasses.dataclass
class Context:
    """Everything a stage function needs."""

    config: RunConfig
    run_dir: Path
    constitution: object
    constitution_hash: str
    learner: object  # Ray actor handle
    pool: object  # dispatch.WorkerPool
    metrics: object  # metrics.MetricsLog
    stages: StageRecord
    prompts: dict  # name -> list[Prompt]


def _interleave(sets: list[list]) -> list:
    out, i = [], 0
    while any(i < len(s) for s in sets):
        out.extend(s[i] for s in sets if i < len(s))
        i += 1
    return out


def load_prompts(config: RunConfig) -> dict:
    """Train prompts split into disjoint sl / label / ppo slices (wrapping when there are too few) and eval."""
    from trainer.data.load import load_prompt_set

    data_dir = config.data.data_dir or str(Path(os.environ.get("CAIRL_CACHE") or Path.home() / ".cache" / "cairl")
                                           / "tfds")
    train = _interleave([load_prompt_set(spec, data_dir) for spec in config.data.prompts])
    held = _interleave([load_prompt_set(spec, data_dir) for spec in config.data.eval_prompts])
    train_uids = {p.uid for p in train}
    held = [p for p in held if p.uid not in train_uids][: config.data.eval_count]
    counts = {"sl": config.data.sl_prompts, "label": config.data.label_prompts, "ppo": config.data.ppo_prompts}
    out, offset = {}, 0
    for name, n in counts.items():
        out[name] = [train[(offset + i) % len(train)] for i in range(min(n, len(train)))]
        offset += n
    out["eval"] = held
    return out


def _create_actors(config: RunConfig, run_dir: Path, worker_cls):
    import ray

    from trainer.dispatch import WorkerPool
    from trainer.learner import Learner
    from trainer.rollout import worker_options

    learner = ray.remote(Learner).options(num_cpus=config.ray.learner_num_cpus, max_restarts=0).remote(
        config, str(run_dir.absolute()))
    remote_worker = ray.remote(worker_cls)
    handles = [remote_worker.options(**worker_options(config)).remote(config, i)
               for i in range(config.rollout.num_workers)]
    pool = WorkerPool(handles, [f"worker-{i}" for i in range(len(handles))], config.rollout.task_timeout_s,
                      config.rollout.max_staleness, config.rollout.max_restarts)
    return learner, pool


def train(config: RunConfig, resume: bool = False, worker_cls=None) -> Path:
    """Run the selected stages of `config` (resuming its run directory if it exists); returns the run dir."""
    validated = validate(config)
    if config.run.preflight:  # compile the learner's programs for this host first; refuses what will not fit
        from trainer.plan.preflight import preflight
        preflight(config)
    run_dir = prepare_run_dir(config, resume)
    from trainer import stages as stage_fns
    from trainer.metrics import MetricsLog
    from trainer.rollout import RolloutWorker

    prompts = load_prompts(config)
    ray = start_ray(config)
    learner, pool = _create_actors(config, run_dir, worker_cls or RolloutWorker)
    ctx = Context(config=config, run_dir=run_dir, constitution=validated.constitution,
                  constitution_hash=validated.constitution_hash, learner=learner, pool=pool,
                  metrics=MetricsLog(run_dir), stages=StageRecord(run_dir), prompts=prompts)
    try:
        for stage in config.run.stages:
            if ctx.stages.done(stage):
                log.info("stage %s: done already, skipped", stage)
                continue
            start = time.perf_counter()
            getattr(stage_fns, f"run_{stage}")(ctx)
            seconds = time.perf_counter() - start
            seconds += ctx.stages.info(stage).get("seconds_before_resume", 0.0)
            ctx.stages.update(stage, done=True, seconds=round(seconds, 1))
            log.info("stage %s: done in %.1f s", stage, seconds)
        if config.run.export and "ppo" in config.run.stages and ctx.stages.done("ppo"):
            ray.get(learner.export.remote(str(run_dir / "hf")))
        from trainer.report import write_report

        write_report(run_dir)
    finally:
        ray.get(learner.close.remote())
        ctx.metrics.close()
        ray.shutdown()
    return run_dir
