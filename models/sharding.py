"""Logical axis names and the one mapping from them to mesh axes.

Model code names the *meaning* of each array dimension (``embed``, ``heads``...). A rules table
(``configs/sharding/*.yaml``) says which mesh axes carry each meaning, separately for parameters and
activations, since a batch axis and an fsdp-sharded weight dimension may use the same mesh axis.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from models.errors import UserError

LOGICAL_AXES = ("batch", "length", "embed", "heads", "kv_heads", "head_dim", "mlp", "vocab")
MESH_AXES = ("data", "fsdp", "tensor")


class ShardingRulesError(UserError, ValueError):
    """A rules table or a logical-axis annotation that cannot be turned into a PartitionSpec."""


def _normalise_target(logical: str, target: Any, where: str) -> tuple[str, ...]:
    if target is None:
        return ()
    targets = (target,) if isinstance(target, str) else tuple(target)
    for axis in targets:
        if axis not in MESH_AXES:
            raise ShardingRulesError(
                f"{where}: logical axis {logical!r} maps to unknown mesh axis {axis!r}; mesh axes are {MESH_AXES}"
            )
    return targets


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Logical axis -> mesh axes, one table for parameters and one for activations."""

    params: Mapping[str, tuple[str, ...]]
    activations: Mapping[str, tuple[str, ...]]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "sharding rules") -> "ShardingRules":
        unknown_sections = set(data) - {"params", "activations"}
        if unknown_sections:
            raise ShardingRulesError(
                f"{source}: unknown sections {sorted(unknown_sections)}; expected 'params' and 'activations'"
            )
        tables = {}
        for section in ("params", "activations"):
            table = data.get(section)
            if not isinstance(table, Mapping):
                raise ShardingRulesError(f"{source}: section {section!r} must be a mapping of logical axis -> mesh axes")
            unknown = set(table) - set(LOGICAL_AXES)
            if unknown:
                raise ShardingRulesError(
                    f"{source}: {section}: unknown logical axes {sorted(unknown)}; known: {LOGICAL_AXES}"
                )
            tables[section] = {
                name: _normalise_target(name, target, f"{source}: {section}") for name, target in table.items()
            }
        return cls(**tables)

    def spec(self, logical_axes: Sequence[str | None], kind: str = "params") -> PartitionSpec:
        """PartitionSpec for an array whose dimensions carry `logical_axes`.

        Raises when a name has no rule (a silent replication is how 1B-parameter models end up
        unsharded) or when two dimensions would be split over the same mesh axis.
        """
        table = self.params if kind == "params" else self.activations
        used: dict[str, str] = {}
        entries = []
        for name in logical_axes:
            if name is None:
                entries.append(None)
                continue
            if name not in table:
                raise ShardingRulesError(f"no {kind} rule for logical axis {name!r} (in {tuple(logical_axes)})")
            mesh_axes = table[name]
            for axis in mesh_axes:
                if axis in used:
                    raise ShardingRulesError(
                        f"logical axes {used[axis]!r} and {name!r} both map to mesh axis {axis!r} "
                        f"in {kind} array {tuple(logical_axes)}"
                    )
                used[axis] = name
            entries.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
        return PartitionSpec(*entries)


@dataclasses.dataclass(frozen=True)
class MeshRules:
    """A mesh together with the rules that place arrays on it."""

    mesh: Mesh
    rules: ShardingRules

    def param_sharding(self, logical_axes: Sequence[str | None]) -> NamedSharding:
        return NamedSharding(self.mesh, self.rules.spec(logical_axes, "params"))

    def activation_sharding(self, logical_axes: Sequence[str | None]) -> NamedSharding:
        return NamedSharding(self.mesh, self.rules.spec(logical_axes, "activations"))

    def constrain(self, x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
        return jax.lax.with_sharding_constraint(x, self.activation_sharding(logical_axes))


def constrain(x: jax.Array, logical_axes: Sequence[str | None], mesh_rules: MeshRules | None) -> jax.Array:
    """Pin an activation's layout on the mesh; no-op for single-device (mesh-less) models."""
    return x if mesh_rules is None else mesh_rules.constrain(x, logical_axes)


def _is_variable(x) -> bool:
    from flax import nnx

    return isinstance(x, nnx.Variable)


def param_shardings(abstract_model, mesh_rules: MeshRules):
    """NamedSharding for every parameter of an (abstract or concrete) NNX model, from its logical axes."""
    from flax import nnx

    def sharding_of(variable):
        axes = variable.get_metadata().get("logical_axes")
        if axes is None:
            raise ShardingRulesError(f"parameter of shape {variable.shape} has no logical_axes metadata")
        return mesh_rules.param_sharding(axes)

    return jax.tree.map(sharding_of, nnx.state(abstract_model, nnx.Param), is_leaf=_is_variable)


def create_sharded(factory, mesh_rules: MeshRules):
    """Build `factory()` (an NNX module) with every parameter created directly in its sharded layout.

    Shapes come from an abstract evaluation first, so no device ever holds a replicated copy.
    """
    from flax import nnx

    graphdef, abstract_state = nnx.split(nnx.eval_shape(factory))
    shardings = state_shardings(abstract_state, mesh_rules)
    state = jax.jit(lambda: nnx.split(factory())[1], out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def state_shardings(tree, mesh_rules: MeshRules):
    """NamedSharding for every leaf of a state tree (a model's nnx state, a train state): nnx Variables
    with `logical_axes` metadata (parameters, and optimizer moments that mirror them) by the rules,
    everything else (counters, RNG keys, scalars) replicated."""
    replicated = NamedSharding(mesh_rules.mesh, PartitionSpec())

    def sharding_of(leaf):
        axes = leaf.get_metadata().get("logical_axes") if _is_variable(leaf) else None
        return replicated if axes is None else mesh_rules.param_sharding(axes)

    return jax.tree.map(sharding_of, tree, is_leaf=_is_variable)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh; one size may be -1 (all remaining devices).

    Axes are `Auto` (compiler-propagated shardings, pinned where the model calls `constrain`).
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ShardingRulesError(f"mesh: at most one axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}")
    known = 1
    for size in sizes:
        if size != -1:
            if size <= 0:
                raise ShardingRulesError(f"mesh axis sizes must be positive or -1, got {sizes}")
            known *= size
    if -1 in sizes:
        if len(devices) % known:
            raise ShardingRulesError(f"mesh: {len(devices)} devices are not divisible by the fixed axes' product {known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if sizes[0] * sizes[1] * sizes[2] != len(devices):
        raise ShardingRulesError(
            f"mesh: data×fsdp×tensor = {sizes[0]}×{sizes[1]}×{sizes[2]} ≠ {len(devices)} available devices"
        )
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)
