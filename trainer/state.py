"""Train state created directly in its sharded layout, and the guarded optimizer update.

A `TrainState` is a pytree: parameters (an `nnx.State` of `nnx.Param`), the optax state, the
update counter, an RNG key (raw uint32[2], so Orbax stores it like any array) and the count of
consecutive skipped (non-finite) updates. The model's graph definition and the optax
transformation ride along as static fields: they are code, not data, and are never checkpointed.

With LoRA (models/lora.py) `params` holds only what is trained (the adapters, and a scalar model's
head) and `frozen` the base weights, which no optimizer state mirrors; `model()` runs on the merged
weights, so every loss written against `state.model(params)` trains the adapters unchanged. With LoRA
dropout, a training pass takes `split_dropout_key(state)` and runs `state.model(params, dropout_key)`,
the adapters unmerged with their inputs dropped out; the key comes from the state's checkpointed RNG,
so a resumed run draws the same masks.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from models import lora as loralib
from models.errors import UserError
from models.sharding import MeshRules, state_shardings  # noqa: F401  (re-exported: the trainer's states use it)
from trainer.optim import OptimizerConfig, make_optimizer


class TrainingDivergedError(UserError, RuntimeError):
    """Too many consecutive updates had a non-finite loss or gradient."""


@struct.dataclass
class TrainState:
    params: nnx.State
    opt_state: optax.OptState
    step: jax.Array  # int32: train-step calls so far (skipped updates included)
    rng: jax.Array  # uint32[2] raw key: minibatch shuffles and anything else random in a step
    nonfinite_streak: jax.Array  # int32: consecutive skipped updates, reset by a good one
    graphdef: nnx.GraphDef = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)
    grad_accum_steps: int = struct.field(pytree_node=False, default=1)  # micro-batches per update
    frozen: nnx.State | None = None  # LoRA: the base weights, never updated; None: full fine-tuning
    lora: loralib.LoraSpec | None = struct.field(pytree_node=False, default=None)

    def model(self, params: nnx.State | None = None, dropout_key: jax.Array | None = None) -> nnx.Module:
        """The model on `params` (default: the state's own), LoRA adapters merged. With `dropout_key`
        (a training pass; see `split_dropout_key`) each adapted weight runs unmerged instead, its
        adapter's input dropped out at `model.lora.dropout` with masks drawn from the key."""
        if dropout_key is None:
            return nnx.merge(self.graphdef, self.full_params(params))
        if self.lora is None:
            raise ValueError("TrainState.model: a dropout key is for LoRA adapters, and this state has none")
        params = self.params if params is None else params
        return nnx.merge(self.graphdef, loralib.unmerged(self.frozen, params, self.lora, dropout_key))

    def full_params(self, params: nnx.State | None = None) -> nnx.State:
        """Every parameter of the model (LoRA: base + adapters merged): what samplers, later stages and
        exports use."""
        params = self.params if params is None else params
        return params if self.lora is None else loralib.merge(self.frozen, params, self.lora)


def _new_state(graphdef: nnx.GraphDef, params: nnx.State, tx: optax.GradientTransformation, seed: int,
               grad_accum_steps: int, lora: loralib.LoraSpec | None = None) -> TrainState:
    """The one constructor of a fresh train state around `params` (traced inside `jax.jit`).

    The step's RNG key is the second half of `split(PRNGKey(seed))`, the first being the one a
    fresh model initialises its weights from, so the two never share random numbers; LoRA adapters
    draw from `fold_in(PRNGKey(seed), 2)`, apart from both."""
    train_key = jax.random.split(jax.random.PRNGKey(seed))[1]
    frozen = None
    if lora is not None:
        frozen, params = loralib.split(params, lora, jax.random.fold_in(jax.random.PRNGKey(seed), 2))
    return TrainState(
        params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32), rng=train_key,
        nonfinite_streak=jnp.zeros((), jnp.int32), graphdef=graphdef, tx=tx, grad_accum_steps=grad_accum_steps,
        frozen=frozen, lora=lora,
    )


def _split_params(model: nnx.Module, what: str) -> tuple[nnx.GraphDef, nnx.State]:
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise ValueError(f"{what}: the model holds non-parameter state, which training does not carry")
    return graphdef, params


def _init_state(model_factory, tx, seed: int, grad_accum_steps: int, lora: loralib.LoraSpec | None) -> TrainState:
    params_key = jax.random.split(jax.random.PRNGKey(seed))[0]
    graphdef, params = _split_params(model_factory(nnx.Rngs(params=params_key)), "create_train_state")
    return _new_state(graphdef, params, tx, seed, grad_accum_steps, lora)


def abstract_train_state(model_factory: Callable[[nnx.Rngs], nnx.Module], optimizer_config: OptimizerConfig,
                         mesh_rules: MeshRules, seed: int = 0, lora: loralib.LoraSpec | None = None) -> TrainState:
    """Shapes, dtypes and shardings of the state, without allocating it (for restore and AOT compile)."""
    tx = make_optimizer(optimizer_config)
    abstract = jax.eval_shape(lambda: _init_state(model_factory, tx, seed, optimizer_config.grad_accum_steps, lora))
    shardings = state_shardings(abstract, mesh_rules)
    return with_shardings(abstract, shardings)


def with_shardings(abstract, shardings):
    """Attach shardings (a tree-prefix of `abstract`, as `state_shardings` returns) to ShapeDtypeStructs."""

    def attach(sharding, subtree):
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), subtree)

    return jax.tree.map(attach, shardings, abstract)


def create_train_state(model_factory: Callable[[nnx.Rngs], nnx.Module], optimizer_config: OptimizerConfig,
                       mesh_rules: MeshRules, seed: int = 0, lora: loralib.LoraSpec | None = None) -> TrainState:
    """Initialise params, optimizer state and RNG directly sharded.

    `model_factory(rngs)` builds the module (closing over its ModelConfig, which sets remat and
    param/compute dtypes, and over `mesh_rules` for its activation constraints). Shapes come from an
    abstract evaluation first, so no device ever holds a replicated copy of the weights.
    """
    tx = make_optimizer(optimizer_config)
    init = lambda: _init_state(model_factory, tx, seed, optimizer_config.grad_accum_steps, lora)  # noqa: E731
    return jax.jit(init, out_shardings=state_shardings(jax.eval_shape(init), mesh_rules))()


def train_state_from_model(model: nnx.Module, optimizer_config: OptimizerConfig, mesh_rules: MeshRules,
                           seed: int = 0, lora: loralib.LoraSpec | None = None) -> TrainState:
    """A train state around an existing model (e.g. pretrained weights already placed by
    `models.sharding`): the optimizer state is created on the parameters' own shardings."""
    graphdef, params = _split_params(model, "train_state_from_model")
    return train_state_from_params(graphdef, params, optimizer_config, mesh_rules, seed, lora)


def train_state_from_params(graphdef: nnx.GraphDef, params: nnx.State, optimizer_config: OptimizerConfig,
                            mesh_rules: MeshRules, seed: int = 0, lora: loralib.LoraSpec | None = None) -> TrainState:
    """A train state around parameters already on the devices (another stage's weights, a restored
    checkpoint), built sharded on the devices. The state holds a *copy*: its steps donate their input
    state, and `params` may still be in use elsewhere (e.g. as the frozen reference policy). With
    `lora`, `params` become the frozen base and fresh adapters are trained on top."""
    tx = make_optimizer(optimizer_config)

    def init(p):
        return _new_state(graphdef, jax.tree.map(jnp.copy, p), tx, seed, optimizer_config.grad_accum_steps, lora)

    return jax.jit(init, out_shardings=state_shardings(jax.eval_shape(init, params), mesh_rules))(params)


def split_dropout_key(state: TrainState) -> tuple[TrainState, jax.Array | None]:
    """(state with its RNG advanced, the key of one training pass's LoRA dropout), or (state, None)
    without LoRA dropout: the RNG is then left alone, so such runs draw exactly what they drew before
    dropout existed, and take the merged-weights path."""
    if state.lora is None or state.lora.config.dropout == 0:
        return state, None
    rng, dropout_key = jax.random.split(state.rng)
    return state.replace(rng=rng), dropout_key


def apply_update(state: TrainState, grads: nnx.State, loss: jax.Array) -> tuple[TrainState, dict]:
    """One optimizer update, skipped when the loss or the gradient norm is not finite.

    A skipped update leaves params and optimizer state bit-identical and increments
    `nonfinite_streak`; see `NonFiniteGuard` for stopping the run. The update runs inside a
    `lax.cond` rather than being computed and then selected away: a select needs the old and the
    new params and optimizer state alive at once, where a branch can update them in place.
    """
    grad_norm = optax.tree.norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def update(params, opt_state):
        updates, new_opt_state = state.tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_opt_state

    def skip(params, opt_state):
        return params, opt_state

    params, opt_state = jax.lax.cond(ok, update, skip, state.params, state.opt_state)
    new_state = state.replace(
        params=params,
        opt_state=opt_state,
        nonfinite_streak=jnp.where(ok, 0, state.nonfinite_streak + 1).astype(jnp.int32),
    )
    return new_state, {"grad_norm": grad_norm, "skipped": (~ok).astype(jnp.float32)}


class NonFiniteGuard:
    """Host-side stop rule: raise after `max_in_a_row` consecutive skipped updates (the stage loops
    of trainer/stages/ check every update's metrics, saving a checkpoint before they stop the run).

        guard = NonFiniteGuard(max_in_a_row=5)
        state, metrics = step(state, batch)
        guard.check(metrics)      # reads metrics['nonfinite_streak'] (a device scalar)
    """

    def __init__(self, max_in_a_row: int = 5):
        if max_in_a_row < 1:
            raise ValueError("NonFiniteGuard: max_in_a_row must be ≥ 1")
        self.max_in_a_row = max_in_a_row

    def check(self, metrics: dict) -> None:
        streak = int(metrics["nonfinite_streak"])
        if streak >= self.max_in_a_row:
            raise TrainingDivergedError(
                f"training stopped: {streak} consecutive updates had a non-finite loss or gradient "
                f"(limit {self.max_in_a_row}, run.max_nonfinite_updates); parameters were left at the last good "
                f"update and saved. Lower the learning rate or check the data for empty or corrupt batches, then "
                f"resume the run."
            )
