"""Per-rank heartbeats that a supervisor can read without any collective.

A memory-mapped file of (step, wall time) per rank: a write is a store into shared memory (no
syscall), cheap enough to do every step, and readable by a watchdog in another process even when
every rank is stuck inside a collective.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np


class Progress:
    def __init__(self, path: str | Path, world: int, create: bool = False):
        mode = "w+" if create else "r+"
        self.arr = np.memmap(path, dtype=np.float64, mode=mode, shape=(world, 2))
        if create:
            self.arr[:] = 0.0
            self.arr.flush()

    def beat(self, rank: int, step: int) -> None:
        self.arr[rank, 0] = step
        self.arr[rank, 1] = time.time()

    def steps(self) -> np.ndarray:
        return np.array(self.arr[:, 0])

    def last_beat(self) -> float:
        return float(self.arr[:, 1].max())


def from_env(rank: int, world: int) -> Progress | None:
    path = os.environ.get("PODSCALE_PROGRESS")
    return Progress(path, world) if path else None
