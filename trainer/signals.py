"""SIGTERM and SIGINT stop a run at its next safe point, after a checkpoint, instead of killing it.

    stop = install()            # in the driver, before the stages run
    ...
    if stop_requested():        # at a safe point: state that a resume needs is durable or about to be saved
        save(); raise StopRequested(...)

A preemption notice or a SLURM time limit sends SIGTERM; Ctrl-C sends SIGINT. The first one only sets a
flag, which the stage loops check at their safe points (after a learner step, a PPO iteration, a completed
prompt batch, between stages): they save the current stage's checkpoint and raise StopRequested, and the
driver shuts Ray down and exits 0 (SIGTERM) or 130 (SIGINT); `cairl train --resume` continues. A second
signal exits at once: every run file is written so that a kill at any instant leaves it consistent
(fsynced appends, torn tails cut on open, atomic replaces, Orbax's rename-on-commit).
"""

from __future__ import annotations

import logging
import os
import signal
import sys

log = logging.getLogger(__name__)

EXIT_CODES = {signal.SIGTERM: 0, signal.SIGINT: 130}


class StopRequested(Exception):
    """Raised at a safe point after a stop signal, once the current stage's state is saved."""

    def __init__(self, signum: int, where: str):
        self.signum, self.where = signum, where
        super().__init__(f"stopped by {signal.Signals(signum).name} {where}")

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.signum, 128 + self.signum)


_received: list[int] = []


def _handle(signum, frame) -> None:
    if _received:
        print(f"cairl: second {signal.Signals(signum).name}: exiting now; resume with cairl train --resume RUN_DIR",
              file=sys.stderr, flush=True)
        os._exit(EXIT_CODES.get(signum, 128 + signum))
    _received.append(signum)
    log.warning("%s received: saving a checkpoint at the next safe point, then exiting (signal again to exit at once)",
                signal.Signals(signum).name)


def install() -> None:
    """Handle SIGTERM and SIGINT in this (main) thread of the driver."""
    _received.clear()
    for signum in EXIT_CODES:
        signal.signal(signum, _handle)


def uninstall() -> None:
    """Restore the default handlers, unless a stop is under way: then a second signal during the rest of
    the exit path (Ray shutting down, files closing) must still exit at once with the stop's code."""
    if _received:
        return
    for signum in EXIT_CODES:
        signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)


def stop_requested() -> bool:
    return bool(_received)


def check(where: str) -> None:
    """At a safe point with nothing left to save: raise StopRequested if a stop signal came."""
    if _received:
        raise StopRequested(_received[0], where)
