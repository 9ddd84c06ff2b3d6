"""Versioned policy weights, learner → rollout workers through the Ray object store.

    handle = publish(version, flat_params)         # learner: host numpy arrays, `ray.put` once
    cache = WeightCache(model)                      # worker: its current version and weights
    state = cache.state_for(handle)                 # fetches only when the version changed

With `rollout.colocated` the worker runs inside the learner process and nothing travels:

    live = LiveWeights()                            # learner: the versions it offers, as its own device arrays
    handle = live.offer(version, params)            # WeightHandle(version, ref=None, nbytes=0)
    state = live.attach(model).state_for(handle)    # in-process worker: the same interface as WeightCache

The arrays travel as (names, arrays) lists: Ray stores numpy buffers without copying and every
worker on the node reads the same shared-memory copy (`ray.get` is zero-copy, read-only). The
handle is a small dataclass holding the ObjectRef *inside* it, so passing it to a task does not
make Ray resolve the weights eagerly — a worker already at that version never touches them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

ParamPath = tuple  # an nnx state path, e.g. ('layers', 0, 'attn', 'q_proj')


def path_name(path: ParamPath) -> str:
    return "/".join(str(p) for p in path)


@dataclasses.dataclass(frozen=True)
class WeightHandle:
    version: int  # 0 = the initial model; +1 per published update
    ref: Any  # ray.ObjectRef of (names, arrays), or None for "the worker's own initial weights"
    nbytes: int = 0  # size of the published arrays
    seconds: float = 0.0  # learner side: gathering the weights to the host and putting them in the object store


def pack(flat_params: Mapping[ParamPath, np.ndarray]) -> tuple[list[str], list[np.ndarray]]:
    names = sorted(path_name(p) for p in flat_params)
    by_name = {path_name(p): np.ascontiguousarray(a) for p, a in flat_params.items()}
    return names, [by_name[n] for n in names]


def publish(version: int, flat_params: Mapping[ParamPath, np.ndarray], seconds_before: float = 0.0) -> WeightHandle:
    """Put the weights in the object store once; every worker fetches the same copy by version.
    `seconds_before`: what getting `flat_params` to the host took, counted in the handle's seconds."""
    import time

    import ray

    start = time.perf_counter()
    names, arrays = pack(flat_params)
    ref = ray.put((names, arrays))
    return WeightHandle(version=int(version), ref=ref, nbytes=sum(a.nbytes for a in arrays),
                        seconds=seconds_before + time.perf_counter() - start)


class WeightCache:
    """A worker's view of the policy weights: swaps them in only when a task names a new version."""

    def __init__(self, model):
        from flax import nnx

        self._graphdef, state = nnx.split(model)
        self._flat = list(nnx.to_flat_state(state))
        self.version = 0
        self.fetches = 0
        self.fetch_seconds = 0.0  # total time spent fetching and loading new versions

    def state_for(self, handle: WeightHandle):
        """The nnx state at `handle.version`, or None when the worker already holds that version."""
        if handle.version == self.version:
            return None
        if handle.ref is None:
            raise ValueError(f"weights version {handle.version} has no object to fetch")
        import time

        import jax.numpy as jnp
        import ray
        from flax import nnx

        start = time.perf_counter()
        names, arrays = ray.get(handle.ref)
        by_name = dict(zip(names, arrays))
        leaves = []
        for path, variable in self._flat:
            array = _fitting(handle.version, path_name(path), by_name.get(path_name(path)), variable)
            leaves.append((path, variable.replace(jnp.asarray(array, dtype=variable.dtype))))
        self.version = handle.version
        self.fetches += 1
        state = nnx.from_flat_state(leaves)
        self.fetch_seconds += time.perf_counter() - start
        return state


class LiveWeights:
    """The colocated worker's weights: the learner's own parameter arrays, handed over by reference.

    `offer` keeps the newest KEEP versions the learner published (evaluation alternates between a policy and
    the base model) until `clear` (a new stage); `state_for` gives the worker's model the arrays of the
    version a task names — each on the worker's device, which on a one-device learner mesh is where they
    already are (no copy at all; a sharded mesh gathers them device to device), cast to the worker's dtype
    only where it differs. A version's arrays stay valid until the learner's next update donates them; a
    task naming a version whose arrays are gone (or were never offered) is an error, never a silent sample
    with other weights.
    """

    KEEP = 2

    def __init__(self):
        self._offered: dict[int, object] = {}  # version -> nnx.State of device arrays, oldest first
        self._template: list | None = None  # the worker model's (path, abstract variable, sharding)
        self._current = None  # the offered state the worker holds (None: its own initial weights, version 0)
        self.version = 0
        self.fetches = 0
        self.fetch_seconds = 0.0

    def offer(self, version: int, params, seconds: float = 0.0) -> WeightHandle:
        """The learner's `params` (an nnx.State of device arrays) as `version`; no copy, nothing sent."""
        self._offered.pop(version, None)
        self._offered[version] = params
        while len(self._offered) > self.KEEP:
            self._offered.pop(next(iter(self._offered)))
        return WeightHandle(version=int(version), ref=None, nbytes=0, seconds=seconds)

    def clear(self) -> None:
        """Forget every offered version (a new stage starts: what its tasks use, it offers anew), so that
        arrays restored for an earlier evaluation do not stay on the devices through training."""
        self._offered.clear()

    def offered(self, version: int):
        """The arrays offered as `version` (an nnx.State), or None."""
        return self._offered.get(version)

    def attach(self, model) -> "LiveWeights":
        """Remember the worker model's parameter layout (not its arrays: they are dropped at the first swap)."""
        import jax
        from flax import nnx

        self._template = [(path, variable.replace(jax.ShapeDtypeStruct(variable.shape, variable.dtype)),
                           variable[...].sharding) for path, variable in nnx.to_flat_state(nnx.state(model))]
        return self

    def state_for(self, handle: WeightHandle):
        """The nnx state at `handle.version`, or None when the worker already holds exactly those arrays."""
        if handle.version == self.version and self._current is None:
            return None  # the worker's own initial weights (version 0), as a separate worker would use them
        import time

        import jax
        from flax import nnx

        params = self.offered(handle.version)
        if params is None:
            raise ValueError(f"weights version {handle.version} is not offered by the learner (it holds "
                             f"{sorted(self._offered)}): a task named a version the learner did not publish")
        offered = {path: variable[...] for path, variable in nnx.to_flat_state(params)}
        gone = [path_name(path) for path, array in offered.items() if array.is_deleted()]
        if gone:
            raise ValueError(f"weights version {handle.version}: {gone[0]} and {len(gone) - 1} more were donated to a "
                             f"later update; a task named a version older than the learner's newest")
        if params is self._current:
            return None
        start = time.perf_counter()
        leaves = []
        for path, variable, sharding in self._template:
            array = _fitting(handle.version, path_name(path), offered.get(path), variable)
            if array.dtype != variable.dtype:
                array = array.astype(variable.dtype)
            leaves.append((path, variable.replace(jax.device_put(array, sharding))))
        self.version, self._current = handle.version, params
        self.fetches += 1
        self.fetch_seconds += time.perf_counter() - start
        return nnx.from_flat_state(leaves)


def _fitting(version: int, name: str, array, variable):
    """`array` for the model's `variable` slot, or the error naming the parameter that is missing or misshapen."""
    if array is None:
        raise ValueError(f"weights version {version} lack parameter {name}")
    if tuple(array.shape) != tuple(variable.shape):
        raise ValueError(f"weights version {version}: {name} has shape {array.shape}, expected {variable.shape}")
    return array
