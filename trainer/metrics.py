"""Run metrics: `metrics.jsonl` (one JSON object per logged step) and TensorBoard under `tb/`.

    log = MetricsLog(run_dir)
    log.write("ppo", step=3, metrics={"reward_mean": 0.4, "kl": 0.02})
    # metrics.jsonl: {"stage": "ppo", "step": 3, "time": ..., "ppo/reward_mean": 0.4, "ppo/kl": 0.02}

On resume, `truncate(stage, after_step)` drops the lines an interrupted stage logged past its last
checkpoint, so every (stage, step) appears once in the finished file.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

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

    def _writer(self):
        if self._tb is None and self._tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(self._tb_dir), flush_secs=10)
        return self._tb

    def write(self, stage: str, step: int, metrics: dict) -> dict:
        record = {"stage": stage, "step": int(step), "time": round(time.time(), 3)}
        record.update({f"{stage}/{k}": _plain(v) for k, v in metrics.items()})
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        writer = self._writer()
        if writer is not None:
            for name, value in record.items():
                if "/" in name and value is not None:
                    writer.add_scalar(name, value, int(step))
        return record

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
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        os.replace(tmp, self.path)
        return dropped

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
