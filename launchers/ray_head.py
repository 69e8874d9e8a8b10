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


#: ``ray start`` for a node joining a head on this host, kept on 127.0.0.1. ``ray start`` refuses
#: to join a cluster while ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (the head's loopback switch), and
#: with it on it rewrites ``--node-ip-address 127.0.0.1`` to the host's public address; this keeps the
#: address it is given (everything else is Ray's own CLI, unchanged).
_JOIN_ON_LOOPBACK = ("import sys, ray._private.services as s; s.resolve_ip_for_localhost = lambda host: host; "
                     "from ray.scripts.scripts import main; sys.argv[0] = 'ray'; main()")


@dataclass
class _ProcessTree:
    """A ``ray start --block`` child process and every process it spawned: what "stop what you
    started, by PID" means for one Ray node."""

    proc: subprocess.Popen[bytes]
    log_path: Path
    _known: set[int] = field(default_factory=set)

    def pids(self) -> list[int]:
        """Every live process of this node (the ``ray start`` process and all its descendants)."""
        return self.tree_pids()

    def tree_pids(self) -> list[int]:
        """The live processes of this one ``ray start`` tree."""
        import psutil

        try:
            root = psutil.Process(self.proc.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []
        self._known.update(p.pid for p in procs)
        return [p.pid for p in procs]

    def listening(self, own_only: bool = False) -> list[tuple[int, str, str, int]]:
        """(pid, process name, address, port) of every listening TCP socket of this node (with
        ``own_only``, of this ``ray start`` tree alone: a head without its added nodes)."""
        import psutil

        out = []
        for pid in (self.tree_pids() if own_only else self.pids()):
            try:
                p = psutil.Process(pid)
                for c in p.net_connections(kind="inet"):
                    if c.status == psutil.CONN_LISTEN:
                        out.append((pid, p.name(), c.laddr.ip, c.laddr.port))
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return out

    def _kill_known(self) -> None:
        import psutil

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

    def kill(self) -> None:
        """SIGKILL every process of this node at once: a machine that lost power, as far as the rest
        of the cluster can tell (no orderly deregistration; the GCS notices by missed heartbeats)."""
        self.pids()
        self._kill_known()

    def stop(self, timeout: float = 20.0) -> None:
        """SIGINT the node (Ray's own orderly shutdown), then SIGKILL whatever of it is left."""
        self.pids()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self._kill_known()


@dataclass
class LocalNode(_ProcessTree):
    """A worker node joined to a :class:`LocalHead` on this host (``ray start --address``): its own
    raylet, object store and agents, its own logical CPUs and custom resources."""

    name: str = ""
    num_cpus: int = 0
    node_id: str = ""


@dataclass
class LocalHead(_ProcessTree):
    """One running head: its job-server address, its GCS address, the worker nodes added to it,
    and the process trees that make them up."""

    num_cpus: int = 0
    temp_dir: Path = Path()
    dashboard_port: int = 0
    gcs_port: int = 0
    own_temp: bool = True
    nodes: list[LocalNode] = field(default_factory=list)

    @property
    def address(self) -> str:
        """The Jobs API address (``podscale launch --address``)."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def gcs_address(self) -> str:
        """Where ``ray.init(address=...)`` and joining nodes connect."""
        return f"127.0.0.1:{self.gcs_port}"

    def add_node(self, name: str, num_cpus: int, resources: dict[str, float] | None = None,
                 startup_timeout: float = 60.0, object_store_mb: int = 256) -> LocalNode:
        """Join one more node on this host, on loopback, with ``num_cpus`` logical CPUs and a custom
        resource ``name`` (1.0) so that what lands on it is observable; return once the GCS lists it
        alive. Every port Ray would otherwise default (agents, metrics, node manager) is a free one,
        so that the nodes of one host never collide."""
        res = {name: 1.0, **(resources or {})}
        cmd = [
            sys.executable, "-c", _JOIN_ON_LOOPBACK, "start", "--block", f"--address={self.gcs_address}", "--node-ip-address=127.0.0.1",
            f"--num-cpus={num_cpus}", "--num-gpus=0", f"--resources={json.dumps(res)}",
            f"--object-store-memory={object_store_mb * 2**20}",
            f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
            "--min-worker-port=0", "--max-worker-port=0", "--disable-usage-stats",
        ]
        log = self.temp_dir / f"{name}.log"
        with open(log, "wb") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env={**os.environ, **LOCAL_RAY_ENV, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"},
                                    preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        node = LocalNode(proc=proc, log_path=log, name=name, num_cpus=num_cpus)
        self.nodes.append(node)
        deadline = time.monotonic() + startup_timeout
        while not (ids := [i for i, res in self.alive_nodes().items() if name in res]):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace").strip().splitlines()[-3:]
                node.stop()
                raise RunFailed(f"node {name!r} did not join the local Ray head within {startup_timeout:g}s: {' | '.join(tail)}")
            time.sleep(0.5)
        node.node_id = ids[0]
        node.pids()
        return node

    def alive_nodes(self) -> dict[str, dict[str, float]]:
        """Node id -> total resources of every node the GCS lists alive (the dashboard's view)."""
        try:
            with urllib.request.urlopen(f"{self.address}/nodes?view=summary", timeout=5) as r:
                nodes = json.loads(r.read())["data"]["summary"]
        except (OSError, ValueError, KeyError):
            return {}
        return {n["raylet"]["nodeId"]: {k: float(v) for k, v in n["raylet"].get("resourcesTotal", {}).items()}
                for n in nodes if n.get("raylet", {}).get("state") == "ALIVE"}

    def node_of(self, node_id: str) -> LocalNode | None:
        """The added node with Ray node id ``node_id`` (None: the head, or not one of ours)."""
        return next((n for n in self.nodes if n.node_id == node_id), None)

    def pids(self) -> list[int]:
        """Every live process of the head and of the nodes added to it."""
        return [*self.tree_pids(), *(p for n in self.nodes for p in n.pids())]

    def stop(self, timeout: float = 20.0) -> None:
        """Stop the added nodes, then the head (each: SIGINT, then SIGKILL what is left)."""
        for n in self.nodes:
            n.stop(timeout)
        super().stop(timeout)
        if self.own_temp:
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> LocalHead:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_head(num_cpus: int, temp_dir: str | Path | None = None, startup_timeout: float = 90.0,
               env: dict[str, str] | None = None, resources: dict[str, float] | None = None) -> LocalHead:
    """Start a loopback-only head (see ``_start_head_once``); a head whose job agent never comes up
    (seen once in CI: every submission answered "No available agent") is stopped and started again,
    once, on fresh ports."""
    try:
        return _start_head_once(num_cpus, temp_dir, startup_timeout, env, resources)
    except _AgentDown:
        return _start_head_once(num_cpus, temp_dir, startup_timeout, env, resources)


class _AgentDown(RunFailed):
    pass


def _port_open(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _start_head_once(num_cpus: int, temp_dir: str | Path | None = None, startup_timeout: float = 90.0,
                     env: dict[str, str] | None = None, resources: dict[str, float] | None = None) -> LocalHead:
    """Start a loopback-only head with ``num_cpus`` logical CPUs; return once its job server answers.

    Logical CPUs are what Ray schedules by: declaring them explicitly (rather than the detected
    count) is what lets N training workers share a small machine, as the local launcher does.
    """
    own = temp_dir is None
    # Ray's session paths (unix sockets) must stay short: a short private dir under /tmp.
    tmp = Path(tempfile.mkdtemp(prefix="psray-", dir="/tmp")) if own else Path(temp_dir)
    tmp.mkdir(parents=True, exist_ok=True)
    dash = free_port()
    gcs_port = free_port()
    agent_port = free_port()
    cmd = [
        ray_executable(), "start", "--head", "--block", f"--port={gcs_port}", "--node-ip-address=127.0.0.1",
        f"--temp-dir={tmp}", f"--num-cpus={num_cpus}", "--num-gpus=0", "--include-dashboard=true",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--dashboard-agent-listen-port={agent_port}",
        f"--ray-client-server-port={free_port()}", "--disable-usage-stats",
        *([f"--resources={json.dumps(resources)}"] if resources else []),
    ]
    e = {**os.environ, **LOCAL_RAY_ENV, **(env or {})}
    log = tmp / "head.log"
    with open(log, "wb") as f:
        # SIGINT is how the head is stopped: undo the SIG_IGN a background shell gives its children
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=e,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    head = LocalHead(proc=proc, log_path=log, num_cpus=num_cpus, temp_dir=tmp, dashboard_port=dash, gcs_port=gcs_port,
                     own_temp=own)
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
