"""What every stage learner shares: mesh, model config, tokenizer, checkpoints, and the weights stages hand on.

Weights move from one stage to the next on the devices, in their sharded layout: a stage that ends
puts its trained parameters in `handoff` (the SL policy as "policy", the preference model as
"reward_model") and the next stage builds its states from them. Only a new process (a resumed run)
reads them back, from checkpoints/<stage>-params, restored directly sharded. The initial model is
the one thing read from disk into host memory, once per stage that needs it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from models import lora as loralib
from models.config import ModelConfig
from models.sharding import MeshRules, state_shardings
from models.tokenizer import Tokenizer
from trainer.checkpoint import CheckpointConfig, CheckpointError, Checkpointer
from trainer.optim import OptimizerConfig
from trainer.state import TrainState, abstract_train_state, train_state_from_params

ModelFactory = Callable[[nnx.Rngs], nnx.Module]


@dataclasses.dataclass
class LearnerContext:
    config: object  # trainer.config.RunConfig
    run_dir: Path
    rules: MeshRules
    model_config: ModelConfig  # the policy architecture at the run's compute dtype
    tokenizer: Tokenizer
    handoff: dict[str, nnx.State] = dataclasses.field(default_factory=dict)  # on-device params finished stages leave
    # model.lora resolved against the model: which weights train adapters (None: full fine-tuning). Resolved
    # here, when the learner starts, so a target that matches nothing stops the run before any stage runs.
    lora: loralib.LoraSpec | None = dataclasses.field(init=False, default=None)

    def __post_init__(self):
        self.lora = loralib.resolve(self.model_config, self.config.model.lora)

    # ------------------------------------------------------------------------------ model shapes

    def llama_factory(self) -> ModelFactory:
        from models.llama import Llama

        return lambda rngs: Llama(self.model_config, rngs, self.rules)

    def scalar_factory(self) -> ModelFactory:
        """The value / preference model: the policy's architecture with a scalar head."""
        from models.llama import ScalarModel

        return lambda rngs: ScalarModel(self.model_config, rngs, self.rules)

    def assemble(self, factory: ModelFactory, arrays: dict[tuple, object]) -> nnx.State:
        """A parameter state of `factory`'s model holding `arrays` (by path: host numpy or device
        arrays), each placed straight on its parameter's sharding (a no-op for arrays already there)."""
        _, abstract, _ = nnx.split(nnx.eval_shape(lambda: factory(nnx.Rngs(0))), nnx.Param, ...)
        shardings = dict(nnx.to_flat_state(state_shardings(abstract, self.rules)))
        leaves = []
        for path, variable in nnx.to_flat_state(abstract):
            if path not in arrays:
                raise ValueError(f"no weights for {'.'.join(map(str, path))}")
            value = arrays[path]
            if tuple(value.shape) != tuple(variable.shape):
                raise ValueError(f"weight {'.'.join(map(str, path))} has shape {value.shape}, expected {variable.shape}")
            if isinstance(value, np.ndarray):
                value = value.astype(variable.dtype, copy=False)
            leaves.append((path, variable.replace(jax.device_put(value, shardings[path]))))
        return nnx.from_flat_state(leaves)

    def graphdef(self, factory: ModelFactory) -> nnx.GraphDef:
        return nnx.split(nnx.eval_shape(lambda: factory(nnx.Rngs(0))), nnx.Param, ...)[0]

    def train_state(self, factory: ModelFactory, params: nnx.State, optimizer: OptimizerConfig,
                    seed: int) -> TrainState:
        """A fresh train state holding a copy of `params` (which stay usable: steps donate their state);
        with model.lora, `params` are its frozen base under fresh adapters."""
        return train_state_from_params(self.graphdef(factory), params, optimizer, self.rules, seed, self.lora)

    def abstract_state(self, factory: ModelFactory, optimizer: OptimizerConfig, seed: int,
                       trainable: bool = True) -> TrainState:
        """The train state's shapes; `trainable=False`: as if fully fine-tuned, whose `params` are the whole
        model (the layout of the <stage>-params checkpoints `hand_on` writes)."""
        return abstract_train_state(factory, optimizer, self.rules, seed, self.lora if trainable else None)

    # ---------------------------------------------------------------------------------- weights

    def initial_params(self) -> nnx.State:
        """The initial model's parameters, read from `model.source` straight into their shardings."""
        from models.sources import load_checkpoint

        return self.assemble(self.llama_factory(), load_checkpoint(self.config.model.source).params)

    def scalar_params_from(self, llama_params: nnx.State) -> nnx.State:
        """Value / preference-model parameters: the LM's weights as backbone and a zero scalar head."""
        arrays = {("backbone",) + tuple(p): v[...] for p, v in nnx.to_flat_state(llama_params)}
        arrays[("head_D",)] = np.zeros((self.model_config.hidden_size,), np.float32)
        arrays[("head_bias",)] = np.zeros((), np.float32)
        return self.assemble(self.scalar_factory(), arrays)

    def policy_params(self) -> nnx.State:
        """The policy entering a stage after SL: SL's final weights if the run has them, else the initial model."""
        from trainer.pipeline_state import StageRecord

        if "policy" in self.handoff:
            return self.handoff["policy"]
        if not StageRecord(self.run_dir).done("sl"):
            return self.initial_params()
        opt = self.config.sl.optimizer
        self.handoff["policy"] = self.restore_params("sl", self.llama_factory(), opt)
        return self.handoff["policy"]

    def reward_model_params(self) -> nnx.State:
        """The trained preference model's parameters (the rm stage's)."""
        if "reward_model" not in self.handoff:
            self.handoff["reward_model"] = self.restore_params("rm", self.scalar_factory(), self.config.rm.optimizer)
        return self.handoff["reward_model"]

    def hand_on(self, name: str, stage: str, state: TrainState) -> None:
        """At the end of `stage`: its parameters saved alone in checkpoints/<stage>-params (what a resumed
        run restores; a third of the full state) and kept on the devices for the stages after it. With
        LoRA these are the merged weights: later stages start from the trained model either way."""
        params = state.full_params()
        ckpt = Checkpointer(self.run_dir / "checkpoints" / f"{stage}-params",
                            CheckpointConfig(every_steps=1, keep=1, async_save=False))
        try:
            step = int(state.step)
            if step not in ckpt.all_steps():
                ckpt.save(step, params, {}, force=True)
                ckpt.wait()
        finally:
            ckpt.close()
        self.handoff[name] = params

    def write_adapter(self, stage: str, state: TrainState, base_model: str, stacked_on: str | None = None) -> None:
        """The stage's LoRA adapters alone, as a PEFT adapter directory at adapters/<stage>/ that `peft`
        loads onto `base_model`; `stacked_on`: the earlier stage whose merged weights this one trained on
        (its adapter is included, see models/peft_export.py). Collective: every process calls it."""
        from models.peft_export import export_adapter
        from trainer.distributed import gather_to_host

        adapters = {p: v[...] for p, v in nnx.to_flat_state(state.params) if p[-1] in ("lora_a", "lora_b")}
        host = gather_to_host(adapters)
        if jax.process_index() == 0:
            earlier = None if stacked_on is None else self.run_dir / "adapters" / stacked_on
            export_adapter(self.run_dir / "adapters" / stage, host, self.lora, base_model=base_model,
                           stacked_on=earlier)

    def initial_model_path(self) -> str:
        """Where the initial model's weights are (what a PEFT adapter of this run goes on)."""
        from models.sources import resolve

        return str(resolve(self.config.model.source)[1])

    def restore_params(self, stage: str, factory: ModelFactory, optimizer: OptimizerConfig) -> nnx.State:
        abstract = self.abstract_state(factory, optimizer, self.config.run.seed, trainable=False)
        ckpt = self.checkpointer(f"{stage}-params")
        try:
            restored = ckpt.restore(abstract.params)
        finally:
            ckpt.close()
        if restored is None:
            raise CheckpointError(f"{self.run_dir}/checkpoints/{stage}-params holds no checkpoint; run the {stage} "
                                  f"stage first")
        return restored[0]

    def checkpointer(self, name: str) -> Checkpointer:
        return Checkpointer(self.run_dir / "checkpoints" / name, self.config.checkpoint)
