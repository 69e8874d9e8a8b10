"""TensorBoard as the metrics sink: real event files that a real ``tensorboard`` server reads.

Written with the tensorboard package's own event writer and protos, so neither torch nor
TensorFlow is needed (Colab's JAX-only path and the jax backends write the same files).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Mapping, Sequence


def write_scalars(logdir: str | Path, series: Mapping[str, Sequence[float | None]], first_step: int = 1,
                  text: Mapping[str, str] | None = None) -> Path:
    """One event file in ``logdir`` holding each series as a scalar tag, one value per step.

    ``None`` values (e.g. MFU of an unknown chip, untimed steps) are skipped, not written as 0.
    """
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    logdir = Path(logdir)
    logdir.mkdir(parents=True, exist_ok=True)
    w = EventFileWriter(str(logdir))
    now = time.time()
    n = max((len(v) for v in series.values()), default=0)
    for i in range(n):
        values = [Summary.Value(tag=tag, simple_value=float(v[i])) for tag, v in series.items() if i < len(v) and v[i] is not None]
        if values:
            w.add_event(Event(wall_time=now, step=first_step + i, summary=Summary(value=values)))
    if text:
        from tensorboard.plugins.text.summary_v2 import text_pb

        for tag, body in text.items():
            w.add_event(Event(wall_time=now, step=0, summary=text_pb(tag, body)))
    w.flush()
    path = Path(w.get_logdir())
    w.close()
    return path


def write_points(logdir: str | Path, points: Mapping[str, Sequence[tuple[int, float]]]) -> Path:
    """One event file with each tag's (step, value) points, at the steps they were logged."""
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    Path(logdir).mkdir(parents=True, exist_ok=True)
    w = EventFileWriter(str(logdir))
    now = time.time()
    for tag, pts in points.items():
        for step, value in pts:
            w.add_event(Event(wall_time=now, step=int(step), summary=Summary(value=[Summary.Value(tag=tag, simple_value=float(value))])))
    w.flush()
    path = Path(w.get_logdir())
    w.close()
    return path


def read_scalars(logdir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Read every scalar back (tests and ``scale`` summaries use this)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
