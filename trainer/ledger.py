"""The prompt ledger: every prompt uid of a stage dispatched and completed exactly once.

    ledger = Ledger.open(run_dir / "samples" / "sl.jsonl", uids)   # resumes from the records file
    batch = ledger.take(8, worker="w0")      # pending → in flight
    ledger.complete(uid, record)             # appends {"uid": ..., **record} durably; False if duplicate
    ledger.release(worker="w0")              # worker died: its in-flight uids go back to pending

The stage's records file *is* the ledger's durable state: one JSON line per completed uid, written
with flush + fsync, so a uid is complete exactly when its record line is on disk — there is no
window in which one is written and the other is not. A line torn by a crash is cut off on open.
In-flight bookkeeping lives in memory only: after a restart, everything not completed is pending.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from models.errors import UserError
from trainer.durable import append_line, cut_torn_tail, write_atomic


class LedgerError(UserError, RuntimeError):
    """A records file that does not belong to this stage's prompts."""


def read_records(path: Path) -> list[dict]:
    """Complete JSON lines of a records file (a torn last line is ignored)."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records


class Ledger:
    def __init__(self, path: Path, uids: Sequence[str], done: Iterable[str] = ()):
        self.path = Path(path)
        if len(set(uids)) != len(uids):
            raise LedgerError(f"{path}: prompt uids are not unique")
        self.uids = list(uids)
        self.done: set[str] = set(done)
        self._pending: OrderedDict[str, None] = OrderedDict((u, None) for u in self.uids if u not in self.done)
        self.in_flight: dict[str, tuple[str, float]] = {}  # uid -> (worker, dispatch time)
        self.duplicates = 0  # completions that arrived for uids already complete (dropped)
        self.dispatches = 0

    @classmethod
    def open(cls, path: Path, uids: Sequence[str], strict: bool = True) -> "Ledger":
        """A ledger over `uids`, with every uid already recorded in `path` complete.

        strict: a record of a uid outside `uids` is an error (the file belongs to other prompts);
        False lets several ledgers share one file (PPO: one ledger per iteration, uids 'it<k>/<uid>').
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        cut_torn_tail(path)
        known = set(uids)
        done = []
        for record in read_records(path):
            uid = record.get("uid")
            if uid not in known:
                if not strict:
                    continue
                raise LedgerError(
                    f"{path} holds a record for prompt uid {uid!r}, which is not among this stage's prompts; "
                    f"the run directory was made with other prompts — start a new run name")
            done.append(uid)
        return cls(path, uids, done)

    # -------------------------------------------------------------------------------- dispatch

    @property
    def finished(self) -> bool:
        return len(self.done) == len(self.uids)

    @property
    def pending(self) -> list[str]:
        return list(self._pending)

    def take(self, n: int, worker: str) -> list[str]:
        """Up to `n` pending uids, now in flight on `worker`."""
        batch = []
        while self._pending and len(batch) < n:
            uid, _ = self._pending.popitem(last=False)
            self.in_flight[uid] = (worker, time.monotonic())
            batch.append(uid)
        self.dispatches += len(batch)
        return batch

    def release(self, uids: Iterable[str] | None = None, worker: str | None = None) -> list[str]:
        """Return in-flight uids (given ones, or all of `worker`'s) to the front of the pending queue."""
        if uids is None:
            uids = [u for u, (w, _) in self.in_flight.items() if w == worker]
        back = [u for u in uids if u in self.in_flight and u not in self.done]
        for uid in back:
            del self.in_flight[uid]
        for uid in reversed(back):
            self._pending[uid] = None
            self._pending.move_to_end(uid, last=False)
        return back

    def complete(self, uid: str, record: dict[str, Any]) -> bool:
        """Durably record `uid` as complete; False (and nothing written) if it already was."""
        if uid in self.done:
            self.duplicates += 1
            return False
        if uid not in self.in_flight and uid not in self._pending:
            raise LedgerError(f"{self.path}: completion for unknown prompt uid {uid!r}")
        line = json.dumps({"uid": uid, **record}, ensure_ascii=False) + "\n"
        append_line(self.path, line)
        self.done.add(uid)
        self.in_flight.pop(uid, None)
        self._pending.pop(uid, None)
        return True

    def records(self) -> list[dict]:
        return read_records(self.path)


def truncate_records(path: Path, keep) -> int:
    """Rewrite a records file keeping only the records `keep(record)` accepts; returns how many went."""
    path = Path(path)
    if not path.exists():
        return 0
    records = read_records(path)
    kept = [r for r in records if keep(r)]
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))
    return len(records) - len(kept)
