"""Shared fixtures: an isolated measurement cache and a helper that runs the real CLI.

Multi-device runs go through the ``podscale`` command in subprocesses, exactly as a user runs
them: device counts and process groups are per process, and the exit codes are part of the
contract under test.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ.setdefault("PODSCALE_CACHE_DIR", str(tmp_path_factory.mktemp("podscale-cache")))
    from scaling.throughput import host

    try:  # the host peak, as `podscale calibrate` caches it: runs only read it (else each measures its own)
        host.measured_host_peaks(write=True)
    except (host.BusyMachine, ImportError):
        pass


def podscale(*args: str, env: dict[str, str] | None = None, timeout: float = 240, check: bool = True,
             cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """Run ``python -m launchers.cli ARGS`` and return the completed process (text)."""
    e = dict(os.environ)
    e.pop("PODSCALE_FAULT", None)
    e.update(env or {})
    e["PYTHONPATH"] = str(ROOT) + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    p = subprocess.run([sys.executable, "-m", "launchers.cli", *args], cwd=cwd, env=e, capture_output=True,
                       text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"podscale {' '.join(args)} exited {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}")
    return p


@pytest.fixture
def run_cli():
    return podscale


def measured_breakdown(name: str, r: dict) -> dict:
    """A run's measured breakdown, checked for what every backend's probes promise: medians of at
    least 10 runs, data, compute and exposed communication each measured and non-negative, the
    training step as the run reports it. Returns the measured parts."""
    b = r["breakdown"]
    assert b["probes"] * b["runs_per_probe"] >= 10 and b["why"] is None, (name, b)
    m = b["measured"]
    for part in ("data_s", "compute_s", "comm_exposed_s"):
        assert m[part] is not None and m[part] >= 0, (name, part, m)
    assert m["compute_s"] > 0 and m["train_step_s"] == pytest.approx(r["step_time_s"])
    return m


def drop_newest_checkpoint(ck: Path) -> None:
    """Leave the checkpoint at step 3 as the newest, as if the run had died after it."""
    from scaling import checkpoint

    ckpts = sorted(p for p in ck.iterdir() if checkpoint.PATTERN.match(p.name))
    assert len(ckpts) == 2, ckpts  # --checkpoint-every 3 of 6 steps: 3 and the final 6
    ckpts[-1].unlink()
