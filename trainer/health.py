"""The driver's watch over the learner actors: every call timed, a hung learner stopped, a dead one reported.

    learner = LearnerWatch([handle, ...], timeout_s=config.ray.learner_timeout_s)
    ray.get(learner.train_step.remote())      # used exactly like the actor handle
    ...
    except Exception as err: raise learner.explain_failure(err)   # what happened, in words, with the original error

Each `.remote()` call is registered with its start time; a watcher thread kills the actor when a call runs
past `timeout_s`. The kill makes the `ray.get` the driver is blocked in fail at once with an actor error,
so a hung learner (a deadlock, a wedged collective) stops the run instead of hanging it forever, and the
driver's usual clean-up (Ray shut down, run files closed) runs. `explain_failure` turns the actor
errors into a LearnerError naming the call, the timeout or the learner's own error.

A learner group (trainer/learner_group.py) is watched as one: each call goes to every learner (its
arguments put in the object store once) and the driver gets learner 0's result. When any other
learner dies, or fails a call that learner 0 has not finished a few seconds later (it is then waiting
for the failed one in a collective), every learner is stopped, so the driver never waits on a group
that cannot finish.
"""

from __future__ import annotations

import logging
import threading
import time

from models.errors import UserError

log = logging.getLogger(__name__)


class LearnerError(UserError, RuntimeError):
    """The learner actor died or ran past ray.learner_timeout_s; the run stopped."""


class LearnerWatch:
    GRACE_S = 10.0  # how long learner 0 may still run after another learner's call failed

    def __init__(self, handles, timeout_s: float, poll_s: float = 0.5):
        self.handles = list(handles) if isinstance(handles, (list, tuple)) else [handles]
        self.handle = self.handles[0]
        self.timeout_s = timeout_s
        self.timed_out: tuple[str, float] | None = None  # (method, seconds) of the call that was stopped
        self.peer_failed: tuple[int, str, BaseException] | None = None  # (learner, method, error) of a group member
        self._calls: dict = {}  # ObjectRef -> (method, start time, learner index, learner 0's ref)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, args=(poll_s,), name="cairl-learner-watch", daemon=True)
        self._thread.start()

    def __getattr__(self, method: str):
        # Only names this class does not define reach here: the learner's methods (its own are not named like them).
        return _TimedMethod(self, method)

    def each(self, method: str, *args) -> list:
        """`method(*args)` on every learner, watched like any call: one ref per learner, in order."""
        refs = [getattr(h, method).remote(*args) for h in self.handles]
        self._track(refs, method)
        return refs

    def _track(self, refs: list, method: str) -> None:
        with self._lock:
            for index, ref in enumerate(refs):
                self._calls[ref] = (method, time.monotonic(), index, refs[0])

    def _kill_all(self) -> None:
        import ray

        for handle in self.handles:
            ray.kill(handle, no_restart=True)

    def _watch(self, poll_s: float) -> None:
        import ray

        failed_at = None  # when a peer's call failed (monotonic)
        while not self._stop.wait(poll_s):
            with self._lock:
                calls = dict(self._calls)
            if not calls:
                continue
            done, _ = ray.wait(list(calls), num_returns=len(calls), timeout=0)
            now = time.monotonic()
            for ref in done:
                method, _, index, first = calls[ref]
                if index and self.peer_failed is None:
                    try:
                        ray.get(ref, timeout=0)
                    except Exception as err:  # noqa: BLE001 - any failure of a peer stops the group below
                        self.peer_failed, failed_at = (index, method, err), now
                        log.error("learner %d failed in %s: %s", index, method, str(err).splitlines()[0][:300])
                        first_done = first in done
                        if isinstance(err, ray.exceptions.RayActorError) and not first_done:
                            self._kill_all()
            with self._lock:
                for ref in done:
                    self._calls.pop(ref, None)
            if failed_at is not None and now - failed_at > self.GRACE_S and any(
                    index == 0 for _, _, index, _ in self._calls.values()):
                failed_at = None
                self._kill_all()  # learner 0 is waiting for the failed learner in a collective
            late = [(method, now - start) for ref, (method, start, _, _) in calls.items()
                    if ref not in done and now - start > self.timeout_s]
            if late and self.timed_out is None:
                self.timed_out = late[0]
                log.error("learner call %s running %.0f s > ray.learner_timeout_s = %g s: stopping the learner",
                          late[0][0], late[0][1], self.timeout_s)
                self._kill_all()

    def _await_peer_failure(self, wait_s: float) -> None:
        """Record the failure of another learner's call, if one fails within `wait_s`.

        When a peer process dies, learner 0's collective (a checkpoint's barrier, an all-gather) fails at
        once with a transport error, often before the watcher thread has seen the peer's call fail. That
        transport error says nothing useful; the peer's death does, so it is looked for here directly."""
        import ray

        with self._lock:
            pending = {ref: (method, index) for ref, (method, _, index, _) in self._calls.items() if index}
        deadline = time.monotonic() + wait_s
        while pending and self.peer_failed is None and (left := deadline - time.monotonic()) > 0:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=left)
            for ref in done:
                method, index = pending.pop(ref)
                try:
                    ray.get(ref, timeout=0)
                except Exception as cause:  # noqa: BLE001 - which failure it was is what gets reported
                    with self._lock:
                        if self.peer_failed is None:
                            self.peer_failed = (index, method, cause)

    def stop_watching(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def explain_failure(self, err: BaseException) -> BaseException:
        """The error to stop the run with for `err`, raised by a ray.get on one of this learner's calls."""
        import ray.exceptions as rex

        if self.timed_out is not None:
            method, seconds = self.timed_out
            return LearnerError(
                f"the learner's {method} call ran {seconds:.0f} s, past ray.learner_timeout_s = {self.timeout_s:g} s, "
                f"and the learner was stopped. Raise ray.learner_timeout_s if the call is just slow (large models "
                f"compile for minutes), then resume with cairl train --resume RUN_DIR")
        if isinstance(err, rex.RayTaskError) and isinstance(getattr(err, "cause", None), UserError):
            return err.cause  # the learner found a user problem (e.g. diverged training): its own message
        if isinstance(err, rex.OutOfMemoryError):  # Ray's memory monitor killed the learner: the machine's memory, not a bug
            first = (str(err).strip().splitlines() or [""])[0][:300]
            return LearnerError(
                f"Ray stopped the learner because the machine ran out of memory ({first}). Free memory (another "
                f"run or program on this machine?) or shrink the run (batch sizes, max_seq_len, model.remat: true, "
                f"fewer rollout workers), then resume with cairl train --resume RUN_DIR")
        if len(self.handles) > 1 and isinstance(err, (rex.RayActorError, rex.RayTaskError)):
            self._await_peer_failure(self.GRACE_S)
        if self.peer_failed is not None and isinstance(err, (rex.RayActorError, rex.RayTaskError)):
            index, method, cause = self.peer_failed
            if isinstance(cause, rex.RayTaskError) and isinstance(getattr(cause, "cause", None), UserError):
                return cause.cause
            first = (str(cause).strip().splitlines() or [""])[0][:500]
            return LearnerError(
                f"learner {index} of {len(self.handles)} failed in its {method} call ({type(cause).__name__}: {first}); "
                f"every learner was stopped and the run stopped. Its log is in the Ray session logs (worker-*.err) of "
                f"its host; after fixing the cause, resume with cairl train --resume RUN_DIR")
        ids = [h._actor_id.hex() for h in self.handles]
        if isinstance(err, rex.RayActorError) and getattr(err, "actor_id", None) in (None, *ids):
            first = (str(err).strip().splitlines() or [""])[0][:500]
            return LearnerError(
                f"the learner actor died ({type(err).__name__}: {first}); the run stopped. The learner's own log is in "
                f"the Ray session logs (worker-*.err); after fixing the cause (memory?), resume with cairl train "
                f"--resume RUN_DIR")
        return err


class _TimedMethod:
    def __init__(self, watch: LearnerWatch, method: str):
        self._watch, self._method = watch, method

    def remote(self, *args, **kwargs):
        handles = self._watch.handles
        if len(handles) > 1:  # one copy of each argument in the object store, read by every learner
            import ray

            args = tuple(ray.put(a) for a in args)
            kwargs = {k: ray.put(v) for k, v in kwargs.items()}
        refs = [getattr(h, self._method).remote(*args, **kwargs) for h in handles]
        self._watch._track(refs, self._method)
        return refs[0]
