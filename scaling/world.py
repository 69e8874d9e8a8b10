"""Start a run's world on this host: N worker processes, supervised by a watchdog.

Workers share one new process group, so a single ``killpg(SIGKILL)`` ends every rank and anything
they started (multi-process gloo ignores SIGTERM while stuck in a collective). The watchdog reads
the ranks' heartbeats (``scaling.progress``) and ends the run, exit 3, when a rank dies or when no
rank advances for ``--step-timeout`` seconds: a dead or stuck rank never becomes a hang.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from scaling.backends import get_backend
from scaling.config import RunConfig
from scaling.errors import Diverged, RunFailed, UsageError, UserCodeFailed
from scaling.progress import Progress
from scaling.script import read_errors

POLL_S = 0.05


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _kill_group(procs: list[subprocess.Popen[bytes]]) -> None:
    if not procs:
        return
    try:
        os.killpg(procs[0].pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for p in procs:
        try:
            p.kill()
        except ProcessLookupError:
            pass
    for p in procs:
        p.wait()


def run_local(cfg: RunConfig, extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``cfg`` on this host and return rank 0's raw record (raises RunFailed on death/hang)."""
    backend = get_backend(cfg.backend)
    backend.validate(cfg)
    envs = backend.layout(cfg)
    world = len(envs)
    with tempfile.TemporaryDirectory(prefix="podscale-run-") as tmp:
        run_dir = Path(tmp)
        progress = Progress(run_dir / "progress", world, create=True)
        base = dict(os.environ)
        base.update(extra_env or {})
        base.update({
            "PODSCALE_CONFIG": cfg.to_json(),
            "PODSCALE_RUN_DIR": str(run_dir),
            "PODSCALE_PROGRESS": str(run_dir / "progress"),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port()),
            "WORLD_SIZE": str(world),
            "PYTHONUNBUFFERED": "1",
            "PODSCALE_LAUNCHER_PID": str(os.getpid()),  # the ranks die with it (scaling.worker)
        })
        base.setdefault("GLOO_SOCKET_IFNAME", "lo")  # gloo listens on loopback only
        # the worker's sys.path must not start with the current directory: a user's models.py or
        # scaling.py there would shadow podscale's packages (Python >= 3.11; the script's own
        # directory is put first by scaling.script, as `python train.py` does)
        base["PYTHONSAFEPATH"] = "1"
        root = str(Path(__file__).resolve().parent.parent)
        base["PYTHONPATH"] = root + (os.pathsep + base["PYTHONPATH"] if base.get("PYTHONPATH") else "")
        procs: list[subprocess.Popen[bytes]] = []
        previous = _on_sigterm_raise()
        try:
            for rank, env in enumerate(envs):
                e = {**base, **env, "RANK": str(rank), "LOCAL_RANK": str(rank)}
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "scaling.worker"], env=e,
                    process_group=0 if rank == 0 else procs[0].pid,
                ))
            _supervise(cfg, procs, progress, run_dir)
        except BaseException:
            _kill_group(procs)
            raise
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        result = run_dir / "result.json"
        if not result.exists():
            raise RunFailed("the run ended without a result from rank 0 (see the ranks' messages above)")
        raw = json.loads(result.read_text())
        params = run_dir / "final_params.npz"
        if params.exists() and cfg.params_out:
            Path(cfg.params_out).parent.mkdir(parents=True, exist_ok=True)
            os.replace(params, cfg.params_out) if _same_fs(params, cfg.params_out) else Path(cfg.params_out).write_bytes(params.read_bytes())
        return raw


class Terminated(BaseException):
    """SIGTERM reached the launcher: its ranks are killed before it leaves (they would outlive it)."""


def _on_sigterm_raise():  # type: ignore[no-untyped-def]
    """Turn SIGTERM into an exception so the ``except`` above kills the ranks' process group."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):  # type: ignore[no-untyped-def]
        raise Terminated(f"terminated by signal {signum}")

    return signal.signal(signal.SIGTERM, handler)


def _same_fs(a: Path, b: str) -> bool:
    try:
        return os.stat(a).st_dev == os.stat(Path(b).resolve().parent).st_dev
    except OSError:
        return False


def _supervise(cfg: RunConfig, procs: list[subprocess.Popen[bytes]], progress: Progress, run_dir: Path) -> None:
    world = len(procs)
    t_start = time.time()
    while True:
        codes = [p.poll() for p in procs]
        if any(c not in (None, 0) for c in codes):
            # a rank that dies takes its peers' collectives down within milliseconds, and they exit
            # with errors of their own: wait a moment, then name the root cause (a rank killed by a
            # signal, else the first rank that failed), not whichever peer the poll saw first
            time.sleep(0.5)
            codes = [p.poll() for p in procs]
            failed = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
            rank, code = next(((r, c) for r, c in failed if c < 0), failed[0])
            step = int(progress.steps()[rank])
            _kill_group(procs)
            if not any(c < 0 for _, c in failed):
                _raise_recorded(run_dir, world)
            others = f"; stopped the other {world - 1} rank(s)" if world > 1 else ""
            raise RunFailed(f"rank {rank} {_describe_exit(code)} at step {step} of {cfg.steps}{others}")
        if all(c == 0 for c in codes):
            return
        now = time.time()
        steps = progress.steps()
        if steps.max() == 0:
            if now - t_start > cfg.startup_timeout:
                _kill_group(procs)
                raise RunFailed(f"no rank finished its first step within --startup-timeout {cfg.startup_timeout:g}s; killed all {world} rank(s)")
        elif now - max(progress.last_beat(), t_start) > cfg.step_timeout:
            _kill_group(procs)
            lagging = [r for r in range(world) if steps[r] == steps.min()]
            raise RunFailed(
                f"no progress for {cfg.step_timeout:g}s (--step-timeout): rank(s) {lagging} stuck at step {int(steps.min())} "
                f"of {cfg.steps} (ranks at steps {[int(s) for s in steps]}); killed all {world} rank(s)"
            )
        time.sleep(POLL_S)


def _raise_recorded(run_dir: Path, world: int) -> None:
    """A rank that raised recorded what (``scaling.script``): report the first one, by its kind."""
    errors = read_errors(run_dir)
    if not errors:
        return
    e = errors[0]
    where = f" (rank {e['rank']} of {world})" if world > 1 else ""
    if e["kind"] == "usage":
        raise UsageError(e["message"] + where)
    if e["kind"] == "diverged":
        raise Diverged(e["message"], e.get("step"), e.get("losses"))
    if e["kind"] == "user":
        err = UserCodeFailed(f"rank {e['rank']} raised {e['message']}")
        err.traceback = e.get("traceback", "")  # type: ignore[attr-defined]
        raise err
