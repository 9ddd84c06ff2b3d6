"""Orbax checkpoints of a train state plus JSON extras, with exact resume and corrupt-step fallback.

    ckpt = Checkpointer(run_dir / "checkpoints", CheckpointConfig(every_steps=100, keep=3))
    restored = ckpt.restore(abstract_state)          # newest good step, or None on a fresh run
    if restored: state, extras = restored            # extras: data position, ledger, anything JSON
    ...
    ckpt.save(step, state, {"data_position": pos})   # async; returns once arrays are copied off device
    ckpt.save(final_step, state, extras, force=True); ckpt.wait()

Each step directory holds `state` (StandardSave: every array of the state pytree — params,
optimizer, step, RNG, KL coefficient) and `extras` (JsonSave). Orbax writes a step into a
temporary directory and renames it when complete, so a crash mid-save leaves no step that looks
finished. A newest step that still fails to restore is renamed to `corrupt-<step>-<time>` (never
deleted) with a warning, and the next older one is tried. Restoring onto another mesh works: the
abstract state carries the target shardings, and the restored arrays are checked against them.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from models.errors import UserError

log = logging.getLogger(__name__)


class CheckpointError(UserError, RuntimeError):
    """No usable checkpoint where one was required, or a restore onto the wrong layout."""


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = 100  # save when step % every_steps == 0 (and whenever forced, e.g. at the end)
    keep: int = 3  # newest complete checkpoints kept; older ones deleted after a newer one commits
    async_save: bool = True  # write in a background thread while training continues

    def __post_init__(self):
        if self.every_steps < 1 or self.keep < 1:
            raise CheckpointError(f"checkpoint.every_steps and checkpoint.keep must be ≥ 1, got {self}")


class Checkpointer:
    def __init__(self, directory: str | Path, config: CheckpointConfig = CheckpointConfig()):
        self.directory = Path(directory).absolute()
        self.config = config
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=1,  # the cadence is decided in `save` (Orbax would also save the first step)
            max_to_keep=config.keep,
            enable_async_checkpointing=config.async_save,
            create=True,
            # Leftovers of a save killed midway are never a valid step; clear them on start.
            cleanup_tmp_directories=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "extras"))
        self._last_saved: int | None = None

    # ---------------------------------------------------------------------------------- saving

    def save(self, step: int, state: Any, extras: dict | None = None, force: bool = False) -> bool:
        """Start saving `state` and `extras` at `step` if due (or `force`); True when a save started.

        Returns after the arrays are copied to host memory; the write continues in the background.
        A step already saved (e.g. the final step when it is also a periodic one) is not saved twice.
        """
        step = int(step)
        if not force and step % self.config.every_steps:
            return False
        if step == self._last_saved or step in self._manager.all_steps():
            return False
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), extras=ocp.args.JsonSave(extras or {}))
        started = self._manager.save(step, args=args, force=True)
        if started:
            self._last_saved = step
        return started

    def wait(self) -> None:
        """Block until every started save is committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Wait for pending saves and release Orbax's background threads."""
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -------------------------------------------------------------------------------- restoring

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict] | None:
        """Restore onto the shardings of `abstract_state` (ShapeDtypeStructs, e.g. `abstract_train_state`).

        With `step=None`, the newest step that restores; unreadable newer steps are moved aside.
        Returns (state, extras), or None when the directory holds no checkpoint.
        """
        if step is not None:
            return self._restore_step(step, abstract_state)
        for candidate in reversed(self.all_steps()):
            try:
                return self._restore_step(candidate, abstract_state)
            except CheckpointError:
                raise
            except Exception as err:  # noqa: BLE001 - any failure to read a step means "try the older one"
                moved = self._move_aside(candidate)
                log.warning("checkpoint step %d failed to restore (%s: %s); moved it to %s and trying the previous "
                            "step", candidate, type(err).__name__, str(err).splitlines()[0][:300], moved)
        return None

    def _restore_step(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), extras=ocp.args.JsonRestore())
        restored = self._manager.restore(step, args=args)
        state = restored["state"]
        assert_shardings(state, abstract_state)
        return state, dict(restored["extras"] or {})

    def _move_aside(self, step: int) -> Path:
        self._manager.wait_until_finished()
        source = self.directory / str(step)
        target = self.directory / f"corrupt-{step}-{int(time.time())}"
        if jax.process_index() == 0 and source.exists():
            source.rename(target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"cairl-checkpoint-move-aside-{step}")
        self._manager.reload()
        return target


def assert_shardings(state: Any, abstract_state: Any) -> None:
    """Every restored array has exactly the sharding, shape and dtype its abstract counterpart asks for."""
    restored = jax.tree_util.tree_flatten_with_path(state)[0]
    expected = jax.tree.leaves(abstract_state)
    if len(restored) != len(expected):
        raise CheckpointError(f"restored state has {len(restored)} arrays, expected {len(expected)}")
    for (path, array), want in zip(restored, expected):
        name = jax.tree_util.keystr(path)
        if array.shape != want.shape or array.dtype != want.dtype:
            raise CheckpointError(f"restored {name} is {array.dtype}{array.shape}, expected {want.dtype}{want.shape}")
        want_sharding = getattr(want, "sharding", None)
        if want_sharding is not None and not array.sharding.is_equivalent_to(want_sharding, array.ndim):
            raise CheckpointError(f"restored {name} has sharding {array.sharding}, expected {want_sharding}")
