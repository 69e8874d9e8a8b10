"""Multi-host JAX on Ray: one actor per JAX process ("host"), joined by ``jax.distributed``.

The shape of a TPU pod slice: every host runs the same program on its local devices and
``jax.distributed.initialize`` points them all at one coordinator, the first actor. The actors sit
in a placement group, ``STRICT_SPREAD`` over the nodes of a real cluster (one host each) and
``PACK`` on a single-node cluster, where two or more actors on one machine form a CPU "pod".

Each actor is a fresh process whose device setup (``XLA_FLAGS`` device count, ``JAX_PLATFORMS``)
comes from the backend's own ``layout`` through the actor's ``runtime_env`` — set before jax is
ever imported there. When an actor dies the whole group is killed (survivors would wait forever
in a gloo collective) and rebuilt from the newest checkpoint, up to ``--max-failures`` times.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from scaling.config import RunConfig
from scaling.errors import Diverged, RunFailed, UsageError


class _HostContext:
    def __init__(self, rank: int, world: int, run_dir: Path):
        self.rank, self.world, self.local_rank, self.run_dir = rank, world, 0, run_dir

    def beat(self, step: int) -> None:
        pass


class PodHost:
    """One JAX process of the pod (a Ray actor class; wrapped with ``ray.remote`` at use)."""

    def address(self) -> tuple[str, int]:
        """This node's address and a free port on it: the coordinator, when this is host 0."""
        import ray

        ip = ray.util.get_node_ip_address()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((ip, 0))
            return ip, s.getsockname()[1]

    def node(self) -> str:
        """The Ray node id this host runs on: what a restart record names when the node is lost."""
        import ray

        return ray.get_runtime_context().get_node_id()

    def run(self, cfg_json: str, rank: int, world: int, master: tuple[str, int]) -> dict[str, Any] | None:
        os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "MASTER_ADDR": master[0], "MASTER_PORT": str(master[1])})
        from scaling.backends import get_backend

        cfg = RunConfig.from_json(cfg_json)
        work = Path(tempfile.mkdtemp(prefix=f"podscale-rayjax-r{rank}-"))
        try:
            raw = get_backend(cfg.backend).worker(cfg, _HostContext(rank, world, work))
            if raw is None:
                return None
            params = work / "final_params.npz"
            return {"raw": raw, "params_npz": params.read_bytes() if params.exists() else None}
        finally:
            shutil.rmtree(work, ignore_errors=True)


def _host_envs(cfg: RunConfig, on_accelerators: bool) -> list[dict[str, str]]:
    from scaling.backends import jax_dp

    procs = cfg.processes or 1
    if on_accelerators:
        return [{} for _ in range(procs)]  # TPU/GPU hosts: JAX finds its own local devices
    return jax_dp.layout(cfg)


def run_jax(cfg: RunConfig, max_failures: int, resource_timeout: float) -> tuple[dict[str, Any], bytes | None, list[dict[str, Any]]]:
    """Train ``cfg`` (jax-pmap / jax-sharded) on ``cfg.processes`` Ray actors; return process 0's
    raw record, the final parameters (.npz bytes) and one record per restart
    (``{node, step, cause}``: the node that was lost, the checkpoint step the next attempt resumed
    from, and why)."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    procs = cfg.processes or 1
    if not ray.is_initialized():
        ray.init(log_to_driver=True)
    res = ray.cluster_resources()
    tpu, gpu = res.get("TPU", 0.0), res.get("GPU", 0.0)
    per_host = cfg.devices // procs
    if tpu:
        bundle = {"TPU": float(per_host), "CPU": 1.0}
    elif gpu:
        bundle = {"GPU": float(per_host), "CPU": 1.0}
    else:
        bundle = {"CPU": float(per_host)}  # one logical CPU per emulated device, as the local launcher
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    strategy = "PACK" if len(nodes) <= 1 else "STRICT_SPREAD"
    envs = _host_envs(cfg, bool(tpu or gpu))
    if cfg.checkpoint_every and "://" in (cfg.checkpoint_dir or ""):
        raise UsageError(f"--checkpoint-dir {cfg.checkpoint_dir!r}: the JAX backends checkpoint to a path every host can read (a shared filesystem), not a URI")
    nonce = uuid.uuid4().hex[:8]
    Host = ray.remote(PodHost)
    attempt, failures = 0, 0
    restarts: list[dict[str, Any]] = []
    while True:
        attempt += 1
        run_cfg = cfg
        if attempt > 1 and cfg.checkpoint_dir:
            from scaling import checkpoint

            if checkpoint.latest(cfg.checkpoint_dir, "npz") is not None:
                run_cfg = cfg.replace(resume=True)
        bundles = [dict(bundle) for _ in range(procs)]
        if tpu:  # a TPU slice advertises TPU-<type>-head on its first host: host 0 goes there
            heads = sorted(k for k in res if k.startswith("TPU-") and k.endswith("-head"))
            if heads:
                bundles[0][heads[0]] = 1.0
        pg = placement_group(bundles, strategy=strategy)
        actors: list[Any] = []
        try:
            if not pg.wait(timeout_seconds=resource_timeout):
                have = ", ".join(f"{res.get(k, 0):g} {k}" for k in bundle)
                alive = len([n for n in ray.nodes() if n.get("Alive")])
                spread = f" on {procs} nodes, one host each" if strategy == "STRICT_SPREAD" else ""
                raise RunFailed(
                    f"too few resources for {procs} JAX host actor(s) of {bundle} each{spread} ({strategy}): the cluster "
                    f"has {alive} alive node(s) and {have}; waited {resource_timeout:g}s (--resource-timeout). "
                    f"Use fewer --devices/--processes or a bigger cluster")
            for rank in range(procs):
                env = {**envs[rank], "PODSCALE_RAY_JAX": f"{nonce}-{attempt}-{rank}", "PYTHONUNBUFFERED": "1"}
                actors.append(Host.options(
                    num_cpus=bundle.get("CPU", 0), num_gpus=bundle.get("GPU", 0),
                    resources={"TPU": bundle["TPU"]} if "TPU" in bundle else None,
                    runtime_env={"env_vars": env}, max_restarts=0,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=rank),
                ).remote())
            master = ray.get(actors[0].address.remote(), timeout=cfg.startup_timeout)
            hosts_nodes = ray.get([a.node.remote() for a in actors], timeout=cfg.startup_timeout)
            refs = [a.run.remote(run_cfg.to_json(), rank, procs, master) for rank, a in enumerate(actors)]
            out = _wait_all(refs, cfg, hosts_nodes)
            ret = out[0]
            if not ret or "raw" not in ret:
                raise RunFailed("the JAX actors finished without a result from process 0")
            return ret["raw"], ret.get("params_npz"), restarts
        except _HostDied as e:
            failures += 1
            if max_failures != -1 and failures > max_failures:
                raise RunFailed(f"a JAX host actor died and the run used up its --max-failures {max_failures} restart(s): {e}") from None
            newest = checkpoint_step(cfg)
            restarts.append({"node": e.node, "step": newest, "cause": str(e)})
            print(f"podscale: {e}; rebuilding the {procs} JAX host actor(s) from step {newest} "
                  f"(restart {failures} of {'unlimited' if max_failures == -1 else max_failures})", flush=True)
        finally:
            for a in actors:
                ray.kill(a, no_restart=True)
            remove_placement_group(pg)


class _HostDied(Exception):
    def __init__(self, message: str, node: str | None):
        super().__init__(message)
        self.node = node


def checkpoint_step(cfg: RunConfig) -> int:
    """The step the next attempt resumes from: the newest complete checkpoint's, else 0."""
    from scaling import checkpoint

    found = checkpoint.latest(cfg.checkpoint_dir, "npz") if cfg.checkpoint_dir else None
    return found[0] if found else 0


def _alive_nodes() -> set[str]:
    import ray

    return {n["NodeID"] for n in ray.nodes() if n.get("Alive")}


def health_check_window_s() -> float:
    """How long Ray takes to declare a silent node dead: its GCS health check (period x failure
    threshold + one timeout), as configured by the ``RAY_health_check_*`` variables the cluster was
    started with (Ray's defaults: 3 s x 5 + 10 s)."""
    env = os.environ.get
    period = float(env("RAY_health_check_period_ms", 3000))
    threshold = float(env("RAY_health_check_failure_threshold", 5))
    timeout = float(env("RAY_health_check_timeout_ms", 10000))
    return (period * threshold + timeout) / 1000.0


def _blame(failed: int, error: str, nodes: list[str]) -> _HostDied:
    """Which node the failure was. A lost node shows first as its peers' failures (a collective's
    "connection closed", or a survivor's runtime aborting its process), and Ray declares the node
    dead only after its health checks miss: so wait up to that window for one of the group's nodes
    to be declared dead, and blame the host that reported the error only if none is."""
    deadline = time.monotonic() + health_check_window_s()
    while True:
        alive = _alive_nodes()
        lost = [r for r, n in enumerate(nodes) if n not in alive]
        if lost:
            r = lost[0]
            return _HostDied(f"node {nodes[r][:12]} of JAX host {r} died (first seen as: {error})", nodes[r])
        if time.monotonic() > deadline:
            return _HostDied(error, nodes[failed])
        time.sleep(0.5)


def _wait_all(refs: list[Any], cfg: RunConfig, nodes: list[str]) -> list[Any]:
    """Results of every host, or _HostDied as soon as one fails (the others are stuck in a
    collective by then); bounded by start-up plus ``--step-timeout`` per step."""
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    deadline = time.monotonic() + cfg.startup_timeout + cfg.steps * cfg.step_timeout
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1, timeout=max(0.1, min(5.0, deadline - time.monotonic())))
        for r in done:
            rank = refs.index(r)
            try:
                ray.get(r)
            except RayActorError as e:
                raise _blame(rank, f"JAX host {rank} died ({type(e).__name__})", nodes) from None
            except RayTaskError as e:
                cause = e.cause if getattr(e, "cause", None) is not None else e
                if isinstance(cause, (UsageError, RunFailed, Diverged)):  # bad input, a non-finite loss: no retry
                    raise cause from None
                first = str(cause).strip().splitlines()[-1] if str(cause).strip() else type(cause).__name__
                raise _blame(rank, f"JAX host {rank} failed: {first[:300]}", nodes) from None
        if pending and time.monotonic() > deadline:
            raise RunFailed(f"the JAX hosts did not finish within --startup-timeout + steps x --step-timeout "
                            f"({cfg.startup_timeout + cfg.steps * cfg.step_timeout:g}s); killed them")
    return ray.get(refs)
