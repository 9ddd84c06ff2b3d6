"""The driver's watch over the learner actor: every call timed, a hung learner stopped, a dead one reported.

    learner = LearnerWatch(handle, timeout_s=config.ray.learner_timeout_s)
    ray.get(learner.train_step.remote())      # used exactly like the actor handle
    ...
    except Exception as err: raise learner.explain_failure(err)   # what happened, in words, with the original error

Each `.remote()` call is registered with its start time; a watcher thread kills the actor when a call runs
past `timeout_s`. The kill makes the `ray.get` the driver is blocked in fail at once with an actor error,
so a hung learner (a deadlock, a wedged collective) stops the run instead of hanging it forever, and the
driver's usual clean-up (Ray shut down, run files closed) runs. `explain_failure` turns the actor
errors into a LearnerError naming the call, the timeout or the learner's own error.
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
    def __init__(self, handle, timeout_s: float, poll_s: float = 0.5):
        self.handle = handle
        self.timeout_s = timeout_s
        self.timed_out: tuple[str, float] | None = None  # (method, seconds) of the call that was stopped
        self._calls: dict = {}  # ObjectRef -> (method, start time)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, args=(poll_s,), name="cairl-learner-watch", daemon=True)
        self._thread.start()

    def __getattr__(self, method: str):
        # Only names this class does not define reach here: the learner's methods (its own are not named like them).
        return _TimedMethod(self, method)

    def _track(self, ref, method: str) -> None:
        with self._lock:
            self._calls[ref] = (method, time.monotonic())

    def _watch(self, poll_s: float) -> None:
        import ray

        while not self._stop.wait(poll_s):
            with self._lock:
                calls = dict(self._calls)
            if not calls:
                continue
            done, _ = ray.wait(list(calls), num_returns=len(calls), timeout=0)
            now = time.monotonic()
            with self._lock:
                for ref in done:
                    self._calls.pop(ref, None)
            late = [(method, now - start) for ref, (method, start) in calls.items()
                    if ref not in done and now - start > self.timeout_s]
            if late and self.timed_out is None:
                self.timed_out = late[0]
                log.error("learner call %s running %.0f s > ray.learner_timeout_s = %g s: stopping the learner",
                          late[0][0], late[0][1], self.timeout_s)
                ray.kill(self.handle, no_restart=True)

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
        if isinstance(err, rex.RayActorError) and getattr(err, "actor_id", None) in (None, self.handle._actor_id.hex()):
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
        ref = getattr(self._watch.handle, self._method).remote(*args, **kwargs)
        self._watch._track(ref, self._method)
        return ref
