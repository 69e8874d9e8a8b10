"""torch-ddp: ``torch.distributed`` DistributedDataParallel, one process per device.

gloo on CPU, NCCL with one GPU per rank under CUDA. The global batch of each step is split into
equal contiguous slices, one per rank (``scaling.data``), so N ranks take the same SGD step as one.
``train`` assumes the process group is up: the local launcher starts it here (``worker``), Ray
Train starts it itself and calls ``train`` directly.
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.flop_counter import FlopCounterMode

from models import torch as mtorch
from scaling import checkpoint
from scaling.backends import torch_common as tc
from scaling.config import RunConfig
from scaling.data import load_dataset, load_init
from scaling.errors import UsageError
from scaling.fault import maybe_fault
from scaling.meter import StepTimer
from models.torch.cnn import average_running_stats, convert_sync_bn
from scaling.datasets import accuracy

NAME = "torch-ddp"


def validate(cfg: RunConfig) -> None:
    if cfg.processes not in (0, cfg.devices):
        raise UsageError(f"--processes {cfg.processes}: torch-ddp runs one process per device; use --processes {cfg.devices} or omit it")
    if torch.cuda.is_available() and cfg.devices > torch.cuda.device_count():
        raise UsageError(f"--devices {cfg.devices}: this host has {torch.cuda.device_count()} GPU(s); use at most that many")


def layout(cfg: RunConfig) -> list[dict[str, str]]:
    """One process per device; each gets a single compute thread on CPU (PLATFORM_NOTES)."""
    return [{"OMP_NUM_THREADS": "1"} for _ in range(cfg.devices)]


def worker(cfg: RunConfig, ctx: Any) -> dict[str, Any] | None:
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(ctx.local_rank)
    dist.init_process_group(
        backend="nccl" if cuda else "gloo",
        rank=ctx.rank,
        world_size=ctx.world,
        timeout=datetime.timedelta(seconds=cfg.step_timeout),
    )
    try:
        return train(cfg, ctx)
    finally:
        dist.destroy_process_group()


def train(cfg: RunConfig, ctx: Any, report: Any = None) -> dict[str, Any] | None:
    """Train on this rank inside an initialised process group; rank 0 returns the raw record.

    ``report(step, losses)``, if given, is called on every rank every checkpoint (Ray Train's hook).
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    if not cuda:
        torch.set_num_threads(1)
    torch.manual_seed(cfg.seed)

    spec = tc.spec_of(cfg)
    data = load_dataset(spec, cfg.data, cfg.global_batch, cfg.seed)
    x_all = torch.from_numpy(data.x).to(device)
    y_all = torch.from_numpy(data.y).to(device)
    params = load_init(spec, cfg.init, cfg.seed)
    model = mtorch.build(spec, params).to(device)
    opt = tc.make_optimizer(cfg, model.parameters())

    start, losses_done, times_done = 0, [], []
    ckpt = checkpoint.latest(cfg.checkpoint_dir, "pt") if cfg.resume and cfg.checkpoint_dir else None
    if ckpt is not None:
        state = checkpoint.load_torch(ckpt[1])
        model = mtorch.build(spec, {k: v.numpy() for k, v in state["params"].items()}).to(device)
        opt = tc.make_optimizer(cfg, model.parameters())
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        start = int(state["step"])
        losses_done = state["losses"].tolist()
        times_done = state["step_times"].tolist()

    if cfg.sync_bn:
        model = convert_sync_bn(model)
    # per-device BN keeps each replica's running statistics (averaged at checkpoints and at the end),
    # so rank 0's buffers are not broadcast over the others every step
    no_sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters else "broadcast_buffers"
    ddp = DDP(model, device_ids=[device.index] if cuda else None, **{no_sync: False})
    if cfg.compile:
        ddp = torch.compile(ddp)  # type: ignore[assignment]
    scale = tc.backward_scale(cfg.loss_reduction, world)
    measured: dict[str, float] = {}
    b = cfg.per_device_batch
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16")
    timer = StepTimer()
    local = torch.zeros(cfg.steps, dtype=torch.float64)

    for step in range(start, cfg.steps):
        maybe_fault(rank, step)
        idx = torch.from_numpy(data.indices(step, cfg.global_batch)[rank * b : (rank + 1) * b]).to(device)
        xb, yb = x_all[idx], y_all[idx]
        # the first untimed step is also the measured one: this rank's FLOPs (torch's own counter)
        # and the gradient bytes its DDP reducer all-reduces: measured, not numbers from the config
        counting = step == start and step < cfg.untimed_steps
        flop_counter = FlopCounterMode(display=False) if counting else contextlib.nullcontext()
        timer.start()
        with flop_counter:
            with autocast:
                out = ddp(xb)
            loss = tc.local_loss(spec, out, yb, cfg.loss_reduction)
            (loss * scale).backward() if scale != 1.0 else loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        local[step] = loss.item()  # syncs the device: the step is really done
        timer.stop()
        if counting:
            measured = {"flops": float(flop_counter.get_total_flops()), "comm_bytes": _bucket_bytes(ddp)}
        ctx.beat(step + 1)
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            glob = _global_losses(local[: step + 1], start, losses_done, cfg, world, device)
            average_running_stats(model)
            if rank == 0:
                checkpoint.save_torch(cfg.checkpoint_dir, step + 1, {
                    "params": {k: torch.from_numpy(v) for k, v in mtorch.to_canonical(spec, model).items()},
                    "optimizer": opt.state_dict(),
                    "step": step + 1,
                    "losses": torch.tensor(glob, dtype=torch.float64),
                    "step_times": torch.tensor(times_done + timer.times, dtype=torch.float64),
                    "torch_rng": torch.get_rng_state(),
                })
            if report is not None:
                report(step + 1, glob)

    losses = _global_losses(local, start, losses_done, cfg, world, device)
    average_running_stats(model)
    final = mtorch.to_canonical(spec, model)
    digests: list[str] = [""] * world
    dist.all_gather_object(digests, tc.params_digest(final))
    per_rank: list[dict[str, float]] = [{}] * world
    dist.all_gather_object(per_rank, measured)
    if rank != 0:
        return None
    acc = test_accuracy(model, data, device)
    if getattr(ctx, "run_dir", None) is not None:
        np.savez(ctx.run_dir / "final_params.npz", **final)
    return {
        "losses": losses,
        "step_times": times_done + timer.times,
        "final_params_l2": tc.params_l2(final),
        "replicas_identical": len(set(digests)) == 1,
        "resumed_from_step": start or None,
        **({"accuracy": acc} if acc is not None else {}),
        "device_kind": "cuda" if cuda else "cpu",
        "flops_per_device": [m.get("flops") for m in per_rank] if measured else None,
        "comm_bytes_per_step": [m.get("comm_bytes") for m in per_rank] if measured and world > 1 else None,
        "processes": world,
        "versions": {"torch": torch.__version__},
        "backend_info": {"process_group": dist.get_backend()},
    }


@torch.no_grad()
def test_accuracy(model: torch.nn.Module, data: Any, device: torch.device) -> float | None:
    """Accuracy on the dataset's held-out split (``--data digits``), eval mode (running BN stats)."""
    if getattr(data, "x_test", None) is None:
        return None
    model.eval()
    try:
        return accuracy(lambda x: model(torch.from_numpy(x).to(device)).float().cpu().numpy(), data)
    finally:
        model.train()


def _bucket_bytes(ddp: Any) -> float | None:
    """Bytes this rank's DDP reducer all-reduces per step: the sizes of its gradient buckets, as DDP
    itself records them. Not a Python comm hook: bench/overhead.py measured a counting hook at +9%
    step time on 2 gloo ranks (the hook's future callback contends for the GIL with backward)."""
    try:
        sizes = str(getattr(ddp, "_orig_mod", ddp)._get_ddp_logging_data().get("bucket_sizes", ""))
        return float(sum(int(x) for x in sizes.split(",") if x.strip()))
    except Exception:  # noqa: BLE001 - a private API: absent or changed means "not measured"
        return None


def _global_losses(local: torch.Tensor, start: int, done: list[float], cfg: RunConfig, world: int, device: torch.device) -> list[float]:
    """All-reduce this attempt's local losses (one collective, not one per step) and prepend the
    global losses a resumed run inherited from its checkpoint."""
    part = local[start:].to(device, copy=True)
    dist.all_reduce(part)
    return list(done[:start]) + tc.global_losses(part.cpu(), cfg.loss_reduction, world).tolist()

