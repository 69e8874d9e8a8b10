"""Gloo's I/O thread at idle priority, where ranks share a CPU host's cores.

Gloo's TCP transport reads every message on one thread per device (``gloo_tcp_loop``). When a
message arrives before the rank has posted the buffer it goes to, that thread spins on its
level-triggered epoll until the buffer is posted. The thread that would post it (the rank's
collective thread or its main thread) is then queued behind the spinner on the same core until the
scheduler's next tick: 4 ms on this host's kernel (HZ = 250). Measured here (README, "Gloo on
shared cores"; 2 cores, torch 2.13): a 66 KB all-reduce between 2 ranks had a median of 0.41 ms and a quarter of
its calls at 2.6-8 ms; 2 ranks' median training step varied 1.3-4.1 ms run to run.

At ``SCHED_IDLE`` the spinner gives way at once to any thread that wakes on its core and still
runs whenever the core has nothing else to do, which is when its reads are due. Mean all-reduce +
two 256-GEMMs per rank (``bench/gloo_io.py`` measures it side by side): 2.5 -> 1.1 ms at 2 ranks,
8.2 -> 3.3 ms at 4, 24.9 -> 9.9 ms at 8.

JAX's CPU collectives across processes (``--processes P``) run the same gloo transport, built
into jaxlib, whose reader thread starts unnamed. A 66 KB psum between 2 processes: p75 0.90 and
3.05 ms in two runs, p90 3.6-4.1 ms; with the reader at ``SCHED_IDLE``, p75 0.53-0.58 and p90
0.70-0.79. ``scaling.train_jax`` names the one thread jaxlib's gloo factory starts
``gloo_tcp_loop``, as torch's gloo does, so that this module (and ``top -H``) finds it.

The price: a host whose cores are all kept busy by *other* programs starves the thread (2 ranks
beside 2 busy loops: 3.6 -> 75 ms an all-reduce). Podscale's timings need an idle host anyway;
``PODSCALE_GLOO_IO=normal`` keeps gloo's default priority.
"""

from __future__ import annotations

import os

ENV = "PODSCALE_GLOO_IO"
THREAD = "gloo_tcp_loop"
CHOICES = ("idle", "normal")


def setting() -> str:
    """The user's choice (``idle`` unless ``PODSCALE_GLOO_IO`` says otherwise); a bad value is an error."""
    from scaling.errors import UsageError

    value = os.environ.get(ENV, "idle").strip().lower() or "idle"
    if value not in CHOICES:
        raise UsageError(f"{ENV}={os.environ[ENV]!r}: valid values are {', '.join(CHOICES)}")
    return value


def thread_ids() -> set[int]:
    """This process's Linux thread ids; empty where /proc is absent."""
    try:
        return {int(t) for t in os.listdir("/proc/self/task")}
    except OSError:
        return set()


def name_io_threads(tids: set[int]) -> int:
    """Name ``tids`` (threads a gloo transport just started) ``gloo_tcp_loop`` where they still
    carry the name they inherited; returns how many carry it now."""
    try:
        with open("/proc/self/comm") as f:
            inherited = f.read().strip()
    except OSError:
        return 0
    done = 0
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/comm", "r+") as f:
                name = f.read().strip()
                if name == inherited:
                    f.seek(0)
                    f.write(THREAD)
                    name = THREAD
            done += name == THREAD
        except OSError:  # gone meanwhile
            continue
    return done


def io_threads() -> list[int]:
    """This process's gloo I/O threads (their Linux thread ids); none where /proc is absent."""
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return []
    out = []
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                if f.read().strip() == THREAD:
                    out.append(int(tid))
        except OSError:  # the thread ended meanwhile
            continue
    return out


def idle_io_threads() -> int:
    """Put this process's gloo I/O threads at ``SCHED_IDLE`` (unless the user said ``normal``);
    returns how many run at it. Idempotent: call it again after a later process group starts."""
    if setting() != "idle" or not hasattr(os, "SCHED_IDLE"):
        return 0
    done = 0
    for tid in io_threads():
        try:
            if os.sched_getscheduler(tid) != os.SCHED_IDLE:
                os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
            done += 1
        except OSError:  # gone, or a sandbox forbids it: gloo's default priority, as before
            continue
    return done
