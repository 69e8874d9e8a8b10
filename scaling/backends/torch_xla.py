"""torch-xla: the torch model on XLA devices (TPU, or CPU through PJRT), data-parallel.

Three ways to start the world (``--launcher``):

- ``spmd`` (default): one process per host drives every device of the slice. ``xr.use_spmd()``,
  a 1-D ``data`` mesh over all devices, the global batch ``mark_sharding``'d along it, parameters
  replicated; the SPMD partitioner inserts the gradient all-reduce while compiling. On a multi-host
  TPU slice every host runs the same command and PJRT discovers the slice (docs/torch-xla.md).
- ``torchrun``: one process per device with one XLA CPU device each, gradients averaged by gloo on
  host copies. The ``xla`` process group under torchrun silently has world size 1 on CPU, and
  host copies are what gloo can move, so this is the CPU multi-process path.
- ``xmp``: torch_xla's own spawn (``torch_xla.launch``), one process per local device, gradients
  through ``xm.optimizer_step``. With more than one CPU device it crashes in the all-reduce
  rendezvous upstream (pytorch/xla#9089), so that case is refused before anything starts.

The loss means what it means for torch-ddp: ``mean`` = F.mse_loss over the global batch. torch_xla
is imported inside functions only: the launcher's ``validate``/``layout`` stay fast and never
open a TPU that the worker process then could not get.
"""

from __future__ import annotations

import datetime
import importlib.util
import logging
import os
import tempfile
from typing import Any, Callable

import numpy as np

from scaling.backends import xla_hlo
from scaling.config import RunConfig
from scaling.errors import UsageError
from scaling.fault import maybe_fault
from scaling.meter import StepTimer

NAME = "torch-xla"
XMP_BUG = "https://github.com/pytorch/xla/issues/9089"


def platform() -> str:
    """The PJRT platform a worker will get: PJRT_DEVICE if set, TPU where libtpu is installed
    (torch_xla picks it when chips are present), else CPU. Read without opening any device."""
    env = os.environ.get("PJRT_DEVICE")
    if env:
        return env.split("_")[0].upper()
    return "TPU" if importlib.util.find_spec("libtpu") is not None else "CPU"


#: TPU VM accelerator type prefix (TPU_ACCELERATOR_TYPE, e.g. v5litepod-8) -> catalog id of one chip
TPU_TYPES = (("v5litepod", "tpu-v5e"), ("v5e", "tpu-v5e"), ("v5p", "tpu-v5p"), ("v6e", "tpu-v6e"),
             ("v4", "tpu-v4"), ("v3", "tpu-v3-chip"), ("v2", "tpu-v2-chip"))


def hardware_id(pjrt: str) -> str:
    """Catalog id of the chip a run used. An unknown TPU stays ``tpu`` (not in the catalog: MFU is
    left empty, never another chip's peak); ``--hardware`` overrides."""
    if pjrt == "CPU":
        return "host-cpu"
    acc = os.environ.get("TPU_ACCELERATOR_TYPE", "").lower()
    if pjrt == "TPU":
        return next((hw for prefix, hw in TPU_TYPES if acc.startswith(prefix)), "tpu")
    return pjrt.lower()


def validate(cfg: RunConfig) -> None:
    plat = platform()
    if cfg.checkpoint_dir or cfg.resume:
        raise UsageError("--checkpoint-dir/--resume: torch-xla does not checkpoint yet; use --backend torch-ddp for checkpointed runs")
    if cfg.launcher == "xmp":
        if plat == "CPU" and cfg.devices > 1:
            raise UsageError(
                f"--launcher xmp with --devices {cfg.devices} on CPU: torch_xla's spawn crashes in the all-reduce "
                f"rendezvous with more than one CPU device (pytorch/xla#9089, {XMP_BUG}); use --launcher spmd "
                f"(default, one process, all devices) or --launcher torchrun (one process per device, gloo)"
            )
        if cfg.processes not in (0, 1):
            raise UsageError(f"--processes {cfg.processes}: --launcher xmp starts one process and torch_xla spawns one per device; omit --processes")
    elif cfg.launcher == "spmd":
        if cfg.processes not in (0, 1):
            raise UsageError(
                f"--processes {cfg.processes}: --launcher spmd drives all devices of a host from one process (on a multi-host "
                f"TPU slice run the same command on every host); omit --processes, or use --launcher torchrun for one process per device"
            )
    elif cfg.launcher == "torchrun":
        if plat != "CPU":
            raise UsageError(f"--launcher torchrun on PJRT_DEVICE={plat}: it is the CPU path (gloo on host copies); use --launcher spmd on {plat}")
        if cfg.processes not in (0, cfg.devices):
            raise UsageError(f"--processes {cfg.processes}: --launcher torchrun runs one process per device; use --processes {cfg.devices} or omit it")


def layout(cfg: RunConfig) -> list[dict[str, str]]:
    """Environment of each process: torch_xla reads the CPU device count from CPU_NUM_DEVICES
    (XLA_FLAGS' host device count is ignored). PJRT_DEVICE is only set where nothing chose one."""
    plat = platform()
    quiet = {"TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}  # GSPMD deprecation notice per compile
    if cfg.launcher == "torchrun":
        return [{**quiet, "PJRT_DEVICE": "CPU", "CPU_NUM_DEVICES": "1", "OMP_NUM_THREADS": "1"} for _ in range(cfg.devices)]
    env = {**quiet, "CPU_NUM_DEVICES": str(cfg.devices)}
    if plat == "CPU":
        env["PJRT_DEVICE"] = "CPU"
    return [env]


def worker(cfg: RunConfig, ctx: Any) -> dict[str, Any] | None:
    logging.getLogger("absl").setLevel(logging.ERROR)  # torch_xla's import warns that TensorFlow is absent
    run_dir = getattr(ctx, "run_dir", None)
    with tempfile.TemporaryDirectory(prefix="podscale-xla-dump-", dir=run_dir) as tmp:
        # XLA reads its flags once, when the PJRT client starts: set them before any device use,
        # here, so that xmp's spawned processes inherit them too
        os.environ["XLA_FLAGS"] = xla_hlo.flags_with_dump(os.environ.get("XLA_FLAGS", ""), tmp)[0]
        return _start(cfg, ctx)


def _start(cfg: RunConfig, ctx: Any) -> dict[str, Any] | None:
    if cfg.launcher == "torchrun":
        import torch.distributed as dist

        dist.init_process_group("gloo", rank=ctx.rank, world_size=ctx.world, timeout=datetime.timedelta(seconds=cfg.step_timeout))
        try:
            return train(cfg, ctx)
        finally:
            dist.destroy_process_group()
    if cfg.launcher == "xmp":
        import torch_xla

        torch_xla.launch(_xmp_main, args=(cfg.to_json(),))
        return None  # the process with ordinal 0 wrote the result itself
    return train(cfg, ctx)


def _xmp_main(index: int, cfg_json: str) -> None:
    from scaling.worker import WorkerContext, write_result

    ctx = WorkerContext.from_env()
    raw = train(RunConfig.from_json(cfg_json), ctx)
    if raw is not None and ctx.run_dir is not None:
        write_result(ctx.run_dir, raw)


def train(cfg: RunConfig, ctx: Any) -> dict[str, Any] | None:
    """Train on this process's XLA device(s); the process that owns the result returns the raw record."""
    import torch
    import torch_xla
    import torch_xla.core.xla_model as xm
    import torch_xla.runtime as xr

    from models import torch as mtorch
    from scaling.backends import torch_common as tc
    from scaling.data import load_dataset, load_init

    dump_dir = xla_hlo.dump_dir(os.environ.get("XLA_FLAGS", ""))
    spmd = cfg.launcher == "spmd"
    if spmd:
        import torch_xla.distributed.spmd as xs

        xr.use_spmd()
        world_devices = xr.global_runtime_device_count()
        mesh = xs.Mesh(np.arange(world_devices), (world_devices,), ("data",))
        rank, world = xr.process_index(), 1  # the data is sliced by the mesh, not by processes
    elif cfg.launcher == "torchrun":
        import torch.distributed as dist

        rank, world = dist.get_rank(), dist.get_world_size()
        world_devices = world
    else:
        rank, world = xr.global_ordinal(), xr.world_size()
        world_devices = world
    if world_devices != cfg.devices:
        raise UsageError(f"--devices {cfg.devices}: this {xr.device_type()} runtime has {world_devices} device(s); use --devices {world_devices}")

    device = torch_xla.device()
    if xr.device_type() == "CPU":
        torch.set_num_threads(1)
    torch.manual_seed(cfg.seed)
    spec = tc.spec_of(cfg)
    data = load_dataset(spec, cfg.data, cfg.global_batch, cfg.seed)
    model = mtorch.build(spec, load_init(spec, cfg.init, cfg.seed)).to(device)
    opt = tc.make_optimizer(cfg, model.parameters())
    scale = 1.0 if spmd else tc.backward_scale(cfg.loss_reduction, world)
    b = cfg.global_batch // world
    shard = 0 if spmd else rank  # under SPMD every host holds the global batch; the mesh slices it
    autocast = torch.autocast("xla", dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16")
    reduce_grads = _gloo_reducer(model, world, device) if cfg.launcher == "torchrun" else (lambda: xm.reduce_gradients(opt)) if cfg.launcher == "xmp" else (lambda: None)

    timer = StepTimer()
    local: list[float] = []
    for step in range(cfg.steps):
        maybe_fault(rank, step)
        idx = data.indices(step, cfg.global_batch)[shard * b : (shard + 1) * b]
        timer.start()
        xb = torch.from_numpy(data.x[idx]).to(device)
        yb = torch.from_numpy(data.y[idx]).to(device)
        if spmd:
            xs.mark_sharding(xb, mesh, ("data",) + (None,) * (xb.dim() - 1))
            xs.mark_sharding(yb, mesh, ("data",) + (None,) * (yb.dim() - 1))
        with autocast:
            out = model(xb)
        loss = tc.local_loss(spec, out, yb, cfg.loss_reduction)
        (loss * scale).backward() if scale != 1.0 else loss.backward()
        reduce_grads()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch_xla.sync()  # runs the step's graph (params and loss) on the device
        local.append(loss.item())  # waits for it: the step is really done
        timer.stop()
        ctx.beat(step + 1)

    losses, digests = _gather(cfg, spmd, world, local, model, spec)
    cost = xla_hlo.train_step_cost(dump_dir) if dump_dir else None
    final = mtorch.to_canonical(spec, model)
    if not spmd and rank != 0:
        return None  # under SPMD every host reports (each host's launcher waits for its own result)
    if getattr(ctx, "run_dir", None) is not None:
        np.savez(ctx.run_dir / "final_params.npz", **final)
    # bytes moved per step: what the compiled program all-reduces, or the gloo buffer on host copies
    comm = spec.grad_bytes() if cfg.launcher == "torchrun" else cost.comm_bytes if cost else None
    return {
        "losses": losses,
        "step_times": timer.times,
        "final_params_l2": tc.params_l2(final),
        "replicas_identical": len(set(digests)) == 1,
        "device_kind": xr.device_type().lower(),
        "hardware": hardware_id(xr.device_type()),
        "processes": xr.process_count() if spmd else world,
        "versions": {"torch": torch.__version__, "torch_xla": torch_xla.__version__},
        # the compiled module is one device's program: times the devices = the whole step
        "xla_flops_per_step": cost.dot_flops * cfg.devices if cost else None,
        "xla_flops_per_device": cost.dot_flops if cost else None,  # measured: one device's compiled program
        "comm_bytes_per_step": comm,
        "backend_info": {"launcher": cfg.launcher, "pjrt_device": xr.device_type(), "hlo_module": cost.module if cost else None,
                         "xla_flops": "dot/convolution FLOPs counted from the compiled HLO dump (XLA's cost analysis is private API)"},
    }


def _gloo_reducer(model: Any, world: int, device: Any) -> Callable[[], None]:
    """Average the gradients over the processes through gloo, as DDP would: one flat host buffer,
    divided by world then summed (DDP's order), copied back to the XLA device."""
    import torch
    import torch.distributed as dist
    import torch_xla

    params = [p for p in model.parameters() if p.requires_grad]

    def reduce() -> None:
        torch_xla.sync()  # materialise the gradients before reading them on the host
        flat = torch.cat([p.grad.detach().reshape(-1) for p in params]).cpu()
        flat.div_(world)
        dist.all_reduce(flat)
        off = 0
        for p in params:
            n = p.numel()
            p.grad.copy_(flat[off : off + n].view_as(p).to(device))
            off += n

    return reduce


def _gather(cfg: RunConfig, spmd: bool, world: int, local: list[float], model: Any, spec: Any) -> tuple[list[float], list[str]]:
    """Global per-step losses and one parameter digest per replica."""
    import torch

    from models import torch as mtorch
    from scaling.backends import torch_common as tc

    if spmd:
        return local, _replica_digests(model)
    digest = tc.params_digest(mtorch.to_canonical(spec, model))
    t = torch.tensor(local, dtype=torch.float64)
    if cfg.launcher == "torchrun":
        import torch.distributed as dist

        dist.all_reduce(t)
        digests: list[str] = [""] * world
        dist.all_gather_object(digests, digest)
    else:
        import torch_xla
        import torch_xla.core.xla_model as xm

        # on-device collectives (xm.mesh_reduce pickles through torch.load, refused by weights_only)
        dev = torch_xla.device()
        t = xm.all_reduce(xm.REDUCE_SUM, t.to(dev)).cpu()
        rows = xm.all_gather(torch.tensor(list(bytes.fromhex(digest)), dtype=torch.int32).reshape(1, -1).to(dev)).cpu()
        digests = [bytes(r.tolist()).hex() for r in rows]
    return tc.global_losses(t, cfg.loss_reduction, world).tolist(), digests


def _replica_digests(model: Any) -> list[str]:
    """Each addressable device's copy of the replicated parameters, hashed: proof that the SPMD
    program kept every replica identical, not an assumption."""
    from torch_xla.distributed.spmd import XLAShardedTensor

    from scaling.backends import torch_common as tc

    per_device: dict[str, dict[str, np.ndarray]] = {}
    for name, p in model.named_parameters():
        for shard in XLAShardedTensor(p.data).local_shards:
            per_device.setdefault(str(shard.shard_device), {})[name] = shard.data.cpu().numpy()
    return [tc.params_digest(v) for v in per_device.values()]

