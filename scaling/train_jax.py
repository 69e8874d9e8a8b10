"""The JAX training API: a user's own ``flax.nnx`` Module, optax optimizer, loss and data.

Users import it as ``podscale.jax``. A script written against it runs unchanged under
``podscale run train.py --backend jax-pmap|jax-sharded --devices N [--processes P]``::

    import optax, podscale.jax as ps
    from flax import nnx

    run = ps.init()                              # joins jax.distributed when --processes > 1
    model = MyLM(rngs=nnx.Rngs(run.config.seed))
    ps.fit(model, optax.adam(1e-3), loss_fn, {"tokens": tokens})   # loss_fn(model, batch) -> scalar

``loss_fn(model, batch)`` returns the mean loss of the batch it is given. podscale builds the
data-parallel step around it:

- ``jax-sharded``: one ``jit`` of the global step, the batch sharded over a 1-D ``data`` mesh
  (``NamedSharding``), parameters and optimizer state replicated; XLA partitions it and inserts
  the gradient all-reduce, so the step *is* the single-device step on the global batch.
- ``jax-pmap``: ``pmap`` of the per-device step with ``pmean`` of loss and gradients over the
  devices: with equal local batches, the mean over the global batch (``psum`` for a loss that
  sums, ``Hooks.loss_reduction``). ``PODSCALE_JAX_STEP=shard_map`` runs the same per-device step
  on jax-sharded, as ``jit`` of a ``shard_map``.

Each process puts its contiguous slice of every global batch on its own devices (multi-process
through ``jax.distributed``). The step is compiled once ahead of time and that executable is what
runs: FLOPs and all-reduce bytes come from it (XLA's cost analysis and its HLO), not from a second
program. The host syncs on the loss every ``sync_every`` steps (at most 16: more queued
collectives deadlock XLA-CPU, PLATFORM_NOTES). The model zoo trains through this same loop
(``scaling.backends.jax_train``: its data as a function of the step, ``Hooks`` for the rest).
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from scaling import checkpoint
from scaling.backends import gloo_io, jax_hlo
from scaling.backends.jax_env import hardware_id, step_kind
from scaling.config import RunConfig
from scaling.context import WorkerContext
from scaling.errors import Diverged, UsageError
from scaling.fault import maybe_fault
from scaling.loader import IndexPlan
from scaling.session import BaseSession, host_rng_state, median, run_config, seed_host_rngs, set_host_rng_state

__all__ = ["Session", "Hooks", "init", "fit", "log", "report", "Loader", "session"]

AXIS = "data"
MAX_UNSYNCED = 16


@dataclass
class Session(BaseSession):
    """This process's place in the run (``rank`` = JAX process index) and the run's devices."""

    devices: tuple[Any, ...] = ()

    @property
    def local_devices(self) -> list[Any]:
        return [d for d in self.devices if d.process_index == jax.process_index()]


_SESSION: Session | None = None


def init(config: RunConfig | None = None, ctx: Any = None, fresh: bool = False) -> Session:
    """The session podscale set up, or a one-process one for ``python train.py``. Idempotent
    (``fresh`` starts a new one: the model zoo's worker passes its config and context); joins
    ``jax.distributed`` when the run has several processes; seeds numpy and ``random``."""
    global _SESSION
    if _SESSION is not None and not fresh:
        return _SESSION
    cfg = config or run_config(("jax-pmap", "jax-sharded"), "podscale.jax")
    ctx = ctx or WorkerContext.from_env()
    if ctx.world > 1 and not jax.distributed.is_initialized():
        _init_distributed(cfg, ctx)
    seed_host_rngs(cfg.seed)
    _SESSION = Session(cfg, jax.process_index(), jax.process_count(), 0, ctx, devices=tuple(run_devices(cfg)))
    return _SESSION


def shutdown() -> None:
    """Leave ``jax.distributed`` (every process, at the end: process 0 runs its coordinator)."""
    if _SESSION is not None and _SESSION.world > 1 and jax.distributed.is_initialized():
        jax.distributed.shutdown()


def session() -> Session:
    return _SESSION if _SESSION is not None else init()


def log(name: str, value: float, step: int | None = None) -> None:
    session().log(name, value, step)


def report(**values: Any) -> None:
    session().report(**values)


def run_devices(cfg: RunConfig) -> list[Any]:
    """The run's devices in global order: process 0's first, so each process's slice of the
    global batch lands on its own devices (ids are not contiguous across processes)."""
    procs = jax.process_count()
    per = cfg.devices // procs
    out = []
    for p in range(procs):
        local = sorted((d for d in jax.devices() if d.process_index == p), key=lambda d: d.id)
        if len(local) < per:
            raise UsageError(f"--devices {cfg.devices} over {procs} process(es) needs {per} JAX devices per process; "
                             f"process {p} has {len(local)} ({local[0].platform if local else 'none'})")
        out.extend(local[:per])
    return out


def _init_distributed(cfg: RunConfig, ctx: Any) -> None:
    addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = os.environ["MASTER_PORT"]  # free: jax is the only user of it in a jax run
    # one host: keep gloo on loopback too; across hosts (Ray) each host binds its own address, JAX's default
    _gloo_collectives(addr if addr in ("127.0.0.1", "localhost") else None)
    jax.distributed.initialize(
        coordinator_address=f"{addr}:{port}",
        coordinator_bind_address=f"{addr}:{port}",
        num_processes=ctx.world,
        process_id=ctx.rank,
        initialization_timeout=max(10, int(cfg.startup_timeout)),
    )


def _gloo_collectives(loopback: str | None) -> None:
    """Wrap jaxlib's ``make_gloo_tcp_collectives(client)``, which JAX calls to build its CPU
    collectives across processes: on one host pass the loopback address as ``hostname`` (it binds
    to the host name's address otherwise, and there is no public option), and put the reader
    thread the factory starts at gloo's I/O priority (``gloo_io``: the same 4 ms spin as torch's
    gloo). jaxlib starts that thread unnamed; it is named ``gloo_tcp_loop`` here, as torch's is."""
    try:
        from jax._src import xla_bridge as xb
    except ImportError:  # pragma: no cover - layout moved: keep JAX's default
        return
    mod = getattr(xb, "_jax", None) or getattr(getattr(xb, "xla_client", None), "_xla", None)
    make = getattr(mod, "make_gloo_tcp_collectives", None)
    if make is None or getattr(make, "_podscale", False):
        return

    def wrapped(distributed_client: Any, hostname: str | None = None, interface: str | None = None) -> Any:
        before = gloo_io.thread_ids()
        made = make(distributed_client=distributed_client, hostname=hostname or loopback, interface=interface)
        gloo_io.name_io_threads(gloo_io.thread_ids() - before)
        gloo_io.idle_io_threads()
        return made

    wrapped._podscale = True  # type: ignore[attr-defined]
    setattr(mod, "make_gloo_tcp_collectives", wrapped)


class Loader:
    """This process's batches: a tuple/dict of numpy arrays with one first dimension (walked by
    ``scaling.loader``'s rule), an iterable of global batches, or a function of the step that
    returns its global batch (the caller's own order: the model zoo's); each process takes its
    contiguous slice of every global batch."""

    def __init__(self, data: Any, global_batch: int, *, rank: int, world: int, shuffle: bool = True, seed: int = 0,
                 remainder: str = "drop", devices: int = 1):
        self.rank, self.world = rank, world
        self.epoch, self.step_in_epoch = 0, 0
        self.data, self._iterable = None, None
        self.plan: IndexPlan | None = None
        self.step_fn: Callable[[int], Any] | None = None
        if isinstance(data, (tuple, list, dict)) and data and all(isinstance(v, np.ndarray) for v in _values(data)):
            ns = {len(v) for v in _values(data)}
            if len(ns) != 1:
                raise UsageError(f"data arrays have different lengths {sorted(ns)}: each needs one entry per sample")
            self.data = data
            self.plan = IndexPlan(ns.pop(), global_batch, devices, shuffle, seed, remainder)
        elif isinstance(data, Iterable) and not isinstance(data, (str, bytes)):
            self._iterable = data
        elif callable(data):
            self.step_fn = data
        else:
            raise UsageError(f"data of type {type(data).__name__}: expected a tuple/dict of numpy arrays with one first "
                             "dimension, an iterable of global batches, or a function step -> global batch")

    def __len__(self) -> int:
        if self.plan is not None:
            return self.plan.steps_per_epoch
        if self.step_fn is not None:
            raise UsageError("a function of the step has no epochs: give fit steps")
        return len(self._iterable)  # type: ignore[arg-type]

    def seek(self, global_step: int) -> None:
        if self.step_fn is not None:
            self.step_in_epoch = global_step
            return
        if self.plan is None:
            raise UsageError("resuming needs arrays: an iterable of global batches cannot seek")
        self.epoch, self.step_in_epoch = self.plan.position(global_step)

    def global_batches(self) -> Iterator[tuple[Any, int]]:
        """(this process's slice, the global batch size), epoch after epoch."""
        if self.plan is None:
            for gb in self._iterable if self.step_fn is None else self._by_step():  # type: ignore[union-attr]
                n = len(_values(gb)[0])
                if n % self.world:
                    raise UsageError(f"a global batch of {n} samples does not divide over {self.world} processes")
                b = n // self.world
                yield jax.tree.map(lambda a: np.asarray(a)[self.rank * b : (self.rank + 1) * b], gb), n
            return
        while True:
            while self.step_in_epoch < self.plan.steps_per_epoch:
                idx = self.plan.global_indices(self.epoch, self.step_in_epoch)
                self.step_in_epoch += 1
                b = len(idx) // self.world
                mine = idx[self.rank * b : (self.rank + 1) * b]
                yield jax.tree.map(lambda a: a[mine], self.data), len(idx)
            self.epoch, self.step_in_epoch = self.epoch + 1, 0

    def _by_step(self) -> Iterator[Any]:
        while True:
            self.step_in_epoch += 1
            yield self.step_fn(self.step_in_epoch - 1)  # type: ignore[misc]


def _values(d: Any) -> list[Any]:
    return list(d.values()) if isinstance(d, dict) else list(d)


# ---- the data-parallel step ---------------------------------------------------------------------


@dataclass
class Hooks:
    """What a caller that owns more of the run (the model zoo) adds to ``fit``."""

    params: Callable[[nnx.Module], dict[str, np.ndarray]] | None = None
    """The final parameters by name (default: the model's ``nnx.Param`` leaves), for
    final_params.npz, their L2 norm and the replicas' digest."""
    loss_reduction: str = "mean"
    """What ``loss_fn`` does over the batch it is given: ``mean`` (default) or ``sum``. The
    per-device programs (pmap, shard_map) combine the devices' losses and gradients with ``pmean``
    or ``psum`` to match; the global ``jit`` step sees the whole batch and needs neither."""


@dataclass
class _Step:
    """The data-parallel step ``(params, rest, opt_state, batch) -> (params, rest, opt_state, loss)``
    before compilation, and how to place replicated values and batches for it."""

    fn: Any
    kind: str
    """``pmap``, ``jit`` (XLA partitions the global step) or ``shard_map`` (PODSCALE_JAX_STEP)"""
    put_rep: Callable[[Any], Any]
    put_batch: Callable[[np.ndarray, int], Any]
    """(this process's slice of the global batch, global batch size) -> what the step takes"""
    local_fn: Any = None
    """The same step with each device's own gradients, no all-reduce: the breakdown's compute part."""
    put_params: Callable[[Any], Any] | None = None
    put_opt: Callable[[Any], Any] | None = None
    """Where ``--sharding`` splits them: the parameters (full) and the optimizer state over the mesh."""

    def one(self, a: Any) -> np.ndarray:
        """The whole value as numpy: one replica of a replicated value (pmap keeps a leading device
        axis), or a sharded one assembled from its shards (one process: all are addressable)."""
        if self.kind != "pmap" and not a.sharding.is_fully_replicated:
            if a.is_fully_addressable:
                return np.asarray(a)
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(a, tiled=True))  # a collective: every process calls it
        x = np.asarray(a.addressable_data(0))
        return x[0] if self.kind == "pmap" else x


def shard_spec(shape: tuple[int, ...], n: int) -> P:
    """``--sharding``'s rule for one array: split its largest dimension divisible by N over the data
    axis (the first of equals), replicate it when none divides (scalars, odd sizes)."""
    dims = [i for i, d in enumerate(shape) if d >= n and d % n == 0]
    if not dims or n == 1:
        return P()
    i = max(dims, key=lambda j: (shape[j], -j))
    return P(*([None] * i), AXIS)


def _build_step(s: Session, graphdef: Any, tx: optax.GradientTransformation, loss_fn: Callable[[Any, Any], Any],
                hooks: Hooks, state: tuple[Any, Any] | None = None) -> _Step:
    def loss_of(params: Any, rest: Any, batch: Any) -> tuple[jax.Array, Any]:
        # rebuild the non-parameter Variables at this trace level (value_and_grad traces only the
        # params): a model that updates its state in the forward (batch norm) may write them
        model = nnx.merge(graphdef, params, jax.tree.map(lambda a: a, rest))
        loss = loss_fn(model, batch)
        if not isinstance(loss, jax.Array) or loss.size != 1:
            raise UsageError(f"loss_fn returned {_describe(loss)}; it must return a scalar (reduce with .mean())")
        _, _, new_rest = nnx.split(model, nnx.Param, ...)
        return jnp.reshape(loss, ()).astype(jnp.float32), new_rest

    def update(params: Any, rest: Any, opt_state: Any, batch: Any, reduce: Callable[[Any], Any],
               gather: Callable[[Any], Any] = lambda t: t, scatter: Callable[[Any], Any] = lambda t: t) -> tuple[Any, Any, Any, jax.Array]:
        (loss, new_rest), grads = jax.value_and_grad(loss_of, has_aux=True)(gather(params), rest, batch)
        grads, loss = reduce((grads, loss))
        grads = scatter(grads)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_rest, opt_state, loss

    if hooks.loss_reduction not in ("mean", "sum"):
        raise UsageError(f"loss_reduction {hooks.loss_reduction!r}; valid: mean, sum")
    over_devices = (lambda t: lax.psum(t, AXIS)) if hooks.loss_reduction == "sum" else (lambda t: lax.pmean(t, AXIS))

    def per_device(params: Any, rest: Any, opt_state: Any, batch: Any) -> Any:
        return update(params, rest, opt_state, batch, over_devices)

    devices = list(s.devices)
    if s.backend == "jax-pmap":
        fn = jax.pmap(per_device, axis_name=AXIS, devices=None if len(devices) == jax.device_count() else devices)
        n = len(s.local_devices)

        def put_batch(a: np.ndarray, global_n: int) -> Any:
            if a.shape[0] % n:
                raise UsageError(f"a global batch of {global_n} does not divide evenly over {s.config.devices} devices")
            return a.reshape(n, a.shape[0] // n, *a.shape[1:])

        local = jax.pmap(lambda *a: update(*a, lambda t: t), axis_name=AXIS, devices=None if len(devices) == jax.device_count() else devices)
        return _Step(fn, "pmap", lambda t: jax.tree.map(lambda a: np.broadcast_to(np.asarray(a), (n, *np.shape(a))), t), put_batch,
                     local)

    mesh = Mesh(np.array(devices), (AXIS,))
    rep, dat = NamedSharding(mesh, P()), NamedSharding(mesh, P(AXIS))

    def shardings(tree: Any, split: bool) -> Any:
        return jax.tree.map(lambda a: NamedSharding(mesh, shard_spec(np.shape(a), len(devices)) if split else P()), tree)

    kind = step_kind()
    if kind == "shard_map":
        # the per-device step with explicit collectives: check_vma=False, or JAX's own psum of the
        # replicated params' gradient plus ours would count it N times (PLATFORM_NOTES). Non-parameter
        # state comes back as the device computed it: a model that keeps some reduces it itself
        # (the zoo's batch norm pmeans its running statistics over the axis)
        body = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(), P(), P(AXIS)), out_specs=(P(), P(), P(), P()),
                             check_vma=False)

    mode = s.config.sharding
    if kind != "shard_map":
        ps_full = shardings(state[0], True) if mode == "full" and state else None

        def body(params: Any, rest: Any, opt_state: Any, batch: Any) -> Any:
            if ps_full is None:
                return update(params, rest, opt_state, batch, lambda t: t)  # global batch: XLA all-reduces
            # full: the FSDP pattern, stated rather than left to the partitioner (which may instead
            # split the matmuls and reduce activations): gather the parameters whole for forward and
            # backward, reduce the gradients back onto the parameters' shards
            return update(params, rest, opt_state, batch, lambda t: t,
                          gather=lambda t: lax.with_sharding_constraint(t, rep),
                          scatter=lambda t: lax.with_sharding_constraint(t, ps_full))

    if mode != "none" and (kind != "jit" or state is None):
        raise UsageError(f"--sharding {mode} on jax-sharded runs the jit step: unset PODSCALE_JAX_STEP")

    ps = shardings(state[0], mode == "full") if mode != "none" and state else rep
    os_ = shardings(state[1], True) if mode != "none" and state else rep
    fn = jax.jit(body, in_shardings=(ps, rep, os_, dat), out_shardings=(ps, rep, os_, rep))
    # each device steps on its own slice's gradients: the outputs are not one replica (never used)
    local = jax.jit(jax.shard_map(lambda *a: update(*a, lambda t: t), mesh=mesh, in_specs=(P(), P(), P(), P(AXIS)),
                                  out_specs=(P(), P(), P(), P()), check_vma=False))

    def put_rep_j(t: Any) -> Any:
        return jax.tree.map(lambda a: jax.make_array_from_process_local_data(rep, np.asarray(a), np.shape(a)), t)

    def put_batch_j(a: np.ndarray, global_n: int) -> Any:
        if global_n % len(devices):
            raise UsageError(f"a global batch of {global_n} does not divide evenly over {len(devices)} devices")
        return jax.make_array_from_process_local_data(dat, a, (global_n, *a.shape[1:]))

    def placer(sh: Any) -> Callable[[Any], Any] | None:
        if sh is rep:
            return None
        # every process holds the whole host value: each device takes its part of it (one or many processes)
        return lambda t: jax.tree.map(lambda a, x: jax.make_array_from_callback(np.shape(a), x, lambda idx: np.asarray(a)[idx]), t, sh)

    return _Step(fn, kind, put_rep_j, put_batch_j, local, placer(ps), placer(os_))


def _describe(x: Any) -> str:
    if hasattr(x, "shape"):
        return f"an array of shape {tuple(x.shape)}"
    return type(x).__name__


def _prepare(s: Session, model: nnx.Module, tx: optax.GradientTransformation, loss_fn: Callable[[Any, Any], Any],
             hooks: Hooks) -> tuple[Any, Any, Any, _Step]:
    """The model's parameters, other state and fresh optimizer state (host arrays) and its step."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params, rest = jax.tree.map(np.asarray, params), jax.tree.map(np.asarray, rest)
    opt_state = jax.tree.map(np.asarray, tx.init(params))
    return params, rest, opt_state, _build_step(s, graphdef, tx, loss_fn, hooks, (params, opt_state))


def _place(step: _Step, local: Any, global_n: int) -> Any:
    return jax.tree.map(lambda a: step.put_batch(np.asarray(a), global_n), local)


def _compile(step: _Step, params: Any, rest: Any, opt_state: Any, batch: Any, devices: int, sharded: bool = False) -> tuple[Any, dict[str, Any]]:
    """The step compiled ahead of time for these arguments, and the FLOPs and all-reduce bytes of
    exactly that executable: XLA's cost analysis (whole step on one device) and its HLO."""
    try:
        compiled = step.fn.lower(params, rest, opt_state, batch).compile()
    except UsageError:
        raise
    except Exception as e:  # noqa: BLE001 - the step itself will raise the user's error with its own traceback
        return None, {"source": f"not compiled ahead: {type(e).__name__}"}
    per_device = jax_hlo.cost_flops(compiled.cost_analysis())
    return compiled, {"source": "XLA cost analysis of the compiled step (optimizer and elementwise work included)",
                      "flops_per_device": per_device,
                      "flops": per_device * devices if per_device is not None else None,
                      "comm_bytes": (jax_hlo.allreduce_bytes(compiled.as_text()) if not sharded
                                     else sum(jax_hlo.collective_bytes(compiled.as_text()).values())) if devices > 1 else 0,
                      "collective_bytes": jax_hlo.collective_bytes(compiled.as_text()) if devices > 1 else None,
                      "allreduce_operands": jax_hlo.allreduce_operands(compiled.as_text()) if devices > 1 else 0}


def compiled_record(model: nnx.Module, tx: optax.GradientTransformation, loss_fn: Callable[[Any, Any], Any], batch: Any,
                    *, hooks: Hooks | None = None) -> dict[str, Any]:
    """What ``fit`` records about its step (FLOPs, all-reduce bytes), for the global batch ``batch``,
    compiled and not run."""
    s = session()
    params, rest, opt_state, step = _prepare(s, model, tx, loss_fn, hooks or Hooks())
    local, n = next(Loader(lambda _: batch, 0, rank=s.rank, world=s.world).global_batches())
    return _compile(step, (step.put_params or step.put_rep)(params), step.put_rep(rest), (step.put_opt or step.put_rep)(opt_state),
                    _place(step, local, n), len(s.devices))[1]


# ---- fit -------------------------------------------------------------------------------------------


def fit(model: nnx.Module, tx: optax.GradientTransformation, loss_fn: Callable[[Any, Any], Any], data: Any, *,
        steps: int | None = None, epochs: int | None = None, global_batch: int | None = None, shuffle: bool = True,
        remainder: str = "drop", seed: int | None = None, sync_every: int | None = None,
        hooks: Hooks | None = None) -> dict[str, Any]:
    """Train ``model`` in place, data parallel; returns ``losses`` and ``step_time_s`` on every process.

    ``steps`` / ``global_batch`` default to the run's ``--steps`` / ``--global-batch``; ``epochs``
    instead of ``steps`` trains whole epochs. The model's parameters are updated in place. A step's
    time runs from the dispatch of the first step of its sync window to the host's sync on the
    window's last loss, divided over the window (with ``sync_every=1``: each step on its own)."""
    s = session()
    cfg = s.config
    hooks = hooks or Hooks()
    gb = int(global_batch or cfg.global_batch)
    loader = Loader(data, gb, rank=s.rank, world=s.world, shuffle=shuffle, seed=cfg.seed if seed is None else seed,
                    remainder=remainder, devices=len(s.devices))
    if gb % len(s.devices):
        raise UsageError(f"global batch {gb} does not divide evenly over {len(s.devices)} devices; use a multiple of {len(s.devices)}")
    if epochs is not None and steps is not None:
        raise UsageError("give fit steps or epochs, not both")
    total = int(epochs) * len(loader) if epochs is not None else int(steps or cfg.steps)
    if total < 1:
        raise UsageError(f"fit would train {total} steps; give steps >= 1 (or epochs >= 1)")
    untimed = min(cfg.untimed_steps, total - 1)
    every = max(1, min(MAX_UNSYNCED, int(sync_every or (1 if s.devices[0].platform == "cpu" else 10))))

    params, rest, opt_state, prog = _prepare(s, model, tx, loss_fn, hooks)
    start, losses_done, times_done = 0, [], []
    ckpt = checkpoint.latest(cfg.checkpoint_dir, "npz") if cfg.resume and cfg.checkpoint_dir else None
    if ckpt is not None:
        start, params, rest, opt_state, losses_done, times_done = _load(ckpt[1], params, rest, opt_state, s)
    if loader.plan is not None or loader.step_fn is not None:
        loader.seek(start)
    params, rest, opt_state = (prog.put_params or prog.put_rep)(params), prog.put_rep(rest), (prog.put_opt or prog.put_rep)(opt_state)

    batches = loader.global_batches()

    def next_batch(step: int) -> Any:
        try:
            local, n = next(batches)
        except StopIteration:
            raise UsageError(f"the data ran out at step {step} of {total}; give fewer steps or more batches") from None
        return _place(prog, local, n)

    batch = next_batch(start)
    compiled, record = _compile(prog, params, rest, opt_state, batch, len(s.devices), cfg.sharding != "none")
    # what one sample's inputs and targets weigh on the devices: the host's data term
    record["sample_bytes"] = sum(int(a.nbytes) for a in jax.tree_util.tree_leaves(batch)) / max(1, gb)
    # run the executable that was measured; a multi-process pmap compiled ahead wants global-shaped
    # inputs, and a batch of another shape (remainder="keep") needs its own compilation
    run = compiled if compiled is not None and not (prog.kind == "pmap" and s.world > 1) else prog.fn
    shapes = _shapes(batch)
    losses_dev: list[Any] = []
    times: list[float] = []
    window_t0, window = 0.0, 0
    syncs = 0
    for step in range(start, total):
        s.step = step
        maybe_fault(s.ctx.rank, step)
        if window == 0:
            window_t0 = time.perf_counter()
        if step > start:
            batch = next_batch(step)  # part of the step's time, as in the torch loop: data is work too
        params, rest, opt_state, loss = (run if _shapes(batch) == shapes else prog.fn)(params, rest, opt_state, batch)
        losses_dev.append(loss)
        window += 1
        if window >= every or step < untimed or step + 1 == total or (cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0):
            vals = _values_of(losses_dev[len(losses_dev) - window:])  # the host sync
            syncs += 1
            times.extend([(time.perf_counter() - window_t0) / window] * window)
            window = 0
            for i, v in enumerate(vals):
                if not np.isfinite(v):  # stop (exit 4) with the step and the losses up to it, for the run's JSON
                    at = step - len(vals) + 1 + i
                    raise Diverged(f"non-finite loss ({v}) at step {at} on process {s.rank}", at,
                                   losses_done + _values_of(losses_dev[: at + 1 - start]))
        s.ctx.beat(step + 1)
        gathers = cfg.sharding != "none" and s.world > 1  # a sharded state is assembled by every process together
        if cfg.checkpoint_dir and cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < total \
                and (s.rank == 0 or gathers):
            _save(cfg, step + 1, prog, params, rest, opt_state, losses_done + _values_of(losses_dev), times_done + times, s.rank)
    losses = losses_done + _values_of(losses_dev)
    all_times = times_done + times
    if cfg.checkpoint_dir and start < total and (s.rank == 0 or (cfg.sharding != "none" and s.world > 1)):
        _save(cfg, total, prog, params, rest, opt_state, losses, all_times, s.rank)
    nnx.update(model, jax.tree.map(prog.one, params), jax.tree.map(prog.one, rest))
    breakdown = _probe(s, prog, run, (params, rest, opt_state), batch, lambda: next_batch(total),
                       median(all_times[untimed:]) if all_times[untimed:] else None, total)
    _finish(s, model, prog, (params, rest), losses, all_times, total, untimed, start, record, syncs, every, gb, hooks)
    if s.rank == 0 and s.result is not None:
        s.result["breakdown"] = breakdown
        s.result["memory"] = _device_bytes(params, opt_state)
        s.result["sharding"] = cfg.sharding
    return {"losses": losses, "step_time_s": median(all_times[untimed:]), "steps": total}


#: consecutive runs of each part in one probe round (as in the torch loop)
PROBE_RUNS = 3


def _probe(s: Session, prog: _Step, run: Any, state: tuple[Any, Any, Any], last: Any, fetch: Callable[[], Any],
           step_s: float | None, total: int) -> dict[str, Any]:
    """Where a step's time goes, measured after training as the torch loop does (``_Loop._probe``):
    data (the next batch placed on the devices), compute (the step with each device's own gradients,
    no all-reduce), full (the step that trained) and step (data + full); comm (exposed) = full -
    compute, unattributed = step - data - compute - comm. The state is functional: nothing the
    probes compute is kept, so the run's results are those of its training."""
    from jax.experimental import multihost_utils

    k = s.config.probe_rounds(total)
    if k == 0 or step_s is None:
        return {"probes": 0, "measured": None, "why": s.config.probe_why_none(total) if k == 0 else "no timed steps"}
    params, rest, opt_state = state
    held = [last]
    exhausted = False

    def data() -> Any:
        nonlocal exhausted
        if not exhausted:
            try:
                held[0] = fetch()
            except UsageError:  # the batches ran out: the last one serves the rest
                exhausted = True
        return jax.block_until_ready(held[0])

    def full() -> Any:
        return jax.block_until_ready(run(params, rest, opt_state, held[0])[3])

    def compute() -> Any:
        return jax.block_until_ready(prog.local_fn(params, rest, opt_state, held[0])[3])

    def step() -> Any:
        data()
        return full()

    multi = len(s.devices) > 1
    if multi:
        compute()  # compiled here, untimed
    fns = {"data": data, "compute": compute if multi else full, "full": full, "step": step}
    parts: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(k):
        for name, fn in fns.items():
            if s.world > 1:
                multihost_utils.sync_global_devices(f"podscale-probe-{name}")
            for _ in range(PROBE_RUNS):
                t = time.perf_counter()
                fn()
                parts[name].append(time.perf_counter() - t)
            s.ctx.beat(total)  # alive: the watchdog's --step-timeout covers each probe part too
    med = {name: median(v) for name, v in parts.items()}
    d = None if exhausted else med["data"]
    comm = max(0.0, med["full"] - med["compute"]) if multi else 0.0
    measured = {"data_s": d, "compute_s": med["compute"], "comm_exposed_s": comm,
                "unattributed_s": med["step"] - (d or 0.0) - med["compute"] - comm, "step_s": med["step"], "train_step_s": step_s}
    return {"probes": k, "runs_per_probe": PROBE_RUNS, "measured": measured,
            "why": None if d is not None else "data not measured: the batches ran out"}


def _device_bytes(params: Any, opt_state: Any) -> dict[str, Any]:
    """Bytes each addressable device holds of parameters and optimizer state, from the live
    buffers (a replica each, or its shards). Gradients live inside the compiled step only."""
    per: dict[int, dict[str, int]] = {}
    for key, tree in (("params_bytes", params), ("optimizer_bytes", opt_state)):
        for leaf in jax.tree.leaves(tree):
            for sh in leaf.addressable_shards:
                d = per.setdefault(sh.device.id, {"params_bytes": 0, "optimizer_bytes": 0})
                d[key] += int(sh.data.nbytes)
    devices = {d.id: d for leaf in jax.tree.leaves(params) for d in leaf.devices()}
    for k, d in per.items():
        stats = devices[k].memory_stats() if k in devices else None  # None on CPU; GPU/TPU keep a peak
        d["device_peak_bytes"] = int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None
    import resource

    return {"per_device": [per[k] for k in sorted(per)],
            "rss_peak_bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024,
            "basis": "bytes of each device's live buffers (its replica or shards); gradients exist only inside the "
                     "compiled step; device_peak_bytes: the runtime's peak where it keeps one (GPU, TPU); "
                     "rss_peak_bytes: this process's peak resident set (ru_maxrss), not divided by its devices"}


def _shapes(batch: Any) -> list[tuple[int, ...]]:
    return [tuple(np.shape(a)) for a in jax.tree.leaves(batch)]


def _values_of(losses_dev: list[Any]) -> list[float]:
    return [float(np.asarray(l.addressable_data(0)).reshape(-1)[0]) for l in losses_dev]


def _leaf_names(tree: Any, prefix: str) -> dict[str, Any]:
    return {f"{prefix}{jax.tree_util.keystr(k)}": v for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def _save(cfg: RunConfig, step: int, prog: _Step, params: Any, rest: Any, opt_state: Any, losses: list[float], times: list[float],
          rank: int = 0) -> None:
    arrays: dict[str, Any] = {}
    for prefix, tree in (("p", params), ("r", rest), ("o", opt_state)):
        for i, leaf in enumerate(jax.tree.leaves(tree)):
            arrays[f"{prefix}_{i:05d}"] = prog.one(leaf)
    if rank != 0:
        return
    rng = host_rng_state()
    arrays.update(step=np.int64(step), losses=np.asarray(losses, np.float64), step_times=np.asarray(times, np.float64),
                  np_keys=rng["np_keys"], py_internal=np.asarray(rng["py_internal"], np.int64),
                  rng_scalars=np.asarray([rng["np_pos"], rng["np_has_gauss"], rng["py_version"]], np.int64),
                  np_gauss=np.float64(rng["np_gauss"]))
    assert cfg.checkpoint_dir
    checkpoint.write_atomic(checkpoint.path_for(cfg.checkpoint_dir, step, "npz"), lambda f: np.savez(f, **arrays))
    checkpoint.prune(cfg.checkpoint_dir, "npz")


def _load(path: Any, params: Any, rest: Any, opt_state: Any, s: Session) -> tuple[int, Any, Any, Any, list[float], list[float]]:
    with np.load(path, allow_pickle=False) as z:
        def rebuild(tree: Any, prefix: str) -> Any:
            leaves, treedef = jax.tree.flatten(tree)
            names = sorted(k for k in z.files if k.startswith(prefix + "_"))
            if len(names) != len(leaves) or any(z[k].shape != np.shape(a) for k, a in zip(names, leaves)):
                raise UsageError(f"checkpoint {str(path)!r} does not match this model and optimizer (use a fresh --checkpoint-dir)")
            return jax.tree.unflatten(treedef, [z[k] for k in names])

        if "rng_scalars" not in z.files:
            raise UsageError(f"checkpoint {str(path)!r} was not written by this version's training loop (use a fresh --checkpoint-dir)")
        sc = z["rng_scalars"]
        set_host_rng_state({"np_keys": z["np_keys"], "np_pos": int(sc[0]), "np_has_gauss": int(sc[1]), "np_gauss": float(z["np_gauss"]),
                            "py_version": int(sc[2]), "py_internal": z["py_internal"].tolist(), "py_gauss": None})
        return (int(z["step"]), rebuild(params, "p"), rebuild(rest, "r"), rebuild(opt_state, "o"),
                z["losses"].tolist(), z["step_times"].tolist())


def _finish(s: Session, model: nnx.Module, prog: _Step, state: Any, losses: list[float], times: list[float], total: int,
            untimed: int, start: int, record: dict[str, Any], syncs: int, every: int, gb: int, hooks: Hooks) -> None:
    import flax
    from jax.experimental import multihost_utils

    trained = {k: np.asarray(v) for k, v in _leaf_names(nnx.state(model, nnx.Param), "").items()}
    final = hooks.params(model) if hooks.params else trained
    digest = hashlib.sha256(b"".join(np.ascontiguousarray(final[k]).tobytes() for k in sorted(final))).hexdigest()
    def replicas_agree(leaf: Any) -> bool:  # every device holding the same part holds the same bytes
        parts: dict[str, set[bytes]] = {}
        whole = prog.kind == "pmap" or leaf.sharding.is_fully_replicated  # pmap: each device's row is a replica
        for sh in leaf.addressable_shards:
            parts.setdefault("all" if whole else str(sh.index), set()).add(np.asarray(sh.data).tobytes())
        return all(len(v) == 1 for v in parts.values())

    identical = all(replicas_agree(leaf) for leaf in jax.tree.leaves(state))
    if s.world > 1:
        digests = multihost_utils.process_allgather(np.frombuffer(bytes.fromhex(digest), np.uint8))
        identical = identical and len({bytes(d) for d in np.asarray(digests)}) == 1
    if s.rank != 0:
        return
    if s.ctx.run_dir is not None:
        np.savez(s.ctx.run_dir / "final_params.npz", **final)
    s.result = {
        "model": type(model).__name__,
        "params": int(sum(v.size for v in trained.values())),
        "grad_bytes": int(sum(v.size * v.dtype.itemsize for v in trained.values())),
        "global_batch": gb,
        "losses": losses,
        "step_times": times,
        "steps": total,
        "untimed_steps": untimed,
        "final_params_l2": float(np.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in final.values()))),
        "replicas_identical": bool(identical),
        "resumed_from_step": start or None,
        "device_kind": str(s.devices[0].device_kind),
        "device_syncs": syncs,
        "sync_every": every,
        "processes": s.world,
        "hardware": hardware_id(s.devices[0]),
        "model_flops_per_step": record.get("flops"),
        "xla_flops_per_step": record.get("flops"),
        "comm_bytes_per_step": [record.get("comm_bytes")] if s.config.devices > 1 else None,
        # by kind, from the HLO: a sharded step all-gathers parameters and reduce-scatters gradients
        "collective_bytes_per_step": record.get("collective_bytes"),
        "op_record": {k: v for k, v in record.items() if k != "comm_bytes"},
        "versions": {"jax": jax.__version__, "jaxlib": _jaxlib_version(), "flax": flax.__version__, "optax": optax.__version__},
        "backend_info": {"program": prog.kind, "devices_per_process": len(s.local_devices), "platform": s.devices[0].platform},
        "scalars": {k: [[a, b] for a, b in v] for k, v in s.scalars.items()},
    }


def _jaxlib_version() -> str:
    try:
        import jaxlib

        return str(jaxlib.__version__)
    except Exception:  # noqa: BLE001
        return "unknown"
