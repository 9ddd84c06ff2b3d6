"""Driver-side dispatch of prompt batches to rollout workers, exactly once per uid.

    pool = WorkerPool(handles, names, timeout_s=600, max_staleness=1, max_restarts=3)
    pool.run(ledger, make_task, on_record, current_version=lambda: version, batch_size=8)

Every idle worker gets the next pending uids of the ledger. When a task returns, each record goes
to `on_record(uid, record, result)` (which completes the uid in the ledger). Failure handling:
  * worker died (os._exit, OOM, node loss): its uids go back to pending; Ray restarts the actor
    (`max_restarts`) and it gets no task until it answers a readiness probe;
  * worker hung (task running longer than `timeout_s`): the actor is killed with restart allowed and
    treated as dead. The clock starts when a task is sent to a worker known to be up (every worker is
    probed before its first task and after every restart), so a slow actor start-up never counts
    against a task;
  * stale result (sampled with weights more than `max_staleness` versions behind): dropped and
    counted, its uids re-dispatched;
  * a task that raises an ordinary exception is a bug or bad input: the run stops with it.
A worker that died more than `max_restarts` times is retired; with none left the run stops.

Colocated (rollout.colocated) the one "worker" is the learner actor, through the driver's LearnerWatch
(trainer/health.py): `timeout_s` is infinite (the watch stops a call running past ray.learner_timeout_s)
and with `deaths_fatal` a death is raised as it is, for the watch to explain — a learner is not restarted.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

from models.errors import UserError
from trainer import signals
from trainer.ledger import Ledger

log = logging.getLogger(__name__)


class WorkersLostError(UserError, RuntimeError):
    """Every rollout worker died more often than allowed."""


@dataclasses.dataclass
class DispatchStats:
    tasks: int = 0
    worker_deaths: int = 0  # tasks lost to a dead or restarting worker
    timeouts: int = 0
    stale_dropped: int = 0  # uids whose results were dropped as too old
    redispatched: int = 0  # uids sent again after a death, timeout or staleness

    generated_tokens: int = 0
    seconds: float = 0.0
    sync_seconds: float = 0.0  # workers bringing their policy to a new weight version


def _is_permanent_death(err: BaseException) -> bool:
    """ActorDiedError: Ray will not restart it (restarts used up); anything else may come back."""
    import ray.exceptions as rex

    kind = getattr(rex, "ActorDiedError", None)
    return kind is not None and isinstance(err, kind) and not isinstance(
        err, getattr(rex, "ActorUnavailableError", ()))


def _is_actor_death(err: BaseException) -> bool:
    import ray.exceptions as rex

    kinds = tuple(k for k in (getattr(rex, "RayActorError", None), getattr(rex, "ActorDiedError", None),
                              getattr(rex, "ActorUnavailableError", None), getattr(rex, "WorkerCrashedError", None),
                              getattr(rex, "ObjectLostError", None)) if k is not None)
    return isinstance(err, kinds)


class WorkerPool:
    def __init__(self, handles: list, names: list[str], timeout_s: float, max_staleness: int, max_restarts: int,
                 deaths_fatal: bool = False):
        self.handles = list(handles)
        self.deaths_fatal = deaths_fatal
        self.names = list(names)
        self.timeout_s = timeout_s
        self.max_staleness = max_staleness
        self.max_restarts = max_restarts
        self.deaths = [0] * len(handles)
        self.retired: set[int] = set()
        self.stats = DispatchStats()

    def _alive(self) -> list[int]:
        return [i for i in range(len(self.handles)) if i not in self.retired]

    def run(self, ledger: Ledger, make_task: Callable[[list[str]], object],
            on_record: Callable[[str, dict, object], None], current_version: Callable[[], int],
            batch_size: int, progress=None) -> DispatchStats:
        import ray

        start = time.perf_counter()
        in_flight: dict = {}  # ObjectRef -> (worker index, uids, dispatch time)
        killed: set = set()
        idle = set(self._alive())
        starting = {w: self._probe(w) for w in idle}  # worker -> readiness probe; no task until it answers
        while not ledger.finished:
            signals.check(f"while dispatching {ledger.path.name}")  # completed uids are durable: nothing to save
            self._collect_probes(starting)
            idle -= self.retired
            for w in sorted(idle):
                if w in starting:
                    continue
                uids = ledger.take(batch_size, worker=self.names[w])
                if not uids:
                    break
                ref = self.handles[w].run.remote(make_task(uids))
                in_flight[ref] = (w, uids, time.monotonic())
                idle.discard(w)
                self.stats.tasks += 1
            if not in_flight:
                if ledger.finished:
                    break
                if starting:
                    ray.wait(list(starting.values()), num_returns=1, timeout=1.0)
                if not self._alive():
                    raise WorkersLostError(
                        f"every rollout worker died more than rollout.max_restarts = {self.max_restarts} times; "
                        f"{len(ledger.pending)} prompts of {ledger.path.name} are not done (see the Ray logs)")
                continue
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=1.0)
            for ref in ready:
                w, uids, _ = in_flight.pop(ref)
                killed.discard(ref)
                try:
                    result = ray.get(ref)
                except Exception as err:  # noqa: BLE001 - sorted into deaths vs real errors below
                    if not _is_actor_death(err):
                        cause = getattr(err, "cause", None)
                        if isinstance(cause, UserError):
                            raise cause from None  # bad input found on a worker: the user's message, no traceback
                        raise
                    if self.deaths_fatal:
                        raise
                    self._on_death(w, uids, ledger, err)
                    if w not in self.retired:
                        idle.add(w)
                        starting[w] = self._probe(w)  # Ray is restarting it
                    continue
                idle.add(w)
                self._accept(result, uids, ledger, on_record, current_version(), progress)
            now = time.monotonic()
            for ref, (w, uids, t0) in in_flight.items():
                if ref not in killed and now - t0 > self.timeout_s:
                    log.warning("%s: task of %d prompts running %.0f s > rollout.task_timeout_s; killing the worker",
                                self.names[w], len(uids), now - t0)
                    self.stats.timeouts += 1
                    killed.add(ref)
                    ray.kill(self.handles[w], no_restart=False)
        self.stats.seconds += time.perf_counter() - start
        return self.stats

    def _probe(self, w: int):
        """A no-op call that returns once worker `w`'s actor is up (after a start or a restart)."""
        return self.handles[w].__ray_ready__.remote()

    def _collect_probes(self, starting: dict) -> None:
        """Drop answered probes (those workers may get tasks); re-probe one that hit a restart in progress."""
        import ray

        ready, _ = ray.wait(list(starting.values()), num_returns=len(starting), timeout=0) if starting else ([], [])
        for w, ref in list(starting.items()):
            if ref not in ready:
                continue
            try:
                ray.get(ref)
                del starting[w]
            except Exception as err:  # noqa: BLE001 - the actor is restarting, or gone for good
                if not _is_actor_death(err) or _is_permanent_death(err):
                    self.retired.add(w)
                    del starting[w]
                    log.warning("%s did not come back (%s); retired", self.names[w], type(err).__name__)
                else:
                    time.sleep(0.05)
                    starting[w] = self._probe(w)

    def _on_death(self, w: int, uids: list[str], ledger: Ledger, err: BaseException) -> None:
        self.deaths[w] += 1
        self.stats.worker_deaths += 1
        back = ledger.release(uids)
        self.stats.redispatched += len(back)
        log.warning("%s died (%s); %d prompts go back to the queue", self.names[w], type(err).__name__, len(back))
        if self.deaths[w] > self.max_restarts + 1 or _is_permanent_death(err):
            self.retired.add(w)
            log.warning("%s retired after %d deaths", self.names[w], self.deaths[w])

    def _accept(self, result, uids: list[str], ledger: Ledger, on_record, version: int, progress) -> None:
        if result.version < version - self.max_staleness:
            self.stats.stale_dropped += len(uids)
            self.stats.redispatched += len(ledger.release(uids))
            log.info("dropped %d results of weight version %d (current %d, max_staleness %d)",
                     len(uids), result.version, version, self.max_staleness)
            return
        self.stats.generated_tokens += int(getattr(result, "tokens", 0))
        self.stats.sync_seconds += float(getattr(result, "sync_seconds", 0.0))
        missing = [u for u in uids if u not in result.records]
        for uid in uids:
            if uid in result.records:
                on_record(uid, result.records[uid], result)
                if progress is not None:
                    progress.update(1)
        if missing:
            self.stats.redispatched += len(ledger.release(missing))
