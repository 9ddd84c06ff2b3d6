"""Read TensorBoard event files back (TFRecord framing + Event protos from tensorboardX), for tests."""

from __future__ import annotations

import struct
from pathlib import Path


def scalar_events(tb_dir: Path) -> list[tuple[str, int, float]]:
    """(tag, step, value) of every scalar event in every event file under `tb_dir`."""
    from tensorboardX.proto.event_pb2 import Event

    out = []
    for path in sorted(Path(tb_dir).rglob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            body = data[pos + 12:pos + 12 + length]
            pos += 12 + length + 4
            event = Event.FromString(body)
            for value in event.summary.value:
                out.append((value.tag, int(event.step), float(value.simple_value)))
    return out
