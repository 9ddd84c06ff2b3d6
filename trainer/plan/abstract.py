"""Abstract states of a run: every model it holds as ShapeDtypeStructs with their shardings, no weights.

    model_config = plan_model_config(run_config)        # config.json or a preset, never the weights
    rules = plan_mesh_rules(run_config, devices)
    states = abstract_states(run_config, model_config, rules)   # policy, value, reference, pm, ...

The states are those `trainer.learner.Learner` builds for each stage, made by the same functions
(`abstract_train_state`), so a plan compiles what the learner compiles.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import jax
from flax import nnx

from models.config import PRESETS, ModelConfig
from models.errors import UserError
from models.sharding import MeshRules
from models.sharding import state_shardings as module_state_shardings
from trainer.mesh import MeshConfig, build_mesh_rules, check_model
from trainer.state import abstract_train_state, with_shardings

# Registry names whose architecture is a preset: plannable before the weights are fetched.
_REGISTRY_PRESETS = {"smollm2-135m-instruct": "smollm2-135m"}


class PlanInputError(UserError, ValueError):
    """A run the planner cannot describe (model source without a config, mesh not matching the target)."""


def plan_model_config(config) -> ModelConfig:
    """The run's ModelConfig from a preset name, a registry name or an HF directory's config.json."""
    from models import fetch, hf_io

    source = config.model.source
    if source in PRESETS:
        base = PRESETS[source]
    elif source in _REGISTRY_PRESETS and not fetch.is_fetched(source):
        base = PRESETS[_REGISTRY_PRESETS[source]]
    else:
        path = fetch.model_dir(source) if source in fetch.EMBEDDED else Path(source).expanduser()
        if (path / "hf" / "config.json").is_file():  # a cairl run directory's export
            path = path / "hf"
        if not (path / "config.json").is_file():
            raise PlanInputError(
                f"model.source {source!r}: cairl plan reads only a model's shape, from a preset "
                f"({', '.join(sorted(PRESETS))}) or a Hugging Face directory's config.json; none found")
        base, _ = hf_io.read_config(path)
    model = config.model
    return base.replace(dtype=model.dtype, attention=model.attention, remat=model.remat,
                        scan_layers=model.scan_layers)


def resolve_mesh_config(mesh: MeshConfig, device_count: int, target_name: str) -> MeshConfig:
    """The mesh with its -1 axis filled in; a product that does not match the target is explained."""
    sizes = {"data": mesh.data, "fsdp": mesh.fsdp, "tensor": mesh.tensor}
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if -1 in sizes.values():
        if device_count % fixed:
            raise PlanInputError(
                f"model.mesh {sizes}: the fixed axes multiply to {fixed}, which does not divide the {device_count} "
                f"devices of {target_name}; choose sizes whose product divides {device_count}")
        free = next(k for k, v in sizes.items() if v == -1)
        sizes[free] = device_count // fixed
    elif fixed != device_count:
        raise PlanInputError(
            f"model.mesh data×fsdp×tensor = {sizes['data']}×{sizes['fsdp']}×{sizes['tensor']} = {fixed} devices, "
            f"but {target_name} has {device_count}; set one axis to -1 (e.g. model.mesh.data=-1) to use every "
            f"device, or choose a target with {fixed} devices")
    return dataclasses.replace(mesh, **sizes)


def plan_mesh_rules(config, devices, target_name: str, local: bool = False) -> MeshRules:
    """The run's mesh over the target's devices. Locally a mesh with no -1 axis takes the first
    data×fsdp×tensor devices, as the learner does; a remote target must be used whole."""
    mesh = config.model.mesh
    if local and -1 not in (mesh.data, mesh.fsdp, mesh.tensor):
        devices = devices[: min(len(devices), mesh.data * mesh.fsdp * mesh.tensor)]
    return build_mesh_rules(resolve_mesh_config(mesh, len(devices), target_name), devices)


@dataclasses.dataclass(frozen=True)
class AbstractStates:
    """What the learner holds, by role: train states (params + optimizer) and frozen parameter states."""

    policy_sl: object  # TrainState: the policy during SL fine-tuning (sl.optimizer)
    policy_dpo: object  # TrainState: the policy during DPO (dpo.optimizer)
    pm: object  # TrainState: the preference model during its training (rm.optimizer)
    policy: object  # TrainState: the PPO policy (ppo.policy_optimizer)
    value: object  # TrainState: the PPO value model (ppo.value_optimizer)
    reference: nnx.State  # frozen reference policy's parameters
    pm_frozen: nnx.State  # frozen preference model's parameters (PPO scores)
    llama_graphdef: object
    scalar_graphdef: object


def abstract_params(factory, mesh_rules: MeshRules) -> tuple[object, nnx.State]:
    """(graphdef, parameter state of ShapeDtypeStructs with shardings) of a module, nothing allocated."""
    graphdef, params = nnx.split(nnx.eval_shape(factory), nnx.Param)
    return graphdef, with_shardings(params, module_state_shardings(params, mesh_rules))


def abstract_states(config, model_config: ModelConfig, mesh_rules: MeshRules) -> AbstractStates:
    from models import lora
    from models.llama import Llama, ScalarModel

    check_model(mesh_rules, model_config)
    spec = lora.resolve(model_config, config.model.lora)  # with LoRA the trained states hold adapters + base
    llama = lambda rngs: Llama(model_config, rngs, mesh_rules)  # noqa: E731
    scalar = lambda rngs: ScalarModel(model_config, rngs, mesh_rules)  # noqa: E731
    seed = config.run.seed
    llama_graphdef, reference = abstract_params(lambda: llama(nnx.Rngs(0)), mesh_rules)
    scalar_graphdef, pm_frozen = abstract_params(lambda: scalar(nnx.Rngs(0)), mesh_rules)
    return AbstractStates(
        policy_sl=abstract_train_state(llama, config.sl.optimizer, mesh_rules, seed, spec),
        policy_dpo=abstract_train_state(llama, config.dpo.optimizer, mesh_rules, seed, spec),
        pm=abstract_train_state(scalar, config.rm.optimizer, mesh_rules, seed, spec),
        policy=abstract_train_state(llama, config.ppo.policy_optimizer, mesh_rules, seed, spec),
        value=abstract_train_state(scalar, config.ppo.value_optimizer, mesh_rules, seed + 1, spec),
        reference=reference, pm_frozen=pm_frozen, llama_graphdef=llama_graphdef, scalar_graphdef=scalar_graphdef,
    )


def per_device_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs: Σ prod(shard shape) · itemsize.

    With even sharding every device holds the same; the first device's shard is the one counted."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += math.prod(shape) * leaf.dtype.itemsize
    return total
