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
  through ``xm.reduce_gradients``. With more than one CPU device it crashes in the all-reduce
  rendezvous upstream (pytorch/xla#9089), so that case is refused before anything starts.

Every launcher trains in the training API's loop (``scaling.train_torch.fit``), as torch-ddp does; this
module adds what is torch-xla's own: the torchrun and xmp gradient averaging and xmp's collectives
(fit's hooks), and the compiled step's all-reduce bytes and matmul FLOPs read from XLA's HLO dump.
The loss means what it means for torch-ddp: ``mean`` = F.mse_loss over the global batch. torch_xla
is imported inside functions only: the launcher's ``validate``/``layout`` stay fast and never
open a TPU that the worker process then could not get.
"""

from __future__ import annotations

import datetime
import importlib.util
import logging
import os
import pickle
import tempfile
from typing import Any, Callable

from scaling.backends import xla_hlo
from scaling.config import RunConfig
from scaling.errors import UsageError

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
    if (cfg.checkpoint_dir or cfg.resume) and cfg.launcher != "spmd":
        raise UsageError(f"--checkpoint-dir/--resume: torch-xla checkpoints under --launcher spmd (the default), not {cfg.launcher}")
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

        dist.init_process_group("gloo", rank=ctx.rank, world_size=ctx.world, timeout=datetime.timedelta(seconds=cfg.collective_timeout))
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
    from scaling.context import WorkerContext, write_result

    ctx = WorkerContext.from_env()
    raw = train(RunConfig.from_json(cfg_json), ctx)
    if raw is not None and ctx.run_dir is not None:
        write_result(ctx.run_dir, raw)


def train(cfg: RunConfig, ctx: Any) -> dict[str, Any] | None:
    """Train the zoo's model on this process's XLA device(s) through the training API's loop
    (``scaling.train_torch``: the one torch loop); the process that owns the result returns the raw
    record. What is torch-xla's own rides on fit's hooks: the torchrun and xmp gradient averaging,
    xmp's collectives; SPMD's mesh is fit's; the compiled step's bytes and FLOPs come from XLA's dump."""
    import torch
    import torch_xla
    import torch_xla.runtime as xr

    from models import torch as mtorch
    from scaling import train_torch as api
    from scaling.backends import torch_common as tc
    from scaling.data import load_dataset, load_init

    dump_dir = xla_hlo.dump_dir(os.environ.get("XLA_FLAGS", ""))
    spmd = cfg.launcher == "spmd"
    s = api.init(cfg, ctx, fresh=True)  # SPMD: one rank over every device (the mesh slices the batch)
    spec = tc.spec_of(cfg)
    data = load_dataset(spec, cfg.data, cfg.global_batch, cfg.seed)
    model = mtorch.build(spec, load_init(spec, cfg.init, cfg.seed)).to(s.device)
    opt = tc.make_optimizer(cfg, model.parameters())
    hooks = api.Hooks(params=lambda m: mtorch.to_canonical(spec, m))
    if cfg.launcher == "torchrun":
        hooks.reduce_grads = _gloo_reducer(model, s.world, s.device)
    elif cfg.launcher == "xmp":
        import torch_xla.core.xla_model as xm

        hooks.reduce_grads = lambda: xm.reduce_gradients(opt)
        hooks.all_reduce, hooks.all_gather = _xm_sum, _xm_gather
    api.fit(model, opt, tc.zoo_loss(spec, cfg, s.world), tc.zoo_batches(data, cfg.global_batch), steps=cfg.steps,
            global_batch=cfg.global_batch, hooks=hooks)
    if s.rank != 0:
        return None  # under SPMD every host reports (each host's launcher waits for its own result)
    r = s.result or {}
    cost = xla_hlo.train_step_cost(dump_dir) if dump_dir else None
    # bytes moved per step: what the compiled program all-reduces, or the gloo buffer on host copies
    comm = getattr(hooks.reduce_grads, "bytes", None) if cfg.launcher == "torchrun" else cost.comm_bytes if cost else None
    return {
        **{k: r[k] for k in ("losses", "step_times", "final_params_l2", "replicas_identical")},
        **{k: r[k] for k in ("memory", "sharding", "resumed_from_step", "breakdown") if k in r},
        "device_kind": xr.device_type().lower(),
        "hardware": hardware_id(xr.device_type()),
        "processes": xr.process_count() if spmd else s.world,
        "versions": {"torch": torch.__version__, "torch_xla": torch_xla.__version__},
        # the compiled module is one device's program: times the devices = the whole step
        "xla_flops_per_step": cost.dot_flops * cfg.devices if cost else None,
        "xla_flops_per_device": cost.dot_flops if cost else None,  # measured: one device's compiled program
        "comm_bytes_per_step": comm,
        # what the compiled step all-gathers: 0 for a data-parallel step with replicated parameters
        "gathered_bytes_per_step": sum(cost.all_gather_bytes) if cost and spmd else None,
        **({"replication_note": _replication_note(cost.all_gather_bytes, cfg.devices)}
           if cost and spmd and cost.all_gather_bytes and cfg.sharding == "none" else {}),
        "backend_info": {"launcher": cfg.launcher, "pjrt_device": xr.device_type(), "hlo_module": cost.module if cost else None,
                         "xla_flops": "dot/convolution FLOPs counted from the compiled HLO dump (XLA's cost analysis is private API)"},
    }


def _replication_note(gathers: tuple[int, ...], devices: int) -> str:
    """Why a step with replicated parameters gathers: the partitioner met an op it cannot split along
    the batch and runs it (and what follows it, up to the next split) on the whole global batch."""
    return (f"the compiled step all-gathers {len(gathers)} tensors ({sum(gathers) / 2**20:.3g} MiB) over {devices} devices: "
            "XLA's partitioner ran part of the model on the whole global batch on every device (not data parallel); "
            "podscale swaps torch's batch and layer norms for ones it can split (scaling/partitionable_norms.py), "
            "not a custom norm module or F.batch_norm / F.layer_norm called directly")


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
        reduce.bytes = flat.numel() * flat.element_size()  # type: ignore[attr-defined]  # measured: what gloo moved
        off = 0
        for p in params:
            n = p.numel()
            p.grad.copy_(flat[off : off + n].view_as(p).to(device))
            off += n

    return reduce


def _xm_sum(t: Any) -> Any:
    """The processes' sum of a host tensor, through torch_xla's on-device all-reduce."""
    import torch_xla
    import torch_xla.core.xla_model as xm

    return xm.all_reduce(xm.REDUCE_SUM, t.to(torch_xla.device())).cpu()


def _xm_gather(obj: Any) -> list[Any]:
    """Every process's object in ordinal order, pickled through torch_xla's on-device all-gather
    (xm.mesh_reduce unpickles through torch.load, which weights_only refuses)."""
    import torch
    import torch_xla
    import torch_xla.core.xla_model as xm

    dev = torch_xla.device()
    data = pickle.dumps(obj)
    sizes = xm.all_gather(torch.tensor([len(data)], dtype=torch.int32).to(dev)).cpu().tolist()
    row = torch.zeros(1, max(sizes), dtype=torch.int32)
    row[0, : len(data)] = torch.tensor(list(data), dtype=torch.int32)
    rows = xm.all_gather(row.to(dev)).cpu()
    return [pickle.loads(bytes(rows[i, :n].tolist())) for i, n in enumerate(sizes)]
