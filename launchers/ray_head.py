"""A private, loopback-only Ray head on this machine: started for one job (or one test session)
and stopped by its own process IDs.

Why not ``ray.init()`` or ``ray stop``: ``ray stop`` ends every Ray on the host (other users'
jobs included), and a plain ``ray start`` daemonises its processes so nothing owns them. Here the
head runs as ``ray start --head --block`` in a child process: every Ray process of the head is a
descendant of it, and SIGINT makes it shut them all down (SIGTERM does not, in Ray 2.60).

Loopback only: Ray resolves ``--node-ip-address 127.0.0.1`` to the host's public address unless
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (then it keeps the loopback address and its GCS, raylet,
agents and workers bind to 127.0.0.1); the dashboard and job server are bound with
``--dashboard-host 127.0.0.1``. Every fixed default port (client server 10001, agent 52365) is
replaced by a free one so that two heads on one host never collide.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from scaling.errors import RunFailed

#: environment every local head and job gets: no auth prompt, no telemetry, loopback addresses
LOCAL_RAY_ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_executable() -> str:
    exe = Path(sys.executable).with_name("ray")
    if exe.exists():
        return str(exe)
    found = shutil.which("ray")
    if not found:
        raise RunFailed("the 'ray' command is not installed beside this Python; install it with: pip install 'podscale[ray]'")
    return found


@dataclass
class LocalHead:
    """One running head: its job-server address and the process tree that makes it up."""

    num_cpus: int
    temp_dir: Path
    dashboard_port: int
    proc: subprocess.Popen[bytes]
    log_path: Path
    own_temp: bool = True
    _known: set[int] = field(default_factory=set)

    @property
    def address(self) -> str:
        """The Jobs API address (``podscale launch --address``)."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    def pids(self) -> list[int]:
        """Every live process of this head (the ``ray start`` process and all its descendants)."""
        import psutil

        try:
            root = psutil.Process(self.proc.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []
        self._known.update(p.pid for p in procs)
        return [p.pid for p in procs]

    def listening(self) -> list[tuple[int, str, str, int]]:
        """(pid, process name, address, port) of every listening TCP socket of this head."""
        import psutil

        out = []
        for pid in self.pids():
            try:
                p = psutil.Process(pid)
                for c in p.net_connections(kind="inet"):
                    if c.status == psutil.CONN_LISTEN:
                        out.append((pid, p.name(), c.laddr.ip, c.laddr.port))
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return out

    def stop(self, timeout: float = 20.0) -> None:
        """SIGINT the head (Ray's own orderly shutdown), then SIGKILL whatever of it is left."""
        import psutil

        self.pids()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        for pid in sorted(self._known):
            try:
                p = psutil.Process(pid)
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    p.kill()
            except psutil.NoSuchProcess:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.own_temp:
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> LocalHead:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_head(num_cpus: int, temp_dir: str | Path | None = None, startup_timeout: float = 90.0,
               env: dict[str, str] | None = None) -> LocalHead:
    """Start a loopback-only head (see ``_start_head_once``); a head whose job agent never comes up
    (seen once in CI: every submission answered "No available agent") is stopped and started again,
    once, on fresh ports."""
    try:
        return _start_head_once(num_cpus, temp_dir, startup_timeout, env)
    except _AgentDown:
        return _start_head_once(num_cpus, temp_dir, startup_timeout, env)


class _AgentDown(RunFailed):
    pass


def _port_open(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _start_head_once(num_cpus: int, temp_dir: str | Path | None = None, startup_timeout: float = 90.0,
                     env: dict[str, str] | None = None) -> LocalHead:
    """Start a loopback-only head with ``num_cpus`` logical CPUs; return once its job server answers.

    Logical CPUs are what Ray schedules by: declaring them explicitly (rather than the detected
    count) is what lets N training workers share a small machine, as the local launcher does.
    """
    own = temp_dir is None
    # Ray's session paths (unix sockets) must stay short: a short private dir under /tmp.
    tmp = Path(tempfile.mkdtemp(prefix="psray-", dir="/tmp")) if own else Path(temp_dir)
    tmp.mkdir(parents=True, exist_ok=True)
    dash = free_port()
    agent_port = free_port()
    cmd = [
        ray_executable(), "start", "--head", "--block", "--port=0", "--node-ip-address=127.0.0.1",
        f"--temp-dir={tmp}", f"--num-cpus={num_cpus}", "--num-gpus=0", "--include-dashboard=true",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--dashboard-agent-listen-port={agent_port}",
        f"--ray-client-server-port={free_port()}", "--disable-usage-stats",
    ]
    e = {**os.environ, **LOCAL_RAY_ENV, **(env or {})}
    log = tmp / "head.log"
    with open(log, "wb") as f:
        # SIGINT is how the head is stopped: undo the SIG_IGN a background shell gives its children
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=e,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    head = LocalHead(num_cpus=num_cpus, temp_dir=tmp, dashboard_port=dash, proc=proc, log_path=log, own_temp=own)
    deadline = time.monotonic() + startup_timeout
    while True:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-3:]
            head.stop()
            raise RunFailed(f"the local Ray head exited with code {proc.returncode} while starting: {' | '.join(tail)}")
        try:
            with urllib.request.urlopen(f"{head.address}/api/version", timeout=2) as r:
                if json.loads(r.read()).get("ray_version") and _port_open(agent_port):
                    # the job server answers and the job agent (which runs submissions) listens
                    head.pids()
                    return head
        except (OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            head.stop()
            raise _AgentDown(f"the local Ray head's job server or job agent did not answer within {startup_timeout:g}s (log: {log})")
        time.sleep(0.5)
