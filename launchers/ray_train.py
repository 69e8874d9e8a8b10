"""torch-ddp on a Ray cluster: the backend's own ``train`` inside Ray Train's ``TorchTrainer``.

Ray Train places one worker per device anywhere in the cluster, initialises the process group
(gloo on CPU, NCCL on GPUs) and restarts the whole worker group when a worker dies
(``FailureConfig(max_failures)``). The training loop is ``scaling.backends.torch_ddp.train``
unchanged, so a Ray run takes exactly the steps of a local one. Checkpoints go through Ray
Train's storage (``RunConfig.storage_path``), so a restarted worker on another node still finds
them; each is one podscale checkpoint file written atomically by rank 0.

Runs inside the Ray job's driver (``launchers.ray_job``), never on the user's machine.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from scaling import checkpoint
from scaling.config import RunConfig
from scaling.errors import RunFailed, UsageError


class _RayWorkerContext:
    """What ``torch_ddp.train`` needs from its caller: a place for rank 0's files and a
    heartbeat (Ray Train watches its workers itself, so the beat is a no-op)."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir

    def beat(self, step: int) -> None:
        pass


def _newest_podscale_checkpoint(root: str | Path) -> Path | None:
    """Newest ``ckpt-*.pt`` under ``root`` (a Ray Train storage path holds them one per
    ``checkpoint_*`` directory; a local run's checkpoint dir holds them flat)."""
    best: tuple[int, Path] | None = None
    for p in Path(root).rglob("ckpt-*.pt"):
        m = checkpoint.PATTERN.match(p.name)
        if m and (best is None or int(m.group(1)) > best[0]):
            best = (int(m.group(1)), p)
    return best[1] if best else None


def _pick_resume_point(config: dict[str, Any], cfg: RunConfig, work: Path) -> Path | None:
    """The newest of: Ray Train's registered checkpoint, rank 0's atomic copy in the storage path
    (Ray can drop a report that lands just before a worker dies), and a --resume source."""
    import ray.train

    sources = [d for d in (config.get("atomic_dir"), cfg.checkpoint_dir if cfg.resume else None) if d]
    candidates = [p for d in sources if (p := _newest_podscale_checkpoint(d)) is not None]
    restored = ray.train.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as d:
            found = _newest_podscale_checkpoint(d)
            if found is not None:
                shutil.copy2(found, work / found.name)
                candidates.append(work / found.name)
    return max(candidates, key=lambda p: int(checkpoint.PATTERN.match(p.name).group(1)), default=None)


def _train_loop(config: dict[str, Any]) -> dict[str, Any] | None:
    """One Ray Train worker: restore the newest checkpoint if there is one, train, rank 0 returns."""
    import numpy as np
    import ray.train
    import torch

    from scaling.throughput import catalog
    from scaling.backends import torch_ddp

    cfg = RunConfig.from_json(config["cfg"])
    rank = ray.train.get_context().get_world_rank()
    if torch.cuda.is_available():
        import ray.train.torch

        torch.cuda.set_device(ray.train.torch.get_device())
    work = Path(tempfile.mkdtemp(prefix=f"podscale-raytrain-r{rank}-"))
    ckdir = work / "ckpt"
    ckdir.mkdir()
    try:
        best = _pick_resume_point(config, cfg, work) if rank == 0 else None
        # rank 0 decides and sends the file: every rank resumes from the same step, even on nodes
        # that cannot see the storage path
        import torch.distributed as dist

        box = [None if best is None else (best.name, best.read_bytes())]
        dist.broadcast_object_list(box, src=0)
        resume = box[0] is not None
        if resume:
            (ckdir / box[0][0]).write_bytes(box[0][1])
        here = ray.get_runtime_context()
        workers: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(workers, (here.get_actor_id(), here.get_node_id()))
        if rank == 0 and config.get("attempts") is not None:
            step = int(checkpoint.PATTERN.match(box[0][0]).group(1)) if resume else 0
            ray.get(config["attempts"].add.remote({"t": time.time(), "step": step, "workers": workers}))
        run_cfg = cfg.replace(checkpoint_dir=str(ckdir), resume=resume, json_path=None, params_out=None, logdir=None)

        def report(step: int, losses: list[float]) -> None:
            metrics = {"step": step, "loss": losses[-1]}
            if rank != 0:
                ray.train.report(metrics)
                return
            stage = work / f"stage-{step:08d}"
            stage.mkdir()
            src = checkpoint.path_for(ckdir, step, "pt")
            if config.get("atomic_dir"):
                with open(src, "rb") as f_in:
                    checkpoint.write_atomic(Path(config["atomic_dir"]) / src.name, lambda f: shutil.copyfileobj(f_in, f))
                checkpoint.prune(config["atomic_dir"], "pt")
            shutil.copy2(src, stage / src.name)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(stage)),
                             checkpoint_dir_name=f"checkpoint_{step:08d}")
            shutil.rmtree(stage, ignore_errors=True)

        raw = torch_ddp.train(run_cfg, _RayWorkerContext(work), report=report)
        if raw is None:
            return None
        raw["hardware"] = catalog.detect(cfg.backend)  # the workers' node, not the driver's
        params = work / "final_params.npz"
        return {"raw": raw, "params_npz": params.read_bytes() if params.exists() else None}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _cpus_needed(workers: int) -> float:
    return float(workers)


def wait_for_resources(workers: int, use_gpu: bool, timeout: float) -> None:
    """Fail in bounded time when the cluster cannot hold the worker group.

    Ray Train itself would wait ``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S`` and then retry forever;
    here the cluster's totals are polled for ``timeout`` seconds (an autoscaler may add nodes),
    then the run ends with the numbers.
    """
    import ray

    need = {"CPU": _cpus_needed(workers)} | ({"GPU": float(workers)} if use_gpu else {})
    deadline = time.monotonic() + timeout
    while True:
        have = ray.cluster_resources()
        short = {k: (v, have.get(k, 0.0)) for k, v in need.items() if have.get(k, 0.0) < v}
        if not short:
            return
        if time.monotonic() >= deadline:
            what = "; ".join(f"needs {v:g} {k} ({workers} workers), the cluster has {h:g} {k}" for k, (v, h) in short.items())
            raise RunFailed(
                f"too few resources for the Ray Train worker group: {what}; waited {timeout:g}s "
                f"(--resource-timeout) for the cluster to grow. Use fewer --devices or a bigger cluster"
            )
        time.sleep(min(1.0, max(0.05, deadline - time.monotonic())))


class _Attempts:
    """Where each worker group's rank 0 says what it resumed from and which workers (actor, node)
    it has (a zero-CPU Ray actor of the job's driver): Ray Train restarts a group silently, and
    this is what the run's restart records are made of."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)

    def all(self) -> list[dict[str, Any]]:
        return sorted(self.rows, key=lambda r: r["t"])


#: actor death reasons that are someone's decision (Ray Train tearing a failed group down), not the fault
_INTENDED = {"RAY_KILL", "OUT_OF_SCOPE", "INTENDED_USER_EXIT", "INTENDED_SYSTEM_EXIT"}


def death_of(workers: list[tuple[str, str]]) -> tuple[str | None, str]:
    """The node and cause of a worker group's failure, from Ray's own actor table: the first
    worker that died of a lost node, else of a dead process, else of anything unintended."""
    from ray.util.state import get_actor

    found: list[tuple[int, str, str]] = []
    for actor_id, node_id in workers:
        try:
            a = get_actor(actor_id, timeout=10)
        except Exception:  # noqa: BLE001 - the state API is down: the record says so
            continue
        ctx = ((getattr(a, "death_cause", None) or {}).get("actor_died_error_context") or {}) if a else {}
        reason = ctx.get("reason", "")
        if reason and reason not in _INTENDED:
            rank = {"NODE_DIED": 0, "WORKER_DIED": 1}.get(reason, 2)
            found.append((rank, node_id, f"{reason}: {ctx.get('error_message', '').split('. ')[0][:200]}"))
    if not found:
        return None, "the worker group failed (no worker's death is on record in Ray's actor table)"
    _, node, cause = min(found)
    return node, cause


def restarts_from(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One ``{node, step, cause}`` per restart: each group but the last failed, and the next one
    resumed from ``step``."""
    out = []
    for failed, nxt in zip(rows, rows[1:]):
        node, cause = death_of([tuple(w) for w in failed["workers"]])
        out.append({"node": node, "step": nxt["step"], "cause": cause})
    return out


def run_torch(cfg: RunConfig, max_failures: int, resource_timeout: float,
              storage: str | None = None) -> tuple[dict[str, Any], bytes | None, list[dict[str, Any]]]:
    """Train ``cfg`` (torch-ddp) on the connected Ray cluster; return rank 0's raw record, the
    final parameters (.npz bytes) and one record per restart of the worker group."""
    if cfg.backend != "torch-ddp":
        raise UsageError(f"--train ray runs torch-ddp through Ray Train; for {cfg.backend!r} use --train local")
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig as RayRunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if not ray.is_initialized():
        ray.init(log_to_driver=True)
    use_gpu = ray.cluster_resources().get("GPU", 0.0) >= 1.0
    wait_for_resources(cfg.devices, use_gpu, resource_timeout)
    own_storage = None
    if cfg.checkpoint_dir:
        store = cfg.checkpoint_dir if "://" in cfg.checkpoint_dir else os.path.abspath(cfg.checkpoint_dir)
    elif storage:
        store = storage
    else:
        own_storage = tempfile.mkdtemp(prefix="podscale-raystore-")
        store = own_storage
    name = f"podscale-{int(time.time() * 1000)}"
    atomic_dir = None if "://" in store else os.path.join(store, name, "podscale-checkpoints")
    attempts = ray.remote(num_cpus=0)(_Attempts).remote()
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"cfg": cfg.to_json(), "atomic_dir": atomic_dir, "attempts": attempts},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo", timeout_s=max(1, int(cfg.step_timeout))),
        scaling_config=ScalingConfig(num_workers=cfg.devices, use_gpu=use_gpu),
        run_config=RayRunConfig(
            name=name,
            storage_path=store,
            # a startup timeout (too few resources) is a controller failure: never retried
            failure_config=FailureConfig(max_failures=max_failures, controller_failure_limit=0),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    try:
        result = trainer.fit()
    except Exception as e:  # noqa: BLE001 - Ray Train's errors become one line with what to do
        raise RunFailed(_describe_failure(e, max_failures, resource_timeout)) from None
    finally:
        if own_storage:
            shutil.rmtree(own_storage, ignore_errors=True)
    ret = result.return_value
    if not ret or "raw" not in ret:
        raise RunFailed("Ray Train finished without a result from rank 0")
    restarts = restarts_from(ray.get(attempts.all.remote()))
    ray.kill(attempts)
    return ret["raw"], ret.get("params_npz"), restarts


def _describe_failure(e: BaseException, max_failures: int, resource_timeout: float) -> str:
    text = f"{type(e).__name__}: {e}"
    first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
    if "WorkerGroupStartupTimeoutError" in text or "StartupTimeout" in text:
        return (f"the Ray Train worker group could not start within {resource_timeout:g}s "
                f"(--resource-timeout): the cluster lacks free resources for it ({first[:200]})")
    died = "died" in text.lower() or "ActorDiedError" in text or "ActorUnavailable" in text or "SIGKILL" in text
    what = "a Ray Train worker died" if died else "Ray Train failed"
    return (f"{what} and the run used up its --max-failures {max_failures} restart(s): "
            f"{type(e).__name__}: {first[:300]}")
