"""Run metrics: `metrics.jsonl` (one JSON object per logged step) and TensorBoard under `tb/`.

    log = MetricsLog(run_dir)
    log.write("ppo", step=3, metrics={"reward_mean": 0.4, "kl": 0.02})
    # metrics.jsonl: {"stage": "ppo", "step": 3, "time": ..., "ppo/reward_mean": 0.4, "ppo/kl": 0.02}

Every (stage, step) appears exactly once, whatever kills the run:
- a line torn by a crash mid-write is cut off on open (as the prompt ledger does);
- a stage that resumes from a checkpoint older than its last logged step logs those steps again: writing a
  step that is already there first drops that stage's rows from that step on (`truncate`), so the redone
  steps replace the lost ones;
- TensorBoard's event files are append-only and flushed in the background, so after a kill they may hold
  rows past the last checkpoint or miss the last ones. metrics.jsonl is the record; `tb/` is a view of it,
  rebuilt from it when a run reopens and after every truncation.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

from trainer.durable import append_line, cut_torn_tail, write_atomic
from trainer.ledger import read_records


def _plain(value):
    value = float(value)
    return value if math.isfinite(value) else None


class MetricsLog:
    def __init__(self, run_dir: Path, tensorboard: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tb_dir = Path(run_dir) / "tb"
        self._tb = None
        self._tensorboard = tensorboard
        cut_torn_tail(self.path)
        self._last_step: dict[str, int] = {}  # stage -> highest step in metrics.jsonl
        records = read_records(self.path)
        for record in records:
            self._note(record)
        if records or self._tb_dir.exists():
            self._rebuild_tensorboard(records)

    def _note(self, record: dict) -> None:
        stage, step = record.get("stage"), int(record.get("step", 0))
        self._last_step[stage] = max(step, self._last_step.get(stage, step))

    def _writer(self):
        if self._tb is None and self._tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(self._tb_dir), flush_secs=10)
        return self._tb

    def write(self, stage: str, step: int, metrics: dict) -> dict:
        return self.write_row(stage, step, {f"{stage}/{k}": _plain(v) for k, v in metrics.items()})

    def write_row(self, stage: str, step: int, fields: dict) -> dict:
        """A row of JSON-serialisable `fields` as they are (write() names and converts metrics first)."""
        step = int(step)
        if step <= self._last_step.get(stage, -1):
            self.truncate(stage, step - 1)  # a resumed stage redoes the steps past its checkpoint
        record = {"stage": stage, "step": step, "time": round(time.time(), 3), **fields}
        append_line(self.path, json.dumps(record) + "\n")
        self._note(record)
        self._add_to_tensorboard(record)
        return record

    def _add_to_tensorboard(self, record: dict) -> None:
        writer = self._writer()
        if writer is not None:
            for name, value in record.items():
                if "/" in name and isinstance(value, (int, float)) and not isinstance(value, bool):
                    writer.add_scalar(name, value, int(record["step"]))

    def _rebuild_tensorboard(self, records: list[dict]) -> None:
        """Rewrite tb/ from `records`: one event per (stage, step, metric), nothing else."""
        if not self._tensorboard:
            return
        self.close()
        shutil.rmtree(self._tb_dir, ignore_errors=True)
        for record in records:
            self._add_to_tensorboard(record)
        if self._tb is not None:
            self._tb.flush()

    def records(self, stage: str | None = None) -> list[dict]:
        return [r for r in read_records(self.path) if stage is None or r.get("stage") == stage]

    def truncate(self, stage: str, after_step: int) -> int:
        """Remove `stage` lines with step > `after_step` (and any torn line); returns how many went."""
        if not self.path.exists():
            return 0
        kept, dropped = [], 0
        for record in read_records(self.path):
            if record.get("stage") == stage and record.get("step", 0) > after_step:
                dropped += 1
            else:
                kept.append(record)
        if dropped:
            write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
            self._last_step = {}
            for record in kept:
                self._note(record)
            self._rebuild_tensorboard(kept)
        return dropped

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
