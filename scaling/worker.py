"""The entry point of every process a launcher starts: ``python -m scaling.worker``.

The launcher passes the RunConfig and the process's place in the world through the environment
(torchrun's names: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), so the same worker
also runs under torchrun or any scheduler that sets them. Rank 0 writes the raw result to
``$PODSCALE_RUN_DIR/result.json``; the process then leaves through ``os._exit`` because gloo's
teardown aborts a fraction of clean exits (PLATFORM_NOTES).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import traceback

from scaling.config import RunConfig
from scaling.context import WorkerContext, write_result


def die_with_launcher() -> None:
    """A rank must not outlive the launcher that started it, however the launcher died (``kill -9``,
    the OOM killer, a CI timeout): the kernel kills this process when its parent dies (Linux
    ``PR_SET_PDEATHSIG``), and a watcher thread covers the rest (a parent in between, as under
    torchrun, and systems without prctl) by checking the launcher's pid twice a second."""
    pid = int(os.environ.get("PODSCALE_LAUNCHER_PID", "0"))
    if not pid:
        return  # started by someone else (Ray, a scheduler): they own the lifetime
    parent = os.getppid()
    if parent == pid and sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if not _alive(pid):
        os._exit(3)

    def watch() -> None:
        while os.getppid() == parent and _alive(pid):
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="podscale-launcher-watch", daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def main() -> None:
    die_with_launcher()
    code = 0
    cfg: RunConfig | None = None
    ctx: WorkerContext | None = None
    try:
        from scaling.backends import get_backend

        cfg = RunConfig.from_json(os.environ["PODSCALE_CONFIG"])
        ctx = WorkerContext.from_env()
        if cfg.script:
            from scaling import script

            raw = script.run(cfg, ctx)
        else:
            raw = get_backend(cfg.backend).worker(cfg, ctx)
        if raw is not None and ctx.run_dir is not None:
            write_result(ctx.run_dir, raw)
    except BaseException as e:  # noqa: BLE001 - the supervisor reports the rank; here we say why
        from scaling.script import write_error

        rank = int(os.environ.get("RANK", "0"))
        code = write_error(ctx.run_dir if ctx else None, rank, e, user_code=bool(cfg and cfg.script))
        if code == 1 and not (cfg and cfg.script):
            print(f"podscale worker rank {rank}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        if os.environ.get("PODSCALE_DEBUG"):
            traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
