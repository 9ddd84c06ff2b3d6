"""Learner: the Ray actor that owns the trainable models; a dispatcher over one learner per stage.

The driver (trainer/stages/*.py) calls, for each stage:

    start = learner.setup(stage)          -> StageStart(step, extras); restores checkpoints/<stage> if any
    learner.set_data(data)                -> rows (SFT examples, preference pairs)
    learner.train_step(batch=None)        -> metrics (SFT/RM: the next rows of the data; PPO: rollouts)
    learner.evaluate() / learner.score(prompt_ids, response_ids)
    learner.save(step, extras, force)     learner.finish()  (hand the weights on to later stages)
    learner.publish(version)              -> WeightHandle of the current policy (object store)
    learner.publish_stage(stage, version) -> WeightHandle of the policy a finished stage saved (evaluation)
    learner.run(task)                     -> TaskResult (rollout.colocated: the rollout tasks run here)

What each call does is the current stage learner's business (trainer/learners/): this class holds
the context they share — mesh, tokenizer, and the weights finished stages leave on the devices —
and forwards. One learner per run on one host; a multi-host run has one per host (trainer/
learner_group.py), joined by jax.distributed into one JAX job over one global mesh, every one
receiving the same calls (SPMD). Checkpoints are saved by all of them together (Orbax); what goes
to the run directory or the object store otherwise (weights, the export) comes from process 0.

Colocated (`rollout.colocated`, one host): the rollout worker's code runs in this process on these
devices (trainer.rollout.RolloutWorker with trainer.weights.LiveWeights); `publish` then offers the
policy's device arrays under the version instead of gathering them to the host, and `run(task)` samples
with the arrays of the version the task names.
"""

from __future__ import annotations

from pathlib import Path


class Learner:
    """The actor body (wrap with `ray.remote`). `config` is a RunConfig, `run_dir` the run directory."""

    def __init__(self, config, run_dir: str, distributed=None):
        """`distributed` (trainer.distributed.DistributedConfig): this process's place in a learner group.

        A user problem found here (a mesh that does not fit the hosts, a host that never joined) is raised
        by the first call, `topology()`: an actor whose constructor raises dies with the error only in
        a message, and the driver could not tell it from a crash."""
        from models.errors import UserError

        self.init_error = None
        self.live = None  # rollout.colocated: the policy versions offered to the in-process worker (LiveWeights)
        self.worker = None  # rollout.colocated: the rollout worker running in this process
        try:
            self._start(config, run_dir, distributed)
        except UserError as err:
            self.init_error = err

    def _start(self, config, run_dir: str, distributed) -> None:
        from trainer.runtime import configure_jax

        if distributed is not None:
            from trainer.distributed import initialize

            initialize(distributed)  # before anything touches a device
        configure_jax()
        import jax

        from models.sources import load_checkpoint
        from trainer.learners.context import LearnerContext
        from trainer.mesh import build_mesh_rules, check_model

        mesh = config.model.mesh
        devices = jax.devices()
        if -1 not in (mesh.data, mesh.fsdp, mesh.tensor):
            if jax.process_count() > 1 and mesh.data * mesh.fsdp * mesh.tensor != len(devices):
                from trainer.mesh import MeshError

                # A mesh over some processes' devices only would leave the others with no part of any array.
                raise MeshError(
                    f"model.mesh data {mesh.data} × fsdp {mesh.fsdp} × tensor {mesh.tensor} = "
                    f"{mesh.data * mesh.fsdp * mesh.tensor} devices, but the {jax.process_count()} learner hosts have "
                    f"{len(devices)} ({jax.local_device_count()} each): a multi-host mesh must span them all "
                    f"(set one axis to -1 to take the rest)")
            devices = devices[: mesh.data * mesh.fsdp * mesh.tensor]
        rules = build_mesh_rules(mesh, devices)
        initial = load_checkpoint(config.model.source)  # its host weights are dropped at once: stages load their own
        model_config = initial.config.replace(dtype=config.model.dtype, attention=config.model.attention,
                                              remat=config.model.remat, scan_layers=config.model.scan_layers)
        check_model(rules, model_config)
        self.ctx = LearnerContext(config=config, run_dir=Path(run_dir), rules=rules, model_config=model_config,
                                  tokenizer=initial.tokenizer)
        self.current = None  # the stage learner of the stage being run
        if config.rollout.colocated:
            from trainer.rollout import RolloutWorker
            from trainer.weights import LiveWeights

            self.live = LiveWeights()
            self.worker = RolloutWorker(config, 0, live=self.live)

    def setup(self, stage: str):
        """Make `stage`'s learner and build (or restore) its state; the previous stage's is dropped first."""
        import gc

        from trainer.learners import STAGE_LEARNERS

        self.close()
        if self.live is not None:
            self.live.clear()  # versions offered for earlier tasks (evaluation's restored policies)
        gc.collect()  # free the previous stage's arrays before allocating this one's
        self.current = STAGE_LEARNERS[stage](self.ctx)
        return self.current.setup()

    def set_data(self, data) -> int:
        return self.current.set_data(data)

    def train_step(self, batch=None) -> dict:
        return self.current.train_step(batch)

    def evaluate(self, pairs=None) -> dict:
        """Held-out metrics, or metrics on `pairs` (PreferencePairs) for the pair stages."""
        return self.current.evaluate(pairs)

    def score(self, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> list[float]:
        return self.current.score(prompt_ids, response_ids)

    def save(self, step: int, extras: dict | None = None, force: bool = False) -> bool:
        return self.current.save(step, extras or {}, force)

    def finish(self) -> None:
        """The stage is done: its weights saved alone for resumes and kept on the devices for later stages."""
        self.current.finish()

    def publish(self, version: int):
        """The current policy's weights in the object store, as `version` (put once, by process 0; the
        others return None after taking part in gathering the weights). Colocated: offered in place, 0 bytes."""
        import time

        start = time.perf_counter()
        return self._hand_over(version, self._policy_params(), start)

    def publish_stage(self, stage: str, version: int):
        """The policy a finished stage saved (checkpoints/<stage>-params; `base`: the initial model) in the
        object store as `version`, whatever stage is current (evaluation of base, SL and RL policies); put
        once, by process 0, like `publish`."""
        import time

        start = time.perf_counter()
        if stage == "base":
            params = self.ctx.initial_params()
        else:
            config = self.ctx.config
            optimizer = {"sl": config.sl.optimizer, "ppo": config.ppo.policy_optimizer,
                         "dpo": config.dpo.optimizer}[stage]
            params = self.ctx.restore_params(stage, self.ctx.llama_factory(), optimizer)
        return self._hand_over(version, params, start)

    def _hand_over(self, version: int, params, start: float):
        """`params` (device arrays) to the sampler as `version`: offered in place when colocated (0 bytes),
        else gathered from every process (all must call) and put in the object store once, by process 0.
        The handle's seconds count from `start` (perf_counter), so they include reading the weights."""
        import time

        import jax

        from models.sources import host_params
        from trainer.distributed import gather_to_host
        from trainer.weights import publish

        if self.live is not None:
            return self.live.offer(version, params, time.perf_counter() - start)
        host = host_params(gather_to_host(params))
        return publish(version, host, time.perf_counter() - start) if jax.process_index() == 0 else None

    def run(self, task):
        """rollout.colocated: one rollout task (trainer.rollout.Task) on this process's devices, with the
        policy version the task names as `publish` / `publish_stage` offered it."""
        from trainer.learners.base import StageCallError

        if self.worker is None:
            raise StageCallError("learner.run(task) runs rollout tasks in the learner process, which only "
                                 "rollout.colocated: true does; this run samples on rollout workers")
        return self.worker.run(task)

    def export(self, out: str) -> str | None:
        """Write the current policy as a Hugging Face directory (process 0)."""
        import jax

        from models.export import export_params

        params = self._host_policy_params()
        if jax.process_index() != 0:
            return None
        config = self.ctx.model_config.replace(dtype="float32")
        return str(export_params(out, config, params, self.ctx.tokenizer))

    def topology(self) -> dict:
        """This process's place in the run: JAX processes, devices, mesh, host (trainer/topology.py)."""
        from trainer.topology import describe

        if self.init_error is not None:
            raise self.init_error
        return describe(self.ctx.rules)

    def _host_policy_params(self):
        """The policy's parameters as host arrays, by path (gathered from every process: all must call)."""
        from models.sources import host_params
        from trainer.distributed import gather_to_host

        return host_params(gather_to_host(self._policy_params()))

    def _policy_params(self):
        return self.current.policy_params() if self.current is not None else self.ctx.policy_params()

    def close(self) -> None:
        if self.current is not None:
            self.current.close()
            self.current = None
