"""The entry point of every process a launcher starts: ``python -m scaling.worker``.

The launcher passes the RunConfig and the process's place in the world through the environment
(torchrun's names: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), so the same worker
also runs under torchrun or any scheduler that sets them. Rank 0 writes the raw result to
``$PODSCALE_RUN_DIR/result.json``; the process then leaves through ``os._exit`` because gloo's
teardown aborts a fraction of clean exits (PLATFORM_NOTES).
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scaling.config import RunConfig
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


def main() -> None:
    code = 0
    try:
        from scaling.backends import get_backend

        cfg = RunConfig.from_json(os.environ["PODSCALE_CONFIG"])
        ctx = WorkerContext.from_env()
        raw = get_backend(cfg.backend).worker(cfg, ctx)
        if raw is not None and ctx.run_dir is not None:
            write_result(ctx.run_dir, raw)
    except BaseException as e:  # noqa: BLE001 - the supervisor reports the rank; here we say why
        code = 1
        print(f"podscale worker rank {os.environ.get('RANK', '0')}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        if os.environ.get("PODSCALE_DEBUG"):
            traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
