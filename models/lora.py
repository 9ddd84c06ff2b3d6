"""LoRA: low-rank adapters on a frozen base model (Hu et al. 2021, arXiv 2106.09685).

A targeted weight W (in → out) is used as W' = W + (alpha / rank) · A B, with A [in, rank] and
B [rank, out]. B starts at zero, so a fresh adapter reproduces the base exactly; A starts uniform in
±1/√in (PEFT's default, Kaiming-uniform with a = √5). Only A and B (and any parameter the base
model has no checkpoint name for, such as a scalar head) are trained: they are the train state's
`params`, so the optimizer holds moments for them alone; the base rides along frozen.

Adapters are applied as merged weights wherever no gradient is taken and whenever `dropout` is 0: the
model runs on W' (computed inside the jitted step), so the sampler's weights are simply the merged ones.
The cost is one weight-sized product per targeted matrix per step, and its gradient passes through a
weight-sized dL/dW' on the way to dA, dB.

Dropout on the adapter's input (PEFT's `lora_dropout`) cannot be expressed on merged weights, so a
training pass with `dropout` > 0 runs each targeted weight unmerged instead (`unmerged`, an
`AdaptedWeight` in place of W, which models/llama.py's `project` understands):

    y = x W + (alpha / rank) · (dropout(x) A) B

with one keep mask per weight and pass, drawn from a key the train step splits off its state's RNG (so
a resumed run draws the same masks). Sampling, evaluation, reference log-probs and exports use the
merged weights with no dropout, as PEFT does in eval mode.

Targets are matched as PEFT matches `target_modules`: a Hugging Face module name (the checkpoint name
without `.weight`, e.g. `model.layers.3.self_attn.q_proj`) is adapted when it equals a target or ends
with `.` + target (`q_proj`, `self_attn.o_proj`, `layers.0.mlp.down_proj`). Only linear projections
(and an untied `lm_head`) can be targeted.

Tensor names end in their shape: I the weight's input dims (D, or N×H for o_proj), O its output dims, R rank.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx, struct

from models import families
from models.config import ModelConfig
from models.errors import UserError

ParamPath = tuple[str | int, ...]

# Our weight leaves that are linear projections, and how many of their leading dims are inputs.
_INPUT_DIMS = {"q_DxNxH": 1, "k_DxKxH": 1, "v_DxKxH": 1, "o_NxHxD": 2, "gate_DxF": 1, "up_DxF": 1, "down_FxD": 1,
               "lm_head_DxV": 1}
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


class LoraConfigError(UserError, ValueError):
    """A LoRA configuration that cannot work, or targets that match nothing in the model."""


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """`model.lora`: adapters on a frozen base for every training stage (absent: full fine-tuning)."""

    rank: int = 8  # r: inner dimension of each adapter
    alpha: float = 16.0  # the adapter's output is scaled by alpha / rank
    dropout: float = 0.0  # probability of zeroing each input of an adapter in training passes (PEFT's lora_dropout)
    targets: tuple[str, ...] = DEFAULT_TARGETS  # HF module names or suffixes, as PEFT's target_modules

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise LoraConfigError(f"model.lora.rank must be a positive integer, got {self.rank!r}")
        if not self.alpha > 0:
            raise LoraConfigError(f"model.lora.alpha must be > 0, got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise LoraConfigError(f"model.lora.dropout must be a probability in [0, 1), got {self.dropout!r}")
        if isinstance(self.targets, str) or not self.targets or not all(isinstance(t, str) and t for t in self.targets):
            raise LoraConfigError(f"model.lora.targets must be a non-empty list of module names (e.g. "
                                  f"{list(DEFAULT_TARGETS)}), got {self.targets!r}")
        object.__setattr__(self, "targets", tuple(self.targets))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """A LoraConfig resolved against one model: which weights get adapters (static, hashable)."""

    config: LoraConfig
    targets: tuple[tuple[ParamPath, str], ...]  # (our LM parameter path, its HF module name), in HF order
    lm_paths: frozenset[ParamPath]  # every LM parameter: frozen; anything else (a scalar head) is trained


def _hf_names(model_config: ModelConfig) -> dict[str, ParamPath]:
    return families.by_name(model_config.family).hf_names(model_config.num_layers, model_config.tie_embeddings)


def linear_modules(model_config: ModelConfig) -> dict[str, ParamPath]:
    """HF module name -> our parameter path, for every linear projection the model has."""
    return {name.removesuffix(".weight"): path for name, path in _hf_names(model_config).items()
            if path[-1] in _INPUT_DIMS}


def _matches(module: str, target: str) -> bool:
    return module == target or module.endswith("." + target)


def resolve(model_config: ModelConfig, config: LoraConfig | None) -> LoraSpec | None:
    """The adapted weights of `model_config`'s model; a target that matches no module is an error."""
    if config is None:
        return None
    modules = linear_modules(model_config)
    unmatched = [t for t in config.targets if not any(_matches(m, t) for m in modules)]
    if unmatched:
        kinds = sorted({m.rsplit(".", 1)[-1] for m in modules})
        raise LoraConfigError(
            f"model.lora.targets {unmatched} match no module of this {model_config.family} model; its linear "
            f"modules are {kinds} (as suffixes of names like {next(iter(modules))!r})"
            + ("; lm_head is tied to the embedding here" if any("lm_head" in t for t in unmatched) else ""))
    targets = tuple((path, m) for m, path in modules.items() if any(_matches(m, t) for t in config.targets))
    return LoraSpec(config=config, targets=targets, lm_paths=frozenset(_hf_names(model_config).values()))


def _lm_path(path: ParamPath) -> ParamPath:
    """A parameter's path in the LM: a scalar model's backbone holds the LM under 'backbone'."""
    return path[1:] if path[:1] == ("backbone",) else path


def split(params: nnx.State, spec: LoraSpec, key: jax.Array) -> tuple[nnx.State, nnx.State]:
    """(frozen base, trainable) of a model's parameters: the trainable state holds a fresh adapter
    (`lora_a`, `lora_b`) under each targeted weight's path, plus every non-LM parameter as it is."""
    flat = list(nnx.to_flat_state(params))
    frozen = [(p, v) for p, v in flat if _lm_path(p) in spec.lm_paths]
    trainable = [(p, v) for p, v in flat if _lm_path(p) not in spec.lm_paths]
    by_lm_path = {_lm_path(p): (p, v) for p, v in frozen}
    weights = [(by_lm_path[lm_path], _INPUT_DIMS[lm_path[-1]]) for lm_path, _ in spec.targets]
    rank = spec.config.rank
    sizes = [math.prod(w.shape[:n_in]) * rank for (_, w), n_in in weights]
    # One draw for every A, sliced up: a draw per adapter (hundreds in a deep model) made the state's
    # init program compile for minutes.
    uniform = jax.random.uniform(key, (sum(sizes),), jnp.float32, -1.0, 1.0)
    offset = 0
    for ((path, weight), n_in), size in zip(weights, sizes):
        a, b = _fresh_adapter(weight, n_in, rank, uniform[offset:offset + size])
        offset += size
        trainable += [(path + ("lora_a",), a), (path + ("lora_b",), b)]
    return nnx.from_flat_state(frozen), nnx.from_flat_state(trainable)


def _fresh_adapter(weight: nnx.Variable, n_in: int, rank: int, uniform: jax.Array) -> tuple[nnx.Param, nnx.Param]:
    """A [*in, R] uniform in ±1/√fan_in (from `uniform`, fan_in·R draws in [-1, 1)) and B [R, *out] zero,
    sharded along the weight's own logical axes (the rank axis is never split)."""
    shape, axes = tuple(weight.shape), tuple(weight.get_metadata()["logical_axes"])
    bound = 1.0 / math.sqrt(math.prod(shape[:n_in]))
    a_IxR = (bound * uniform).reshape(*shape[:n_in], rank).astype(weight.dtype)
    b_RxO = jnp.zeros((rank, *shape[n_in:]), weight.dtype)
    return (nnx.Param(a_IxR, logical_axes=(*axes[:n_in], None)),
            nnx.Param(b_RxO, logical_axes=(None, *axes[n_in:])))


def delta(a_IxR: jax.Array, b_RxO: jax.Array, scale: float) -> jax.Array:
    """scale · A B in the weight's layout [*in, *out]."""
    rank = a_IxR.shape[-1]
    in_shape, out_shape = a_IxR.shape[:-1], b_RxO.shape[1:]
    product = jnp.dot(a_IxR.reshape(-1, rank), b_RxO.reshape(rank, -1), preferred_element_type=jnp.float32)
    return (scale * product).reshape(*in_shape, *out_shape)


def merge(frozen: nnx.State, trainable: nnx.State, spec: LoraSpec) -> nnx.State:
    """The full parameter state the model runs on: each targeted W as W + scale·A B, every other
    base weight as it is, and the trainable non-LM parameters (heads)."""
    flat = dict(nnx.to_flat_state(trainable))
    leaves = []
    for path, weight in nnx.to_flat_state(frozen):
        if path + ("lora_a",) in flat:
            d = delta(flat[path + ("lora_a",)][...], flat[path + ("lora_b",)][...], spec.config.scale)
            weight = weight.replace(weight[...] + d.astype(weight.dtype))
        leaves.append((path, weight))
    leaves += [(p, v) for p, v in flat.items() if p[-1] not in ("lora_a", "lora_b")]
    return nnx.from_flat_state(leaves)


def adapters(trainable: nnx.State) -> dict[ParamPath, tuple[jax.Array, jax.Array]]:
    """Weight path -> (A, B) of every adapter in a trainable state."""
    flat = dict(nnx.to_flat_state(trainable))
    return {p[:-1]: (v[...], flat[p[:-1] + ("lora_b",)][...]) for p, v in flat.items() if p[-1] == "lora_a"}


@struct.dataclass
class AdaptedWeight:
    """A targeted weight with its adapter kept apart, for a training pass with dropout: models/llama.py's
    `project` computes x W + scale · (dropout(x) A) B from it. Each weight has its own `key`, so every
    projection drops its own inputs, as PEFT's per-module dropout does (q, k and v share an input but not
    a mask)."""

    w_IxO: jax.Array
    a_IxR: jax.Array
    b_RxO: jax.Array
    key: jax.Array  # raw uint32[2]: this weight's dropout mask in this pass
    scale: float = struct.field(pytree_node=False)
    dropout: float = struct.field(pytree_node=False)

    def astype(self, dtype) -> "AdaptedWeight":
        """Base and adapter in `dtype` (the compute dtype), as a plain weight is cast before its product."""
        return self.replace(w_IxO=self.w_IxO.astype(dtype), a_IxR=self.a_IxR.astype(dtype),
                            b_RxO=self.b_RxO.astype(dtype))

    def flatten_input(self, fan_in: int) -> "AdaptedWeight":
        """The input dims of W and A as one (o_proj's N×H heads), the layout `project` contracts."""
        return self.replace(w_IxO=self.w_IxO.reshape(fan_in, *self.w_IxO.shape[self.a_IxR.ndim - 1:]),
                            a_IxR=self.a_IxR.reshape(fan_in, self.a_IxR.shape[-1]))

    def drop(self, x_BxTxI: jax.Array) -> jax.Array:
        """Inverted dropout of the adapter's input: each element zeroed with probability `dropout`, the
        rest scaled by 1 / (1 − dropout) so the expected input is unchanged."""
        if self.dropout == 0:
            return x_BxTxI
        keep = jax.random.bernoulli(self.key, 1.0 - self.dropout, x_BxTxI.shape)
        return jnp.where(keep, x_BxTxI / (1.0 - self.dropout), 0).astype(x_BxTxI.dtype)


def unmerged(frozen: nnx.State, trainable: nnx.State, spec: LoraSpec, dropout_key: jax.Array) -> nnx.State:
    """The parameter state a training pass with dropout runs on: like `merge`, but each targeted weight is
    an `AdaptedWeight` holding W, A, B and its own key split off `dropout_key` (one split for all, in
    `spec.targets` order, rather than hundreds of fold-ins)."""
    flat = dict(nnx.to_flat_state(trainable))
    keys = jax.random.split(dropout_key, len(spec.targets))
    key_of = {lm_path: keys[i] for i, (lm_path, _) in enumerate(spec.targets)}
    leaves = []
    for path, weight in nnx.to_flat_state(frozen):
        if path + ("lora_a",) in flat:
            weight = weight.replace(AdaptedWeight(
                w_IxO=weight[...], a_IxR=flat[path + ("lora_a",)][...], b_RxO=flat[path + ("lora_b",)][...],
                key=key_of[_lm_path(path)], scale=spec.config.scale, dropout=spec.config.dropout))
        leaves.append((path, weight))
    leaves += [(p, v) for p, v in flat.items() if p[-1] not in ("lora_a", "lora_b")]
    return nnx.from_flat_state(leaves)
