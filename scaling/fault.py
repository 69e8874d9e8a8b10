"""Deterministic fault injection for tests: ``PODSCALE_FAULT=RANK:STEP[:hang|:hold]``.

At the start of step STEP, rank RANK SIGKILLs itself (default) or hangs forever (``:hang``,
to exercise the watchdog on a stuck collective), or holds until the file
``PODSCALE_FAULT_RELEASE`` exists (``:hold``, at most 300 s: a test kills a node at a known step
and then lets the run go on). With ``PODSCALE_FAULT_ONCE=FILE`` the fault fires
only if FILE does not exist yet (and creates it), so a restarted attempt runs clean: that is how
the Ray fault-tolerance tests kill "the first attempt only".
"""

from __future__ import annotations

import os
import signal
import sys
import time


def parse(spec: str | None) -> tuple[int, int, str] | None:
    if not spec:
        return None
    parts = spec.split(":")
    try:
        rank, step = int(parts[0]), int(parts[1])
    except (ValueError, IndexError):
        raise ValueError(f"PODSCALE_FAULT={spec!r}: expected RANK:STEP or RANK:STEP:MODE (kill, hang or hold)") from None
    mode = parts[2] if len(parts) > 2 else "kill"
    if mode not in ("kill", "hang", "hold"):
        raise ValueError(f"PODSCALE_FAULT={spec!r}: mode must be kill, hang or hold")
    return rank, step, mode


_UNREAD = ("", -1, "")
_FAULT: tuple[int, int, str] | None = _UNREAD  # read on first use: a bad value is the launcher's to report


def maybe_fault(rank: int, step: int) -> None:
    global _FAULT
    if _FAULT is _UNREAD:
        _FAULT = parse(os.environ.get("PODSCALE_FAULT"))
    if _FAULT is None or _FAULT[0] != rank or _FAULT[1] != step:
        return
    if _FAULT[2] == "hold":
        release = os.environ.get("PODSCALE_FAULT_RELEASE", "")
        deadline = time.monotonic() + 300
        while release and not os.path.exists(release) and time.monotonic() < deadline:
            time.sleep(0.1)
        return
    once = os.environ.get("PODSCALE_FAULT_ONCE")
    if once:
        try:
            fd = os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            os.close(fd)
        except FileExistsError:
            return
    # the unix time lets a test bound how long the launcher took to notice, from the fault itself
    print(f"podscale: PODSCALE_FAULT injected: rank {rank} {_FAULT[2]} at step {step} (unix time {time.time():.3f})",
          file=sys.stderr, flush=True)
    if _FAULT[2] == "hang":
        while True:
            time.sleep(3600)
    os.kill(os.getpid(), signal.SIGKILL)
