"""Versioned policy weights, learner → rollout workers through the Ray object store.

    handle = publish(version, flat_params)         # learner: host numpy arrays, `ray.put` once
    cache = WeightCache(model)                      # worker: its current version and weights
    state = cache.state_for(handle)                 # fetches only when the version changed

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
            name = path_name(path)
            if name not in by_name:
                raise ValueError(f"weights version {handle.version} lack parameter {name}")
            array = by_name[name]
            if tuple(array.shape) != tuple(variable.shape):
                raise ValueError(f"weights version {handle.version}: {name} has shape {array.shape}, "
                                 f"expected {variable.shape}")
            leaves.append((path, variable.replace(jnp.asarray(array, dtype=variable.dtype))))
        self.version = handle.version
        self.fetches += 1
        state = nnx.from_flat_state(leaves)
        self.fetch_seconds += time.perf_counter() - start
        return state
