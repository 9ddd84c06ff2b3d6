"""Which stages of a run are finished: <run>/stages.json, rewritten atomically and durably after each stage.

A stage is marked done only after its outputs are durable (samples file complete, stage-final
checkpoint committed), so a resumed run skips exactly the finished stages.
"""

from __future__ import annotations

import json
from pathlib import Path

from trainer.durable import write_atomic


class StageRecord:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "stages.json"

    def read(self) -> dict:
        if not self.path.exists():
            return {}
        return json.loads(self.path.read_text(encoding="utf-8"))

    def done(self, stage: str) -> bool:
        return bool(self.read().get(stage, {}).get("done"))

    def info(self, stage: str) -> dict:
        return self.read().get(stage, {})

    def update(self, stage: str, **info) -> None:
        data = self.read()
        data.setdefault(stage, {}).update(info)
        write_atomic(self.path, json.dumps(data, indent=2, sort_keys=True) + "\n")
