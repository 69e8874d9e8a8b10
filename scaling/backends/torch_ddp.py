"""torch-ddp: ``torch.distributed`` DistributedDataParallel, one process per device.

gloo on CPU, NCCL with one GPU per rank under CUDA. The global batch of each step is split into
equal contiguous slices, one per rank (``scaling.data``), so N ranks take the same SGD step as one.
``train`` assumes the process group is up: the local launcher starts it here (``worker``), Ray
Train starts it itself and calls ``train`` directly.
"""

from __future__ import annotations

import datetime
import inspect
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from models import torch as mtorch
from scaling import train_torch as api
from scaling.backends import gloo_io
from scaling.backends import torch_common as tc
from scaling.config import RunConfig
from scaling.data import load_dataset, load_init
from scaling.errors import UsageError
from models.torch.cnn import average_running_stats, convert_sync_bn
from scaling.datasets import accuracy

NAME = "torch-ddp"


def validate(cfg: RunConfig) -> None:
    gloo_io.setting()  # PODSCALE_GLOO_IO, before any rank starts
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
        timeout=datetime.timedelta(seconds=cfg.collective_timeout),
    )
    try:
        return train(cfg, ctx)
    finally:
        dist.destroy_process_group()


def train(cfg: RunConfig, ctx: Any, report: Any = None) -> dict[str, Any] | None:
    """Train the zoo's model on this rank inside an initialised process group, through the training
    API's loop (``scaling.train_torch``: the one torch loop); rank 0 returns the raw record.

    ``report(step, losses)``, if given, is called on every rank every checkpoint (Ray Train's hook).
    """
    s = api.init(cfg, ctx, fresh=True)
    spec = tc.spec_of(cfg)
    data = load_dataset(spec, cfg.data, cfg.global_batch, cfg.seed)
    model = mtorch.build(spec, load_init(spec, cfg.init, cfg.seed))
    if cfg.sync_bn:
        model = convert_sync_bn(model)
    opt = tc.make_optimizer(cfg, model.parameters())
    # per-device BN keeps each replica's running statistics (averaged at checkpoints and at the end),
    # so rank 0's buffers are not broadcast over the others every step
    no_sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters else "broadcast_buffers"
    hooks = api.Hooks(params=lambda m: mtorch.to_canonical(spec, m), sync_state=average_running_stats,
                      on_checkpoint=report, ddp_kwargs={no_sync: False})
    # DDP averages gradients over the ranks: a `sum` loss is the ranks' sum, so the local one is scaled
    api.fit(model, opt, tc.zoo_loss(spec, cfg, s.world), tc.zoo_batches(data, cfg.global_batch), steps=cfg.steps,
            global_batch=cfg.global_batch, hooks=hooks)
    # a sharded model's forward is a collective (each block all-gathers): every rank evaluates
    acc = test_accuracy(model, data, s.device) if s.rank == 0 or cfg.sharding != "none" else None
    if s.rank != 0:
        return None
    raw = dict(s.result or {})
    for k in ("model", "params", "grad_bytes", "global_batch", "steps", "untimed_steps", "scalars", "op_record"):
        raw.pop(k, None)  # the spec's, in the zoo's result
    if acc is not None:
        raw["accuracy"] = acc
    raw["device_kind"] = "cuda" if s.device.type == "cuda" else "cpu"
    raw["backend_info"] = {"process_group": dist.get_backend() if dist.is_initialized() else "none (1 rank)"}
    return raw


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
