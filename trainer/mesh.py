"""A device mesh and its sharding rules from config, checked against the model and the batch.

    mesh_rules = build_mesh_rules(MeshConfig(data=-1, fsdp=2, tensor=1), "configs/sharding/default.yaml")
    check_model(mesh_rules, model_config)   # heads / kv-heads / every sharded dimension divisible
    check_batch(mesh_rules, batch_size)      # batch divisible by the mesh axes that split it

Each model role (policy, reference, value, reward) may get its own MeshConfig and rules file; the
devices argument lets roles use disjoint device subsets.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import jax
from flax import nnx

from models.config import ModelConfig
from models.sharding import MeshRules, ShardingRules, ShardingRulesError, make_mesh
from trainer.configlib import read_yaml

DEFAULT_RULES = Path(__file__).resolve().parent.parent / "configs" / "sharding" / "default.yaml"


class MeshError(ShardingRulesError):
    """A mesh that does not fit the devices, the model or the batch."""


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = -1  # data-parallel replicas; -1 = all devices left over by the other axes
    fsdp: int = 1  # parameters and optimizer state split over this axis; batch split over it too
    tensor: int = 1  # heads / mlp / vocab split over this axis (Megatron-style tensor parallelism)
    rules: str = ""  # logical-axis rules table (YAML); empty = configs/sharding/default.yaml

    def __post_init__(self):
        sizes = {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}
        for name, size in sizes.items():
            if not isinstance(size, int) or (size <= 0 and size != -1):
                raise MeshError(f"mesh.{name} must be a positive integer or -1, got {size!r}")
        if list(sizes.values()).count(-1) > 1:
            raise MeshError(f"mesh: at most one axis may be -1, got {sizes}")


def load_rules(path: str | Path | None = None) -> ShardingRules:
    """Read a rules table; errors name the file."""
    path = Path(path) if path else DEFAULT_RULES
    data, located = read_yaml(path)
    if not isinstance(data, dict):
        raise MeshError(f"{path}: a sharding rules file must be a mapping with 'params' and 'activations'")
    return ShardingRules.from_dict(data, source=str(path))


def build_mesh_rules(config: MeshConfig, devices=None) -> MeshRules:
    """Mesh over `devices` (default: every device of every process) plus its rules table."""
    devices = jax.devices() if devices is None else devices
    mesh = make_mesh(config.data, config.fsdp, config.tensor, devices=devices)
    return MeshRules(mesh, load_rules(config.rules or None))


def batch_shards(mesh_rules: MeshRules) -> int:
    """How many pieces the rules split the batch axis into."""
    axes = mesh_rules.rules.activations.get("batch", ())
    return math.prod(mesh_rules.mesh.shape[a] for a in axes)


def check_batch(mesh_rules: MeshRules, batch_size: int, what: str = "batch size") -> None:
    shards = batch_shards(mesh_rules)
    if batch_size % shards:
        axes = mesh_rules.rules.activations.get("batch", ())
        sizes = "×".join(f"{a}={mesh_rules.mesh.shape[a]}" for a in axes)
        raise MeshError(f"{what} {batch_size} is not divisible by the {shards} batch shards of the mesh ({sizes})")


def check_model(mesh_rules: MeshRules, model_config: ModelConfig) -> None:
    """Every parameter dimension must divide evenly over the mesh axes its logical axis maps to.

    Checked on the abstract model (no memory), so a bad tensor size fails before anything compiles;
    the common cases get a specific message.
    """
    from models.llama import Llama

    tensor = mesh_rules.mesh.shape["tensor"]
    for field in ("num_heads", "num_kv_heads"):
        axis = "heads" if field == "num_heads" else "kv_heads"
        if "tensor" in mesh_rules.rules.params.get(axis, ()) and getattr(model_config, field) % tensor:
            raise MeshError(
                f"model {field} = {getattr(model_config, field)} is not divisible by mesh.tensor = {tensor}; "
                f"choose a tensor size that divides both num_heads and num_kv_heads"
            )
    abstract = nnx.eval_shape(lambda: Llama(model_config, nnx.Rngs(0)))
    for path, variable in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        axes = variable.get_metadata()["logical_axes"]
        spec = mesh_rules.rules.spec(axes, "params")
        for dim, (size, entry) in enumerate(zip(variable.shape, spec)):
            if entry is None:
                continue
            names = (entry,) if isinstance(entry, str) else entry
            pieces = math.prod(mesh_rules.mesh.shape[a] for a in names)
            if size % pieces:
                raise MeshError(
                    f"parameter {'/'.join(map(str, path))} dimension {dim} ({axes[dim]} = {size}) is not divisible "
                    f"by the {pieces} pieces of mesh axes {names}; change the mesh or the rules table"
                )
