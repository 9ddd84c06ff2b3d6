"""Multi-process (multi-host) JAX: start-up, and batches that each process loads only its share of.

`initialize` must run before anything touches a JAX device. It picks, in order:
  1. an explicit coordinator (config, or CAIRL_COORDINATOR / CAIRL_NUM_PROCESSES / CAIRL_PROCESS_ID,
     which launch/local_multihost.sh sets) — e.g. several processes on one machine, each with its
     own fake CPU devices, talking over gloo;
  2. the cluster environment JAX detects by itself (Cloud TPU VM slices, SLURM with ≥ 2 tasks,
     Open MPI), via a bare `jax.distributed.initialize()`;
  3. otherwise a single process (nothing to do).
After it, `jax.devices()` lists every process's devices and a mesh built over them spans hosts;
each process can only read and write its own (addressable) shards — hence `make_global_batch`.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import jax
import numpy as np
from jax.experimental import multihost_utils

from models.errors import UserError
from models.sharding import MeshRules

log = logging.getLogger(__name__)


class DistributedError(UserError, RuntimeError):
    """A multi-process set-up that cannot start."""


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    coordinator: str = ""  # "host:port" of process 0; empty = environment or single process
    num_processes: int | None = None  # with coordinator: total processes
    process_id: int | None = None  # with coordinator: this process's index
    local_device_ids: tuple[int, ...] | None = None  # restrict this process to some local devices (GPU hosts)
    cpu_collectives: str = "gloo"  # CPU cross-process collectives backend
    timeout_s: int = 300  # how long to wait for every process to join

    def __post_init__(self):
        if self.coordinator and (self.num_processes is None or self.process_id is None):
            raise DistributedError("distributed.coordinator needs num_processes and process_id as well")
        if self.num_processes is not None and self.process_id is not None:
            if not 0 <= self.process_id < self.num_processes:
                raise DistributedError(
                    f"distributed.process_id {self.process_id} is outside 0..{self.num_processes - 1}")

    @classmethod
    def from_env(cls) -> "DistributedConfig":
        env = os.environ
        if not env.get("CAIRL_COORDINATOR"):
            return cls()
        try:
            return cls(coordinator=env["CAIRL_COORDINATOR"], num_processes=int(env["CAIRL_NUM_PROCESSES"]),
                       process_id=int(env["CAIRL_PROCESS_ID"]))
        except (KeyError, ValueError) as err:
            raise DistributedError(
                f"CAIRL_COORDINATOR is set, so CAIRL_NUM_PROCESSES and CAIRL_PROCESS_ID must be integers ({err})"
            ) from None


def _cluster_detected() -> bool:
    env = os.environ
    slurm = int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1")) or 1) > 1 and "SLURM_JOB_ID" in env
    tpu_pod = len(env.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1 or "MEGASCALE_COORDINATOR_ADDRESS" in env
    mpi = int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
    return slurm or tpu_pod or mpi


def initialize(config: DistributedConfig | None = None) -> bool:
    """Join the process group if there is one; True when running as one of several processes."""
    config = config or DistributedConfig.from_env()
    # Only read by the CPU client, and only before it starts: harmless on TPU/GPU.
    jax.config.update("jax_cpu_collectives_implementation", config.cpu_collectives)
    if config.coordinator:
        # The coordinator service listens on the address the others are told (learner 0's, or loopback
        # locally), not on every interface as JAX would by default.
        try:
            jax.distributed.initialize(
                config.coordinator, num_processes=config.num_processes, process_id=config.process_id,
                local_device_ids=config.local_device_ids, initialization_timeout=config.timeout_s,
                coordinator_bind_address=config.coordinator,
            )
        except (RuntimeError, ValueError) as err:  # jaxlib's XlaRuntimeError is a RuntimeError
            raise DistributedError(
                f"process {config.process_id} of {config.num_processes} could not join the JAX job at "
                f"{config.coordinator} within {config.timeout_s} s ({str(err).strip().splitlines()[0][:300]}); "
                f"every host must reach that address") from None
    elif _cluster_detected():
        jax.distributed.initialize(local_device_ids=config.local_device_ids, initialization_timeout=config.timeout_s)
    else:
        return False
    log.info("process %d of %d: %d local / %d global devices", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())
    return jax.process_count() > 1


# --------------------------------------------------------------------------------------- batches


def _batch_sharding(mesh_rules: MeshRules):
    return mesh_rules.activation_sharding(("batch",))


def local_rows(mesh_rules: MeshRules, global_batch_size: int) -> slice:
    """The rows of the global batch whose shards live on this process's devices (one contiguous range)."""
    index_map = _batch_sharding(mesh_rules).addressable_devices_indices_map((global_batch_size,))
    ranges = sorted({(idx[0].start or 0, global_batch_size if idx[0].stop is None else idx[0].stop)
                     for idx in index_map.values()})
    start, stop = ranges[0][0], ranges[0][1]
    for lo, hi in ranges[1:]:
        if lo != stop:
            raise DistributedError(
                f"this process's batch shards {ranges} are not contiguous; order the mesh devices by process")
        stop = hi
    return slice(start, stop)


def make_global_batch(local_batch: dict, mesh_rules: MeshRules, global_batch_size: int) -> dict[str, jax.Array]:
    """Assemble global batch arrays from the rows this process loaded (`local_rows` of the global batch)."""
    sharding = _batch_sharding(mesh_rules)
    rows = local_rows(mesh_rules, global_batch_size)
    out = {}
    for name, value in local_batch.items():
        value = np.asarray(value)
        if value.shape[0] != rows.stop - rows.start:
            raise DistributedError(
                f"batch array {name!r}: this process must supply rows {rows.start}..{rows.stop - 1} "
                f"({rows.stop - rows.start} rows), got {value.shape[0]}")
        out[name] = jax.make_array_from_process_local_data(sharding, value, (global_batch_size,) + value.shape[1:])
    return out


def shard_global_batch(batch: dict, mesh_rules: MeshRules) -> dict[str, jax.Array]:
    """For data every process can compute whole (tests, small runs): keep this process's rows only."""
    size = len(next(iter(batch.values())))
    rows = local_rows(mesh_rules, size)
    return make_global_batch({k: np.asarray(v)[rows] for k, v in batch.items()}, mesh_rules, size)


def put_batch(batch: dict, mesh_rules: MeshRules) -> dict:
    """A batch every process holds whole, ready for a jitted step: one process passes the host arrays
    through (jit places them); several make global arrays, each process supplying its own rows."""
    if jax.process_count() == 1:
        return batch
    return shard_global_batch(batch, mesh_rules)


def gather_to_host(tree):
    """Every array of `tree` as a full numpy array on every process (collective: all must call it)."""
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, tree)
    return multihost_utils.process_allgather(tree, tiled=True)
