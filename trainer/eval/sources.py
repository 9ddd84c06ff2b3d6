"""Models an evaluation names: any `models.sources` source, or one stage of a cairl run directory.

    RUN_DIR:sl     the policy after SL-CAI        (checkpoints/sl-params, a Llama)
    RUN_DIR:rl     the policy after PPO or DPO     (checkpoints/ppo-params or dpo-params, as the run's
                                                    stages say; `RUN_DIR:ppo`, `RUN_DIR:dpo` also work)
    RUN_DIR:rm     the preference model            (checkpoints/rm-params, a ScalarModel)
    RUN_DIR:base   the run's initial model         (its config's model.source)
A run directory without a stage means its `hf/` export (the final policy), as everywhere in cairl.
Stage parameters are read from the Orbax directory the stage leaves (parameters only), onto one
device; the architecture and tokenizer come from the run's `model.source`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from models.sources import ModelSourceError

STAGE_ALIASES = {"sl": "sl", "rl": "rl", "ppo": "ppo", "dpo": "dpo", "rm": "rm", "base": "base"}
POLICY_STAGES = ("base", "sl", "ppo", "dpo")


@dataclasses.dataclass(frozen=True)
class RunStage:
    run_dir: Path
    stage: str  # base | sl | ppo | dpo | rm


def parse_run_stage(source: str) -> RunStage | None:
    """RunStage for 'RUN_DIR:STAGE' when RUN_DIR is a cairl run directory; None for any other source."""
    path, sep, stage = source.rpartition(":")
    if not sep or not path or not (Path(path).expanduser() / "config.yaml").is_file():
        return None
    if stage not in STAGE_ALIASES:
        raise ModelSourceError(f"model {source!r}: unknown stage {stage!r} of run {path}; expected one of "
                               f"{', '.join(sorted(STAGE_ALIASES))}")
    run_dir = Path(path).expanduser()
    stage = STAGE_ALIASES[stage]
    if stage == "rl":  # the run's RL stage: PPO's policy, or DPO's in a run that took that route
        from trainer.config import rl_stage

        stage = rl_stage(run_config(run_dir).run.stages)
    return RunStage(run_dir, stage)


def run_config(run_dir: Path):
    """A run directory's resolved config (config.yaml)."""
    from trainer.config import load_run_config

    return load_run_config(run_dir / "config.yaml")


def _restore_stage_params(run_dir: Path, stage: str, factory) -> dict:
    """Flat host params of `factory()`'s module restored from checkpoints/<stage>-params (newest step)."""
    import jax
    from flax import nnx

    from trainer.checkpoint import Checkpointer, CheckpointConfig
    from trainer.state import with_shardings

    directory = run_dir / "checkpoints" / f"{stage}-params"
    if not directory.is_dir():
        raise ModelSourceError(f"{directory} does not exist: run {run_dir} has not finished its {stage} stage")
    abstract = jax.eval_shape(lambda: nnx.split(factory(), nnx.Param, ...)[1])
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = with_shardings(abstract, jax.tree.map(lambda _: device, abstract))
    ckpt = Checkpointer(directory, CheckpointConfig(every_steps=1, keep=1, async_save=False))
    try:
        step = ckpt.latest_step()
        if step is None:
            raise ModelSourceError(f"{directory} holds no checkpoint: run {run_dir} has not finished its {stage} stage")
        state, _ = ckpt.restore(abstract, step=step)  # an explicit step: a read never moves run files aside
    finally:
        ckpt.close()
    return {tuple(p): np.asarray(jax.device_get(v[...])) for p, v in nnx.to_flat_state(state)}


def load_policy(source: str, dtype: str = "float32"):
    """A `trainer.policy.Policy` for `source` (see the module docstring)."""
    from flax import nnx

    from models.llama import Llama
    from models.sources import build_llama, load_checkpoint
    from trainer.policy import Policy

    run_stage = parse_run_stage(source)
    if run_stage is None:
        return Policy.load(source, dtype)
    if run_stage.stage not in POLICY_STAGES:
        raise ModelSourceError(f"model {source!r}: stage {run_stage.stage!r} is a preference model, not a policy; "
                               f"name a policy stage ({', '.join(POLICY_STAGES)})")
    initial = load_checkpoint(run_config(run_stage.run_dir).model.source)
    config = initial.config.replace(dtype=dtype)
    if run_stage.stage == "base":
        params = initial.params
    else:
        params = _restore_stage_params(run_stage.run_dir, run_stage.stage, lambda: Llama(config, nnx.Rngs(0)))
    return Policy(build_llama(config, params, source=source), initial.tokenizer, config)


class PreferenceModel:
    """r(prompt, reply) from a trained ScalarModel, tokenised as the rm stage tokenises its pairs:
    the chat-rendered prompt, the reply's tokens, then EOS; scored at the last real token."""

    def __init__(self, model, tokenizer, source: str, batch_size: int = 8):
        import jax

        from trainer.steps import sequence_scores

        self.source = source
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self._model = model
        self._scores = jax.jit(lambda m, t, k: sequence_scores(m, t, k))

    def score(self, prompts: list[str], replies: list[str]) -> np.ndarray:
        """[n] preference scores (higher = preferred)."""
        from trainer.prompts import prompt_messages

        rows = [self.tokenizer.encode_chat(prompt_messages(p)) + self.tokenizer.encode(r) + [self.tokenizer.eos_id]
                for p, r in zip(prompts, replies)]
        out = np.zeros((len(rows),), np.float64)
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start:start + self.batch_size]
            length = -(-max(len(r) for r in chunk) // 64) * 64  # few compiled shapes
            tokens = np.full((self.batch_size, length), self.tokenizer.pad_id, np.int32)
            mask = np.zeros((self.batch_size, length), np.bool_)
            mask[:, 0] = True  # batch-padding rows: one dummy token
            for i, ids in enumerate(chunk):
                tokens[i, :len(ids)], mask[i, :len(ids)] = ids, True
            out[start:start + len(chunk)] = np.asarray(self._scores(self._model, tokens, mask))[:len(chunk)]
        return out


def load_preference_model(source: str) -> PreferenceModel:
    """The preference model of a run: 'RUN_DIR:rm' or 'RUN_DIR' (its rm stage)."""
    from flax import nnx

    from models.llama import ScalarModel
    from models.sources import build_module, load_checkpoint

    run_stage = parse_run_stage(source)
    if run_stage is None and (Path(source).expanduser() / "config.yaml").is_file():
        run_stage = RunStage(Path(source).expanduser(), "rm")
    if run_stage is None or run_stage.stage != "rm":
        raise ModelSourceError(f"preference model {source!r}: expected a run directory's rm stage, e.g. runs/demo:rm")
    initial = load_checkpoint(run_config(run_stage.run_dir).model.source)
    factory = lambda: ScalarModel(initial.config, nnx.Rngs(0))  # noqa: E731
    params = _restore_stage_params(run_stage.run_dir, "rm", factory)
    return PreferenceModel(build_module(factory, params, source=source), initial.tokenizer, source)



def underlying_source(source: str) -> str:
    """The model source a name stands for: a run's base stage is its config's model.source."""
    run_stage = parse_run_stage(source)
    if run_stage is not None and run_stage.stage == "base":
        return run_config(run_stage.run_dir).model.source
    return source
