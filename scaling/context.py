"""A rank's place in the world, read from what its launcher set (torchrun's names: RANK,
WORLD_SIZE, LOCAL_RANK), and the one file through which rank 0 hands back its raw result.

A leaf module: the worker entry point and the backends both use it, and neither imports the other.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scaling.progress import Progress


@dataclass
class WorkerContext:
    rank: int
    world: int
    local_rank: int
    run_dir: Path | None
    progress: Progress | None

    def beat(self, step: int) -> None:
        if self.progress is not None:
            self.progress.beat(self.rank, step)

    @classmethod
    def from_env(cls) -> WorkerContext:
        rank = int(os.environ.get("RANK", "0"))
        world = int(os.environ.get("WORLD_SIZE", "1"))
        run_dir = os.environ.get("PODSCALE_RUN_DIR")
        prog = os.environ.get("PODSCALE_PROGRESS")
        return cls(
            rank=rank,
            world=world,
            local_rank=int(os.environ.get("LOCAL_RANK", str(rank))),
            run_dir=Path(run_dir) if run_dir else None,
            progress=Progress(prog, world) if prog else None,
        )


def write_result(run_dir: Path, raw: dict[str, Any]) -> None:
    tmp = run_dir / "result.json.tmp"
    tmp.write_text(json.dumps(raw))
    os.replace(tmp, run_dir / "result.json")
