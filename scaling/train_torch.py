"""The torch training API: a user's own ``nn.Module``, optimizer, loss and data, data parallel.

Users import it as ``podscale.torch``. A script written against it runs unchanged under
``podscale run train.py --backend torch-ddp|torch-xla --devices N``, under ``podscale launch``, in a
notebook cell, and as plain ``python train.py`` (one process, one device)::

    import torch, podscale.torch as ps

    run = ps.init()                                    # rank, world, device, the run's config
    model = MyNet()                                    # built after init: seeded by --seed
    opt = torch.optim.Adam(model.parameters(), lr=run.config.lr)
    ps.fit(model, opt, torch.nn.CrossEntropyLoss(), (x, y), shuffle=True)   # x, y: numpy arrays

What ``fit`` does for the user, and why each part is here rather than in their script:

- **placement and the data-parallel wrap**: the model moves to the rank's device; on torch-ddp it is
  wrapped in ``DistributedDataParallel`` (gloo on CPU, NCCL on GPUs) when the world has more than
  one rank, so N ranks take the same SGD step as one (gradients averaged over equal local batches).
- **the loader** (``scaling.loader``): every rank computes the same global batch from
  ``(seed, epoch, step)`` and takes its contiguous slice; nothing is exchanged, and a resumed run
  finds its place from the step number.
- **the metered loop**: step wall times (the device is synchronised only where its work is
  asynchronous, and then only every ``sync_every`` steps); the first step's per-op record
  (matmul/conv shapes, FLOPs, bytes, from torch's own FLOP formulas) from which MFU and the
  prediction are computed; DDP's gradient bytes; heartbeats for the watchdog; ``PODSCALE_FAULT``.
- **checkpoints** of model, optimizer, loader position and RNG (atomic; a resumed run continues
  bit-for-bit), user scalars to TensorBoard, and the same result JSON as ``podscale run``.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import hashlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

from scaling import checkpoint, partitionable_norms, sharding_torch
from scaling.backends import gloo_io
from scaling.config import RunConfig
from scaling.context import WorkerContext
from scaling.errors import Diverged, UsageError
from scaling.fault import maybe_fault
from scaling.loader import IndexPlan
from scaling.session import BaseSession, host_rng_state, median, run_config, seed_host_rngs, set_host_rng_state

__all__ = ["Session", "init", "fit", "log", "report", "Loader", "session"]


# ---- the session: what podscale set up for this process ------------------------------------------


@dataclass
class Session(BaseSession):
    """This process's place in the run, and the torch device its model and batches go to."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


_SESSION: Session | None = None


def init(config: RunConfig | None = None, ctx: Any = None, fresh: bool = False) -> Session:
    """The session podscale set up (``podscale run``), or a one-process one for ``python train.py``.

    Idempotent. Seeds torch, numpy and ``random`` with ``--seed`` (the same on every rank, so a
    model built after ``init`` starts identical everywhere), and on torch-ddp with more than one
    rank joins the process group (unless Ray Train or the user already did)."""
    global _SESSION
    if _SESSION is not None and not fresh:
        return _SESSION
    if config is None:
        config = run_config(("torch-ddp", "torch-xla"), "podscale.torch")
    ctx = ctx or WorkerContext.from_env()
    cuda = torch.cuda.is_available()
    if dist.is_initialized():  # Ray Train, the zoo's worker or the user made the group: its ranks count
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = getattr(ctx, "local_rank", torch.cuda.current_device() if cuda else rank)
    else:
        rank, world, local_rank = ctx.rank, ctx.world, ctx.local_rank
    if config.backend == "torch-xla":
        import torch_xla
        import torch_xla.runtime as xr

        if config.launcher == "spmd":
            xr.use_spmd()  # before the first XLA tensor: the batch is sharded over a mesh of all devices
            devices = xr.global_runtime_device_count()
        elif config.script is not None:
            raise UsageError(f"--launcher {config.launcher}: podscale.torch runs torch-xla scripts as SPMD (one process, "
                             "all devices); omit --launcher")
        else:  # the zoo's one device per process: torchrun (its gloo group, adopted above) or torch_xla's spawn
            if config.launcher == "xmp":
                rank, world, local_rank = xr.global_ordinal(), xr.world_size(), xr.local_ordinal()
            devices = world
        if devices != config.devices:
            raise UsageError(f"--devices {config.devices}: this {xr.device_type()} runtime has "
                             f"{devices} device(s); use --devices {devices}")
        device = torch_xla.device()
        if xr.device_type() == "CPU":
            torch.set_num_threads(1)
    elif cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        if world > 1:
            torch.set_num_threads(1)  # N ranks share the host's cores (PLATFORM_NOTES)
    if config.backend == "torch-ddp" and world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=config.collective_timeout))
    if dist.is_initialized() and dist.get_backend() == "gloo":
        gloo_io.idle_io_threads()  # ranks on shared cores: gloo's spinning reader yields (gloo_io)
    torch.manual_seed(config.seed)
    seed_host_rngs(config.seed)
    _SESSION = Session(config, rank, world, local_rank, ctx, device=device)
    return _SESSION


def shutdown() -> None:
    """Leave the process group (every rank, at the end of the script)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def session() -> Session:
    return _SESSION if _SESSION is not None else init()


def log(name: str, value: float, step: int | None = None) -> None:
    session().log(name, value, step)


def report(**values: Any) -> None:
    session().report(**values)


# ---- the loader ------------------------------------------------------------------------------


class Loader:
    """This rank's batches of a dataset: a ``torch.utils.data.Dataset``, a tuple (or dict) of arrays
    or tensors with one first dimension, or an iterable of global batches (then each rank takes its
    slice of each; no shuffling: the iterable decides the order).

    ``len(loader)`` is the steps per epoch; iterating yields one epoch, starting at ``position``."""

    def __init__(self, data: Any, global_batch: int, *, rank: int, world: int, shuffle: bool = True,
                 seed: int = 0, remainder: str = "drop", device: torch.device | None = None,
                 collate: Callable[[list[Any]], Any] | None = None):
        self.rank, self.world, self.device = rank, world, device
        self.global_batch = global_batch
        self.epoch, self.step_in_epoch = 0, 0
        self._iterable: Iterable[Any] | None = None
        self._arrays: Any = None
        self._dataset: Any = None
        self._collate = collate
        self._step_fn: Callable[[int], Any] | None = None
        if callable(data) and not hasattr(data, "__getitem__"):
            self._step_fn, self.plan = data, None  # step -> global batch: the caller's own order
            return
        if isinstance(data, (tuple, list, dict)) and data and _is_arrays(data):
            self._arrays = data
            n = _first_dim(data)
        elif hasattr(data, "__getitem__") and hasattr(data, "__len__") and not isinstance(data, (str, bytes)):
            self._dataset = data
            n = len(data)
            if collate is None:
                from torch.utils.data import default_collate

                self._collate = default_collate
        elif isinstance(data, Iterable) and not isinstance(data, (str, bytes)):
            if shuffle:
                pass  # an iterable of global batches is walked in its own order
            self._iterable = data
            self.plan = None
            return
        else:
            raise UsageError(f"data of type {type(data).__name__}: expected a torch Dataset, a tuple/dict of arrays "
                             "with one first dimension, or an iterable of global batches")
        self.plan = IndexPlan(n, global_batch, world, shuffle, seed, remainder)

    def __len__(self) -> int:
        if self.plan is not None:
            return self.plan.steps_per_epoch
        if self._step_fn is not None:
            raise TypeError("a function of the step has no epochs: give fit steps")
        if hasattr(self._iterable, "__len__"):
            return len(self._iterable)  # type: ignore[arg-type]
        raise TypeError("an iterable of global batches without __len__ has no length")

    def seek(self, global_step: int) -> None:
        if self._step_fn is not None:
            self.step_in_epoch = global_step
            return
        if self.plan is None:
            raise UsageError("resuming needs an indexable dataset: an iterable of global batches cannot seek")
        self.epoch, self.step_in_epoch = self.plan.position(global_step)

    def __iter__(self) -> Iterator[Any]:
        if self._step_fn is not None:
            while True:
                gb = self._step_fn(self.step_in_epoch)
                self.step_in_epoch += 1
                yield self._to_device(_slice(gb, self.rank, self.world))
        if self.plan is None:
            for gb in self._iterable:  # type: ignore[union-attr]
                yield self._to_device(_slice(gb, self.rank, self.world))
            return
        while self.step_in_epoch < self.plan.steps_per_epoch:
            idx = self.plan.rank_indices(self.epoch, self.step_in_epoch, self.rank)
            self.step_in_epoch += 1
            yield self._to_device(self._take(idx))
        self.epoch, self.step_in_epoch = self.epoch + 1, 0

    def forever(self) -> Iterator[Any]:
        """Epoch after epoch (``fit`` with a step count)."""
        while True:
            n = 0
            for batch in self:
                n += 1
                yield batch
            if n == 0 and self.plan is None:
                return

    def _take(self, idx: np.ndarray) -> Any:
        if self._arrays is not None:
            return _index(self._arrays, idx)
        return self._collate([self._dataset[int(i)] for i in idx])  # type: ignore[misc]

    def _to_device(self, batch: Any) -> Any:
        on_host = self.device is None or self.device.type == "cpu"  # .to() costs a dispatch even when it is a no-op
        return _map(batch, lambda t: _as_tensor(t) if on_host else _as_tensor(t).to(self.device, non_blocking=True))


def _is_arrays(data: Any) -> bool:
    vals = data.values() if isinstance(data, dict) else data
    return all(isinstance(v, (np.ndarray, torch.Tensor)) for v in vals)


def _first_dim(data: Any) -> int:
    vals = list(data.values() if isinstance(data, dict) else data)
    ns = {len(v) for v in vals}
    if len(ns) != 1:
        raise UsageError(f"data arrays have different lengths {sorted(ns)}: each needs one entry per sample")
    return ns.pop()


def _index(data: Any, idx: np.ndarray) -> Any:
    if isinstance(data, dict):
        return {k: v[idx] if isinstance(v, np.ndarray) else v[torch.from_numpy(idx)] for k, v in data.items()}
    return type(data)(v[idx] if isinstance(v, np.ndarray) else v[torch.from_numpy(idx)] for v in data)


def _slice(batch: Any, rank: int, world: int) -> Any:
    n = _first_dim(batch) if isinstance(batch, (tuple, list, dict)) else len(batch)
    if n % world:
        raise UsageError(f"a global batch of {n} samples does not divide evenly over {world} devices")
    b = n // world
    return _map(batch, lambda t: t[rank * b : (rank + 1) * b])


def _map(batch: Any, fn: Callable[[Any], Any]) -> Any:
    if isinstance(batch, dict):
        return {k: _map(v, fn) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_map(v, fn) for v in batch)
    return fn(batch)


def _as_tensor(x: Any) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    return torch.as_tensor(x)


# ---- the per-op record of the first step -----------------------------------------------------------


class OpRecorder(TorchDispatchMode):
    """Every op torch counts FLOPs for (``torch.utils.flop_counter``'s own formulas, the numbers
    ``FlopCounterMode`` sums), with its shapes and the bytes of its inputs and outputs; and the
    forward pass op by op (``layers``: each matmul's GEMM shape, each other op's output elements),
    which the host predictor prices as layers of its measured table, as it does a spec's. The loop
    sets ``phase`` to "loss" once the model's forward is done: the loss and the backward are not
    layers of the model (the calibration's reference step holds a loss of its own)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[dict[str, Any]] = []
        self.phase = "forward"
        self.layers: dict[tuple[Any, ...], int] = {}
        self.backward_flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        flops = 0
        if packet in flop_registry:
            flops = int(flop_registry[packet](*args, **kwargs, out_val=out))
            ins = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
            outs = [a for a in tree_flatten(out)[0] if isinstance(a, torch.Tensor)]
            self.ops.append({"op": packet.__name__, "shapes": [list(a.shape) for a in ins], "flops": flops,
                             "bytes": int(sum(a.numel() * a.element_size() for a in ins + outs))})
        if self.phase == "forward" and torch.is_grad_enabled():
            key = _layer_key(func, packet, out, flops)
            if key is not None:
                self.layers[key] = self.layers.get(key, 0) + 1
        elif self.phase != "forward" and not torch.is_grad_enabled():  # the autograd engine's backward
            self.backward_flops += flops
        return out


#: ops the table has curves of their own for: norms, and GELU (10-17x a ReLU after a dense in XLA)
_CURVE_OPS = {"gelu": "gelu", "native_batch_norm": "batchnorm", "_native_batch_norm_legit": "batchnorm",
             "_native_batch_norm_legit_no_training": "batchnorm", "native_layer_norm": "layernorm"}


#: matmuls of many small matrices at once (attention's q k^T and a v): the table's batched-matmul curve
_BATCHED_MATMULS = {"bmm", "baddbmm"}


def _layer_key(func: Any, packet: Any, out: Any, flops: int) -> tuple[Any, ...] | None:
    """(kind, GEMM m, k, n, forward FLOPs, output elements) of one forward op, or None for one that
    is no layer: a view (an in-place op writes, and counts) or an op on a scalar (batch norm's
    step counter: one dispatch, no backward; the table's smallest layer costs 10-20x that)."""
    if any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns):
        return None
    first = next((a for a in tree_flatten(out)[0] if isinstance(a, torch.Tensor)), None)
    if first is None or first.numel() <= 1:
        return None
    elems = int(first.numel())
    name = packet.__name__
    if flops and first.dim() >= 2:
        conv = name.startswith("convolution") or name.startswith("conv")
        n = int(first.shape[1] if conv else first.shape[-1])
        kind = "conv" if conv else ("bmm" if name in _BATCHED_MATMULS else "dense")  # attention's products: many small ones
        return (kind, elems // n, flops / (2.0 * elems), n, flops, elems)
    return (_CURVE_OPS.get(name, "eltwise"), 0, 0.0, 0, 0, elems)


def summarize_ops(ops: Sequence[dict[str, Any]], recorder: OpRecorder | None = None, batch: int | None = None) -> dict[str, Any]:
    by_op: dict[str, dict[str, int]] = {}
    for o in ops:
        e = by_op.setdefault(o["op"], {"calls": 0, "flops": 0, "bytes": 0})
        e["calls"] += 1
        e["flops"] += o["flops"]
        e["bytes"] += o["bytes"]
    out: dict[str, Any] = {"flops": int(sum(o["flops"] for o in ops)), "bytes": int(sum(o["bytes"] for o in ops)),
                           "by_op": by_op, "gemm_flops": [o["flops"] for o in ops if o["flops"]]}
    if recorder is not None:
        out["layers"] = [{"kind": k[0], "m": k[1], "k": k[2], "n": k[3], "fwd_flops": k[4], "elems": k[5], "count": c}
                         for k, c in recorder.layers.items()]
        out["backward_gemm_flops"] = int(recorder.backward_flops)
        out["batch"] = batch
    return out


# ---- fit -------------------------------------------------------------------------------------------


@dataclass
class Hooks:
    """What a caller that owns more of the run (the model zoo, Ray Train) adds to ``fit``'s loop."""

    params: Callable[[torch.nn.Module], dict[str, np.ndarray]] | None = None
    """The final parameters by name (default: the state dict), for final_params.npz and the digest."""
    sync_state: Callable[[torch.nn.Module], None] | None = None
    """Called on every rank before a checkpoint and at the end (e.g. average BN running stats)."""
    on_checkpoint: Callable[[int, list[float]], None] | None = None
    """Called on every rank after each checkpoint with (step, global losses so far)."""
    ddp_kwargs: dict[str, Any] = field(default_factory=dict)
    reduce_grads: Callable[[], None] | None = None
    """Called after each backward, before the optimizer step: a backend's own gradient averaging
    where no DDP or SPMD program does it (torch-xla under torchrun or torch_xla's spawn)."""
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
    all_gather: Callable[[Any], list[Any]] | None = None
    """The ranks' sum of a host tensor, and every rank's object in rank order, where the ranks are
    no torch.distributed group (torch_xla's spawn); default: torch.distributed."""


def fit(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Callable[[Any, Any], torch.Tensor], data: Any, *,
        steps: int | None = None, epochs: int | None = None, global_batch: int | None = None, shuffle: bool = True,
        remainder: str = "drop", seed: int | None = None, sync_every: int | None = None,
        collate: Callable[[list[Any]], Any] | None = None, hooks: Hooks | None = None) -> dict[str, Any]:
    """Train ``model`` data parallel on ``data`` and report it; returns ``losses`` and ``step_time_s``.

    ``loss_fn(outputs, targets)`` takes ``model(inputs)`` and the targets of batches
    ``(inputs, targets)``, and returns a scalar (the mean over the local batch, so that DDP's
    averaging makes it the mean over the global batch). ``steps`` / ``global_batch`` default to
    the run's ``--steps`` / ``--global-batch``; ``epochs`` instead of ``steps`` trains whole epochs."""
    s = session()
    cfg = s.config
    gb = int(global_batch or cfg.global_batch)
    spmd = s.backend == "torch-xla" and cfg.launcher == "spmd"  # one program over the global batch: the mesh slices it
    if gb % s.world and not spmd:
        raise UsageError(f"global batch {gb} does not divide evenly over {s.world} devices; use a multiple of {s.world}")
    loader = Loader(data, gb, rank=0 if spmd else s.rank, world=1 if spmd else s.world,
                    shuffle=shuffle, seed=cfg.seed if seed is None else seed, remainder=remainder, device=s.device, collate=collate)
    if loader.plan is not None and spmd and gb % cfg.devices:
        raise UsageError(f"global batch {gb} does not divide evenly over {cfg.devices} devices; use a multiple of {cfg.devices}")
    if epochs is not None:
        if steps is not None:
            raise UsageError("give fit steps or epochs, not both")
        total = int(epochs) * len(loader)
    else:
        total = int(steps or cfg.steps)
    if total < 1:
        raise UsageError(f"fit would train {total} steps; give steps >= 1 (or epochs >= 1)")
    untimed = min(cfg.untimed_steps, total - 1)
    _place(model, optimizer, s.device)
    return _Loop(s, model, optimizer, loss_fn, loader, total, untimed, sync_every, hooks or Hooks()).run()


def _place(model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Move the model to the device, keeping the optimizer on the moved parameters: a move to a
    device of another tensor type (CPU -> XLA) makes new Parameter objects, and an optimizer made
    before the move would step the old ones."""
    before = list(model.parameters())
    model.to(device)
    moved = {id(a): b for a, b in zip(before, model.parameters()) if a is not b}
    if not moved:
        return
    for group in optimizer.param_groups:
        group["params"] = [moved.get(id(p), p) for p in group["params"]]
    state = optimizer.state
    for old_id, new in moved.items():
        for p in list(state):
            if id(p) == old_id:
                state[new] = state.pop(p)


#: consecutive runs of each part in one probe round (the ranks drift within them as in training)
PROBE_RUNS = 3


class _Loop:
    def __init__(self, s: Session, model: torch.nn.Module, opt: torch.optim.Optimizer, loss_fn: Callable[..., Any],
                 loader: Loader, total: int, untimed: int, sync_every: int | None, hooks: Hooks):
        self.s, self.model, self.opt, self.loss_fn, self.loader = s, model, opt, loss_fn, loader
        self.hooks = hooks
        self.total, self.untimed = total, untimed
        dev = s.device.type
        self.async_device = dev in ("cuda", "xla")
        # device syncs (CUDA, XLA) and the finiteness check of the losses happen once per window, not
        # per step: on CPU the step times are still per step (nothing runs asynchronously there)
        self.sync_every = max(1, int(sync_every or 10))
        self.syncs = 0
        # FSDP2 over the ranks (torch-ddp, N > 1); ``twin`` is the model's unsharded shape, filled at the end
        spmd = s.backend == "torch-xla" and s.config.launcher == "spmd"
        self.sharding = s.config.sharding if (s.backend == "torch-ddp" and s.world > 1) or (spmd and s.config.devices > 1) else "none"
        self.twin: torch.nn.Module | None = None
        self.grads_bytes: int | None = None
        self.mesh: Any = None  # torch-xla SPMD: the 1-D ``data`` mesh of all devices the batch is sharded over
        if s.backend == "torch-xla" and s.config.launcher == "spmd":
            import torch_xla.distributed.spmd as xs

            self.mesh = xs.Mesh(np.arange(s.config.devices), (s.config.devices,), ("data",))
            if s.config.devices > 1:  # norms the partitioner would gather the batch for (``partitionable_norms``)
                partitionable_norms.make_partitionable(model, 1 if s.config.sync_bn else s.config.devices)

    # -- state that a checkpoint holds
    def _state(self, step: int, losses: list[float], times: list[float]) -> dict[str, Any]:
        """What a checkpoint holds; for a sharded run the whole tensors by name (a collective: every
        rank calls it), so that a resume may run on another N."""
        if self.twin is not None:
            model_sd, opt_sd = sharding_torch.full_state(self.model, self.opt)
        else:
            # on the host: a checkpoint is device-independent (an XLA tensor would not load elsewhere)
            model_sd = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
            opt_sd = self.opt.state_dict()
            if self.s.device.type == "xla":
                opt_sd = {"state": {i: {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in st.items()}
                                    for i, st in opt_sd["state"].items()}, "param_groups": opt_sd["param_groups"]}
        return {
            "model": model_sd,
            "optimizer": opt_sd,
            "sharding": self.sharding,
            "format": "by-name" if self.twin is not None else "module",  # FSDP2's whole tensors by name, or state_dict()s
            "step": step,
            "losses": torch.tensor(losses, dtype=torch.float64),
            "step_times": torch.tensor(times, dtype=torch.float64),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state() if self.s.device.type == "cuda" else torch.zeros(0, dtype=torch.uint8),
            "host_rng": {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in host_rng_state().items()},
            "scalars": {k: [[a, b] for a, b in v] for k, v in self.s.scalars.items()},
        }

    def _restore(self, st: dict[str, Any]) -> tuple[int, list[float], list[float]]:
        saved = st.get("sharding", "none")
        if st.get("format", "module") != ("by-name" if self.twin is not None else "module"):
            raise UsageError(f"the checkpoint was written with --sharding {saved}; resume with --sharding "
                             f"{'none' if saved == 'none' else 'optimizer or full'} (any --devices)")
        if self.twin is not None:
            sharding_torch.load_full_state(self.model, self.opt, st["model"], st["optimizer"])
        else:
            self.model.load_state_dict(st["model"])
            self.opt.load_state_dict(st["optimizer"])
        torch.set_rng_state(st["torch_rng"])
        if self.s.device.type == "cuda" and st["cuda_rng"].numel():
            torch.cuda.set_rng_state(st["cuda_rng"])
        set_host_rng_state({k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in st["host_rng"].items()})
        self.s.scalars.update({k: [(int(a), float(b)) for a, b in v] for k, v in st["scalars"].items()})
        return int(st["step"]), st["losses"].tolist(), st["step_times"].tolist()

    def run(self) -> dict[str, Any]:
        s, cfg = self.s, self.s.config
        if self.twin is None and self.sharding != "none" and s.backend == "torch-ddp":  # before a resume: its state loads into the shards
            self.twin = sharding_torch.shard(self.model, self.opt, self.sharding)
        start, losses_done, times_done = 0, [], []
        ckpt = checkpoint.latest(cfg.checkpoint_dir, "pt") if cfg.resume and cfg.checkpoint_dir else None
        if ckpt is not None:
            start, losses_done, times_done = self._restore(checkpoint.load_torch(ckpt[1]))
            if start >= self.total:
                start = self.total
        if self.loader.plan is not None or self.loader._step_fn is not None:
            self.loader.seek(start)
        wrapped = self._wrap()
        if dist.is_initialized() and dist.get_backend() == "gloo":
            gloo_io.idle_io_threads()  # any group made since init (the user's own, FSDP's)
        autocast = torch.autocast(s.device.type if s.device.type != "xla" else "xla", dtype=torch.bfloat16,
                                  enabled=cfg.dtype == "bfloat16")
        local = torch.zeros(max(self.total - start, 1), dtype=torch.float64 if s.device.type != "xla" else torch.float32, device=s.device)
        times: list[float] = []
        record: dict[str, Any] | None = None
        batches = self.loader.forever()
        window_t0, window_n = time.perf_counter(), 0
        for step in range(start, self.total):
            s.step = step
            maybe_fault(s.rank, step)
            t0 = time.perf_counter()
            try:
                inputs, targets = _split_batch(next(batches))
            except StopIteration:
                raise UsageError(f"the data ran out at step {step} of {self.total}; give fewer steps or more batches") from None
            if self.mesh is not None:
                inputs, targets = _map(inputs, self._shard), _map(targets, self._shard)
                if step == start and self.sharding == "full":  # the parameters too: XLA gathers them per use
                    sharding_torch.mark_xla(list(self.model.parameters()), self.mesh, s.config.devices)
            recorder = OpRecorder() if record is None else contextlib.nullcontext()
            with recorder:
                with autocast:
                    out = wrapped(inputs)
                if isinstance(recorder, OpRecorder):
                    recorder.phase = "loss"
                loss = self._loss(out, targets, first=record is None)
                loss.backward()
            if record is None:  # gradients at their fullest, before the optimizer step frees them
                self.grads_bytes = sharding_torch.state_bytes(self.model, self.opt)["grads_bytes"]
            if self.hooks.reduce_grads:
                self.hooks.reduce_grads()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            if self.mesh is not None and self.sharding != "none" and step == start:  # Adam's state exists from here on
                sharding_torch.mark_xla([v for st in self.opt.state.values() for v in st.values()
                                         if isinstance(v, torch.Tensor) and v.dim() > 0], self.mesh, s.config.devices)
            if self.mesh is not None and self.sharding == "optimizer":  # every step: the update's output stays whole
                sharding_torch.replicate_xla(list(self.model.parameters()), self.mesh)
            if s.device.type == "xla":
                import torch_xla

                # the loss joins the step's graph; its index is data (a Python index would be a constant
                # of the graph: a compile per step)
                local.index_copy_(0, torch.tensor([step - start], device=s.device), loss.detach().reshape(1).to(local.dtype))
                torch_xla.sync()
            else:
                local[step - start] = loss.detach().to(local.dtype)
            if record is None:
                record = summarize_ops(recorder.ops, recorder, self.loader.global_batch // self.loader.world)  # type: ignore[union-attr,arg-type]
                record["optimizer"] = optimizer_kind(self.opt)
                # what one sample's inputs and targets weigh as they arrive: the host's data term
                record["sample_bytes"] = sum(int(t.numel()) * t.element_size() for t in tree_flatten((inputs, targets))[0]
                                             if isinstance(t, torch.Tensor)) / max(1, record["batch"] or 1)
                record["comm_bytes"] = sharding_torch.comm_bytes(self.model, self.sharding) if self.twin is not None \
                    else _bucket_bytes(wrapped)
            window_n += 1
            boundary = step + 1 == self.total or step < self.untimed or window_n >= self.sync_every \
                or (cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0)
            if boundary:
                self._sync(local[step - start])
                now = time.perf_counter()
                per = (now - window_t0) / window_n if self.async_device else None
                times.extend([per] * window_n if per is not None else [])
                self._check_finite(local, start, step, window_n, losses_done)
                window_t0, window_n = now, 0
            if not self.async_device:
                times.append(time.perf_counter() - t0)
            s.ctx.beat(step + 1)
            if cfg.checkpoint_dir and cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < self.total:
                glob = self._global_losses(_read(local, 0, step + 1 - start), losses_done)
                if self.hooks.sync_state:
                    self.hooks.sync_state(self.model)
                state = self._state(step + 1, glob, times_done + times) if s.rank == 0 or self.twin is not None else None
                if s.rank == 0:
                    checkpoint.save_torch(cfg.checkpoint_dir, step + 1, state)
                if self.hooks.on_checkpoint:
                    self.hooks.on_checkpoint(step + 1, glob)
        losses = self._global_losses(_read(local, 0, self.total - start), losses_done)
        all_times = times_done + times
        if self.hooks.sync_state:
            self.hooks.sync_state(self.model)
        if cfg.checkpoint_dir and start < self.total and (s.rank == 0 or self.twin is not None):
            state = self._state(self.total, losses, all_times)
            if s.rank == 0:
                checkpoint.save_torch(cfg.checkpoint_dir, self.total, state)
        last = (inputs, targets) if self.total > start else None
        breakdown = self._probe(batches, wrapped, autocast, median(all_times[self.untimed:]) if all_times[self.untimed:] else None, last)
        self._finish(losses, all_times, record, start)
        if s.rank == 0 and s.result is not None:
            s.result["breakdown"] = breakdown
        return {"losses": losses, "step_time_s": median(all_times[self.untimed:]), "steps": self.total}

    def _probe(self, batches: Iterator[Any], wrapped: Any, autocast: Any, step_s: float | None, last: Any) -> dict[str, Any]:
        """Where a step's time goes, measured after training (the model, optimizer and RNG restored
        afterwards, so the run's results are those of its training). K rounds, each of a few
        consecutive runs of every part, interleaved so that the machine's drift touches all alike:

        - data: the next batch from the loader, on the device;
        - compute: forward + backward + optimizer step on that batch without the gradient all-reduce
          (DDP ``no_sync``; at one rank there is none);
        - full: the same step with the all-reduce; comm (exposed) = full - compute;
        - step: data + full as the training loop runs them, timed as one;
        - unattributed = step - data - compute - comm: what the parts do not explain (timed apart,
          so not zero by construction). ``train_step_s`` is the training loop's own median step.
        """
        s, k = self.s, self.s.config.probe_rounds(self.total)
        if k == 0 or step_s is None or last is None:
            return {"probes": 0, "measured": None, "why": s.config.probe_why_none(self.total) if k == 0 else "no timed steps"}
        if self.mesh is not None and self.sharding == "none":
            return self._probe_spmd(batches, wrapped, autocast, step_s, last, k)
        if self.mesh is not None or s.device.type == "xla":
            return {"probes": 0, "measured": None, "why": "not measured on torch-xla with --sharding or its torchrun and xmp "
                                                          "launchers yet (measured under SPMD with replicated parameters)"}
        ddp = s.world > 1 and (hasattr(wrapped, "no_sync") or self.twin is not None)

        def no_sync() -> Any:
            return sharding_torch.no_grad_sync(self.model) if self.twin is not None else wrapped.no_sync()
        fetched: list[Any] = [last]  # the last training batch, until a probe fetches its own
        exhausted = False

        def fetch() -> None:
            nonlocal exhausted
            if exhausted:
                return
            try:
                fetched[:] = [_split_batch(next(batches))]
            except StopIteration:  # a finite iterable of batches, used up: its last batch serves the rest
                exhausted = True

        def step(sync_grads: bool) -> None:
            inputs, targets = fetched[-1]
            with (contextlib.nullcontext() if sync_grads or not ddp else no_sync()):
                with autocast:
                    out = wrapped(inputs)
                self.loss_fn(out, targets).backward()
            if sync_grads and self.hooks.reduce_grads:
                self.hooks.reduce_grads()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)

        def loop_step() -> None:
            fetch()
            step(sync_grads=True)

        fns = {"data": fetch, "compute": lambda: step(sync_grads=False), "full": lambda: step(sync_grads=True), "step": loop_step}
        # each part starts together (a barrier); within its runs the ranks drift as in training
        parts = self._time_parts(fns, k, before_part=dist.barrier if s.world > 1 else None,
                                 after_run=(lambda: torch.cuda.synchronize(s.device)) if s.device.type == "cuda" else None)
        return _measured(parts, exhausted, s.world > 1, step_s, k)

    def _time_parts(self, fns: dict[str, Callable[[], Any]], k: int, before_part: Callable[[], Any] | None = None,
                    after_run: Callable[[], Any] | None = None, warm: bool = False,
                    finally_: Callable[[], Any] | None = None) -> dict[str, list[float]]:
        """Every probe's timing: K rounds of ``PROBE_RUNS`` consecutive runs of each part, interleaved
        so that the machine's drift touches all alike (each part run once first when ``warm``: its
        graph compiles there, not in its timing). The probes train, so the model, optimizer and RNG
        are restored afterwards: the run's results stay those of its training."""
        saved = (copy.deepcopy(self.model.state_dict()), copy.deepcopy(self.opt.state_dict()), torch.get_rng_state())
        parts: dict[str, list[float]] = {name: [] for name in fns}
        try:
            if warm:
                for fn in fns.values():
                    fn()
            for _ in range(k):
                for name, fn in fns.items():
                    if before_part is not None:
                        before_part()
                    for _ in range(PROBE_RUNS):
                        t = time.perf_counter()
                        fn()
                        if after_run is not None:
                            after_run()
                        parts[name].append(time.perf_counter() - t)
                    self.s.ctx.beat(self.total)  # alive: the watchdog's --step-timeout covers each probe part too
        finally:
            self.model.load_state_dict(saved[0])
            self.opt.load_state_dict(saved[1])
            torch.set_rng_state(saved[2])
            if finally_ is not None:
                finally_()
        return parts

    def _probe_spmd(self, batches: Iterator[Any], wrapped: Any, autocast: Any, step_s: float, last: Any, k: int) -> dict[str, Any]:
        """``_probe`` under torch-xla SPMD, where the partitioner, not the loop, inserts the gradient
        all-reduce: the compute part is the same compiled step on each device's share of the batch
        replicated over the mesh (every device runs its own share's work, as in training, and no
        gradient needs reducing), the full part the training step itself. Each part is one more
        compiled graph, run once before the timing; every run ends with the device drained."""
        import torch_xla
        import torch_xla.core.xla_model as xm

        s, n = self.s, self.s.config.devices
        per = max(1, self.loader.global_batch // n)
        # one device's share, a fresh unsharded (so replicated) tensor: no collective to build it per run
        share = _map(last, lambda t: t[:per].cpu().to(s.device) if isinstance(t, torch.Tensor) and t.dim() > 0 else t)
        fetched: list[Any] = [last]
        exhausted = False

        def drain() -> None:
            torch_xla.sync()
            xm.wait_device_ops()

        def fetch() -> None:
            nonlocal exhausted
            if not exhausted:
                try:
                    fetched[:] = [_map(_split_batch(next(batches)), self._shard)]
                except StopIteration:
                    exhausted = True
            drain()

        def step(batch: Any) -> None:
            inputs, targets = batch
            with autocast:
                out = wrapped(inputs)
            self.loss_fn(out, targets).backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            drain()

        def compute() -> None:
            if n == 1:  # one device: the training step itself, nothing to reduce
                return step(fetched[-1])
            # batch norm over the share's own samples: what each device's statistics cover in training
            partitionable_norms.make_partitionable(self.model, 1)
            try:
                step(share)
            finally:
                partitionable_norms.make_partitionable(self.model, 1 if s.config.sync_bn else n)

        fns = {"data": fetch, "compute": compute, "full": lambda: step(fetched[-1]), "step": lambda: (fetch(), step(fetched[-1]))}
        parts = self._time_parts(fns, k, warm=True, finally_=drain)
        return {**_measured(parts, exhausted, n > 1, step_s, k),
                "note": "parts timed with the device drained after each; training traces the next step while the "
                        "device runs this one, so its step (train_step_s) can be shorter than theirs (step_s)"}

    def _wrap(self) -> Any:
        s = self.s
        m: Any = self.model
        if s.backend == "torch-ddp" and s.world > 1 and self.twin is None:
            from torch.nn.parallel import DistributedDataParallel as DDP

            m = DDP(m, device_ids=[s.device.index] if s.device.type == "cuda" else None, **self.hooks.ddp_kwargs)
        if s.config.compile:
            m = torch.compile(m)
        return m

    def _shard(self, t: Any) -> Any:
        """torch-xla SPMD data parallelism: a batch tensor sharded along its first axis over the mesh,
        parameters replicated; XLA's partitioner inserts the gradient all-reduce."""
        if isinstance(t, torch.Tensor) and t.dim() > 0:
            import torch_xla.distributed.spmd as xs

            xs.mark_sharding(t, self.mesh, ("data",) + (None,) * (t.dim() - 1))
        return t

    def _loss(self, out: Any, targets: Any, first: bool) -> torch.Tensor:
        try:
            loss = self.loss_fn(out, targets)
        except Exception as e:  # noqa: BLE001 - on the first batch this is a mismatch of model and loss
            if not first:
                raise
            raise UsageError(f"the loss cannot take the model's output: loss_fn({_describe(out)}, {_describe(targets)}) "
                             f"raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            got = f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise UsageError(f"loss_fn returned {got}; it must return a scalar tensor (reduce with .mean())")
        if not loss.requires_grad:
            raise UsageError("loss_fn returned a tensor without a gradient: compute it from the model's output")
        return loss.reshape(())

    def _sync(self, t: torch.Tensor) -> None:
        if not self.async_device:
            return
        self.syncs += 1
        if self.s.device.type == "cuda":
            torch.cuda.synchronize(self.s.device)
        else:
            import torch_xla.core.xla_model as xm

            xm.wait_device_ops()

    def _check_finite(self, local: torch.Tensor, start: int, step: int, n: int, done: list[float]) -> None:
        """The last ``n`` steps' losses (the ones since the previous sync) are all finite; else the run
        stops (exit 4) with the step and this rank's losses up to it (for the run's JSON)."""
        first = step + 1 - n
        window = _read(local, first - start, step + 1 - start).cpu()
        bad = (~torch.isfinite(window)).nonzero()
        if len(bad):
            at = first + int(bad[0])
            so_far = done + [float(v) for v in _read(local, 0, at + 1 - start).cpu().to(torch.float64)]
            raise Diverged(f"non-finite loss ({float(window[int(bad[0])])}) at step {at} on rank {self.s.rank}", at, so_far)

    def _global_losses(self, part: torch.Tensor, done: list[float]) -> list[float]:
        """Mean over ranks of each step's local loss (one collective for all steps)."""
        part = part.detach().to(torch.float64).clone()
        if self.s.world > 1:
            if self.hooks.all_reduce:
                part = self.hooks.all_reduce(part)
            else:
                dist.all_reduce(part)
            part /= self.s.world
        return list(done) + part.cpu().tolist()

    def _gather(self, obj: Any) -> list[Any]:
        if self.hooks.all_gather:
            return self.hooks.all_gather(obj)
        out: list[Any] = [None] * self.s.world
        dist.all_gather_object(out, obj)
        return out

    def _finish(self, losses: list[float], times: list[float], record: dict[str, Any] | None, start: int) -> None:
        s = self.s
        memory: dict[str, Any] = sharding_torch.state_bytes(self.model, self.opt)  # this rank's, before anything is gathered
        memory["grads_bytes"] = self.grads_bytes  # as they stood after the first backward
        memory["rss_peak_bytes"] = _peak_rss()
        # the allocator's own peak where the device keeps one (CUDA); None on CPU, where RSS is the figure
        memory["device_peak_bytes"] = int(torch.cuda.max_memory_allocated(s.device)) if s.device.type == "cuda" else None
        whole = sharding_torch.gathered(self.model, self.twin) if self.twin is not None else self.model
        params = self.hooks.params(whole) if self.hooks.params else \
            {k: v.detach().float().cpu().numpy() for k, v in whole.state_dict().items()}
        digest = hashlib.sha256(b"".join(np.ascontiguousarray(params[k]).tobytes() for k in sorted(params))).hexdigest()
        digests, records, memories = [digest], [record or {}], [memory]
        if s.world > 1:
            digests, records, memories = self._gather(digest), self._gather(record or {}), self._gather(memory)
        if self.mesh is not None:
            digests = _device_digests(self.model)
        if s.rank != 0:
            return
        if s.ctx.run_dir is not None:
            np.savez(s.ctx.run_dir / "final_params.npz", **params)
        measured = bool(record)
        flops = [r.get("flops") for r in records] if measured else None
        comm = [r.get("comm_bytes") for r in records] if measured and s.world > 1 else None
        n_params = sum(p.numel() for p in whole.parameters())
        s.result = {
            "model": type(self.model).__name__,
            "params": int(n_params),
            "global_batch": self.loader.global_batch,
            "grad_bytes": int(sum(p.numel() * p.element_size() for p in whole.parameters() if p.requires_grad)),
            "sharding": self.sharding,
            "memory": {"per_rank": memories, "basis": "bytes of each rank's live tensors (its shards when sharded); "
                       "rss_peak_bytes: each process's peak resident set (ru_maxrss), not divided by N"} if self.mesh is None else
                      {"per_device": sharding_torch.xla_device_bytes(self.model, self.opt), "per_process": memories,
                       "basis": "bytes of each XLA device's local shards of parameters and optimizer state; per_process: "
                                "the one SPMD process's tensors at their global size, and its peak RSS"},
            "losses": losses,
            "step_times": times,
            "steps": self.total,
            "untimed_steps": self.untimed,
            "final_params_l2": float(math.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in params.values()))),
            "replicas_identical": len(set(digests)) == 1,
            "resumed_from_step": start or None,
            "device_kind": s.device.type,
            "device_syncs": self.syncs,
            "sync_every": self.sync_every if self.async_device else None,
            "flops_per_device": flops,
            # per rank at its local batch on torch-ddp; one SPMD program over the global batch on torch-xla
            "model_flops_per_step": float(sum(f or 0 for f in flops)) if flops else None,
            "comm_bytes_per_step": comm,
            "op_record": _record_for_json(record),
            "processes": s.world,
            "versions": {"torch": torch.__version__},
            "scalars": {k: [[a, b] for a, b in v] for k, v in s.scalars.items()},
        }


def _measured(parts: dict[str, list[float]], exhausted: bool, multi: bool, step_s: float, k: int) -> dict[str, Any]:
    """The probes' medians as the breakdown: exposed communication = full - compute (none on one device)."""
    med = {name: median(v) for name, v in parts.items()}
    data = None if exhausted else med["data"]
    comm = max(0.0, med["full"] - med["compute"]) if multi else 0.0
    measured = {"data_s": data, "compute_s": med["compute"], "comm_exposed_s": comm,
                "unattributed_s": med["step"] - (data or 0.0) - med["compute"] - comm, "step_s": med["step"],
                "train_step_s": step_s}
    return {"probes": k, "runs_per_probe": PROBE_RUNS, "measured": measured,
            "why": None if data is not None else "data not measured: the batches ran out"}


def _peak_rss() -> int | None:
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux
    except (ImportError, OSError):
        return None


def _read(local: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """``local[lo:hi]``, detached; on XLA read whole to the host (after a sync: a transfer, no compile)
    and sliced there, as a device slice of new bounds would compile a graph of its own."""
    return local.detach().cpu()[lo:hi] if local.device.type == "xla" else local[lo:hi].detach()


def _device_digests(model: torch.nn.Module) -> list[str]:
    """torch-xla SPMD: each device's copy of the replicated parameters, read back and hashed: proof
    that the program kept every replica identical, not an assumption."""
    from torch_xla.distributed.spmd import XLAShardedTensor

    per_device: dict[str, list[np.ndarray]] = {}
    parts: dict[tuple[int, str], set[bytes]] = {}  # (parameter, shard index) -> the bytes each holder has
    for i, p in enumerate(model.parameters()):
        for shard in XLAShardedTensor(p.data).local_shards:
            a = np.ascontiguousarray(shard.data.cpu().numpy())
            per_device.setdefault(str(shard.shard_device), []).append(a)
            parts.setdefault((i, str(getattr(shard, "indices", None))), set()).add(a.tobytes())
    if any(len(v) > 1 for v in parts.values()):  # some devices disagree on the same part
        return [hashlib.sha256(b"".join(a.tobytes() for a in arrays)).hexdigest() for arrays in per_device.values()]
    return [hashlib.sha256(b"".join(sorted(next(iter(v)) for v in parts.values()))).hexdigest()]  # one state, however split


def _split_batch(batch: Any) -> tuple[Any, Any]:
    if isinstance(batch, dict) and {"inputs", "targets"} <= set(batch):
        return batch["inputs"], batch["targets"]
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise UsageError(f"a batch must be (inputs, targets) or a dict with 'inputs' and 'targets'; got {_describe(batch)}")


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor of shape {tuple(x.shape)}"
    if isinstance(x, (tuple, list)):
        return f"{type(x).__name__} of {len(x)}"
    return type(x).__name__


def _bucket_bytes(m: Any) -> float | None:
    """Bytes DDP's reducer all-reduces per step, as DDP records its buckets (not a Python hook:
    bench/overhead.py measured a counting hook at +9% step time)."""
    try:
        sizes = str(getattr(m, "_orig_mod", m)._get_ddp_logging_data().get("bucket_sizes", ""))
        return float(sum(int(x) for x in sizes.split(",") if x.strip()))
    except Exception:  # noqa: BLE001 - not DDP, or a private API that changed: "not measured"
        return None


def optimizer_kind(opt: torch.optim.Optimizer) -> str | None:
    """Which of the layer table's update curves prices this optimizer's step (``adam`` for Adam and
    AdamW: the same four passes over the state), or None for one it has no curve for. A user's
    script builds its own optimizer, so the prediction reads it off the run, not off --optimizer."""
    name = type(opt).__name__.lower()
    return "adam" if name in ("adam", "adamw") else "sgd" if name == "sgd" else None


def _record_for_json(record: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if record is None else {k: v for k, v in record.items() if k != "comm_bytes"}
