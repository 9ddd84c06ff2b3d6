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
finished.

Restoring tells a changed layout from corruption. Before reading arrays, the step's saved tree (names,
shapes, dtypes from Orbax's metadata) is compared with the abstract state: a difference means the run's
config now builds another state (an optimizer setting, the model, LoRA) and is a CheckpointLayoutError
naming the differing arrays, with nothing renamed or deleted. Only a step whose metadata or arrays cannot
be read is renamed to `corrupt-<step>-<time>` (never deleted) with a warning, and the next older one tried.
Restoring onto another mesh works: the abstract state carries the target shardings, and the restored
arrays are checked against them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from models.errors import UserError
from trainer.durable import raise_if_disk_full

log = logging.getLogger(__name__)


class CheckpointError(UserError, RuntimeError):
    """No usable checkpoint where one was required, or a restore onto the wrong layout."""


class CheckpointLayoutError(CheckpointError):
    """A readable checkpoint whose arrays differ from the state this config builds: a config change."""


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
        # Handlers named up front (not only per save/restore call), so a step's metadata reads before any restore.
        handlers = {"state": ocp.StandardCheckpointHandler(), "extras": ocp.JsonCheckpointHandler()}
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
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
        with self._disk_full_is_clear(f"checkpoint step {step}"):
            started = self._manager.save(step, args=args, force=True)
        if started:
            self._last_saved = step
        return started

    def wait(self) -> None:
        """Block until every started save is committed."""
        with self._disk_full_is_clear(f"checkpoint step {self._last_saved}"):
            self._manager.wait_until_finished()

    def close(self) -> None:
        """Wait for pending saves and release Orbax's background threads."""
        with self._disk_full_is_clear(f"checkpoint step {self._last_saved}"):
            self._manager.close()

    @contextlib.contextmanager
    def _disk_full_is_clear(self, what: str):
        """A save the disk refuses is a DiskFullError: the committed steps before it are intact (Orbax commits a
        step by renaming its temporary directory, and the next start clears the leftover)."""
        try:
            yield
        except Exception as err:  # noqa: BLE001 - only a full disk is translated; anything else re-raised as is
            kept = [s for s in self._manager.all_steps() if s != self._last_saved]
            newest = f"newest intact step: {max(kept)}" if kept else "no earlier step of it"
            raise_if_disk_full(err, f"{what} in {self.directory} ({newest})")
            raise

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
            self._check_layout(step, self._saved_layout(step), abstract_state)
            return self._restore_step(step, abstract_state)
        for candidate in reversed(self.all_steps()):
            try:
                saved = self._saved_layout(candidate)
            except Exception as err:  # noqa: BLE001 - metadata that does not read: the step is damaged
                self._quarantine(candidate, err)
                continue
            self._check_layout(candidate, saved, abstract_state)  # a config change: raise, touch nothing
            try:
                return self._restore_step(candidate, abstract_state)
            except CheckpointError:
                raise
            except Exception as err:  # noqa: BLE001 - arrays that do not read: the step is damaged
                self._quarantine(candidate, err)
        return None

    def _quarantine(self, step: int, err: BaseException) -> None:
        moved = self._move_aside(step)
        log.warning("checkpoint step %d failed to restore (%s: %s); moved it to %s and trying the previous step",
                    step, type(err).__name__, (str(err).splitlines() or [""])[0][:300], moved)

    def _saved_layout(self, step: int) -> dict[str, tuple] | None:
        """{array name: (shape, dtype)} of the state saved at `step`, from Orbax's metadata (no array read)."""
        metadata = self._manager.item_metadata(step)["state"]
        if metadata is None:
            return None
        tree = getattr(metadata, "tree", metadata)
        leaves = jax.tree.leaves(tree, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))
        return {leaf.name: (tuple(leaf.shape), str(leaf.dtype)) for leaf in leaves}

    def _check_layout(self, step: int, saved: dict[str, tuple] | None, abstract_state: Any) -> None:
        if saved is None:
            return
        wanted = state_layout(abstract_state)
        differences = layout_differences(saved, wanted)
        if differences:
            raise CheckpointLayoutError(
                f"{self.directory / str(step)} was saved with another state layout than this config builds "
                f"({'; '.join(differences)}). A setting that shapes the train state (an optimizer setting such as "
                f"max_grad_norm, the model, LoRA) changed since the run started. Nothing was changed on disk: resume "
                f"with the original setting, or start a new run.name")

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


def state_layout(state: Any) -> dict[str, tuple]:
    """{array name as Orbax names it ('opt.1.0.mu.w'): (shape, dtype)} of a state or abstract state."""
    return {jax.tree_util.keystr(path, simple=True, separator="."): (tuple(leaf.shape), str(leaf.dtype))
            for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]}


def layout_differences(saved: dict[str, tuple], wanted: dict[str, tuple], shown: int = 4) -> list[str]:
    """What differs between two layouts, worded for a user (a few names of each kind)."""
    def names(keys):
        keys = sorted(keys)
        return ", ".join(keys[:shown]) + (f" and {len(keys) - shown} more" if len(keys) > shown else "")

    out = []
    if missing := wanted.keys() - saved.keys():
        out.append(f"not in the checkpoint: {names(missing)}")
    if extra := saved.keys() - wanted.keys():
        out.append(f"in the checkpoint only: {names(extra)}")
    changed = sorted(k for k in saved.keys() & wanted.keys() if saved[k] != wanted[k])
    if changed:
        out.append("changed: " + ", ".join(f"{k} {saved[k][1]}{list(saved[k][0])} → {wanted[k][1]}{list(wanted[k][0])}"
                                           for k in changed[:shown]))
    return out


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
