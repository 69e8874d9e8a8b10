"""The JAX training loop behind jax-pmap and jax-sharded (imported only inside worker processes).

Both backends train the same functional step on an ``nnx.split`` model state:
``loss = Σ per-example loss / denom`` on each device's slice of the global batch, where ``denom`` is
the global batch (× outputs for squared error) for ``mean`` and 1 for ``sum``. Summing the local
losses and gradients over devices then gives exactly the global loss and its gradient, for either
reduction, with the meaning torch's ``F.mse_loss``/``F.cross_entropy`` give them:

- jax-pmap: ``jax.pmap`` with an explicit ``lax.psum`` of gradients and loss over the ``data`` axis;
- jax-sharded: ``jax.jit`` over a ``Mesh(('data',))``, batch sharded on ``data``, params
  replicated; XLA's partitioner inserts the same all-reduce.

The step is compiled once ahead of time (``lower().compile()``), which yields the executable the
loop runs, its HLO (all-reduce bytes) and its cost analysis (FLOPs), so every run reports the
communication and FLOPs of exactly the program it timed.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from models import flax as mflax
from models.spec import ModelSpec, get_spec
from scaling import checkpoint
from scaling.backends import jax_hlo
from scaling.backends.jax_dp import hardware_id, step_kind
from scaling.config import RunConfig
from scaling.data import load_dataset, load_init
from scaling.errors import UsageError
from scaling.fault import maybe_fault
from scaling.meter import StepTimer

AXIS = "data"
#: the CPU collective deadlock (PLATFORM_NOTES) needs a host sync at least this often; the loop
#: syncs every step (float(loss)), which also makes each step's wall time a real step time
MAX_UNSYNCED_STEPS = 16


# ---- model, optimizer, loss ----------------------------------------------------------------

def make_optimizer(cfg: RunConfig) -> optax.GradientTransformation:
    """The hyper-parameters of ``torch_common.make_optimizer`` (torch Adam: eps outside the sqrt)."""
    if cfg.optimizer == "adam":
        return optax.adam(cfg.lr, b1=0.9, b2=0.999, eps=1e-8)
    return optax.sgd(cfg.lr)


def loss_denominator(cfg: RunConfig, y_sample_shape: tuple[int, ...]) -> int:
    """What the summed loss is divided by for ``mean``: every loss element of the global batch
    (samples × outputs for squared error, samples × positions for sequence cross-entropy), which
    is what torch's ``F.mse_loss``/``F.cross_entropy(reduction='mean')`` divide by."""
    if cfg.loss_reduction == "sum":
        return 1
    return cfg.global_batch * math.prod(y_sample_shape)


def summed_loss(spec: ModelSpec, out: jax.Array, y: jax.Array) -> jax.Array:
    out = out.astype(jnp.float32)
    if spec.task == "classification":
        # sequence models classify every position: flatten the leading axes, as torch_common does
        logits = out.reshape(-1, out.shape[-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, y.reshape(-1)).sum()
    return jnp.sum((out - y) ** 2)


def compute_dtype(cfg: RunConfig) -> Any:
    return jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32


# ---- devices and placement -----------------------------------------------------------------

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


@dataclass
class Program:
    """One backend's way of placing arrays and running the compiled step."""

    kind: str
    devices: list[Any]
    local_devices: list[Any]
    jitted: Any
    put_replicated: Callable[[np.ndarray], jax.Array]
    put_batch: Callable[[np.ndarray, int], jax.Array]
    """(this process's slice of the global batch, global batch) -> device array"""
    loss_and_grads: Callable[..., Any]
    """(state, x, y) -> (local loss, local grads) on one device's slice, before any all-reduce"""

    def first(self, a: jax.Array) -> np.ndarray:
        """One replica of a replicated value, as numpy (pmap keeps a leading device axis)."""
        x = np.asarray(a.addressable_data(0))
        return x[0] if self.kind == "pmap" else x

    @staticmethod
    def replicas(a: jax.Array) -> list[bytes]:
        return [np.ascontiguousarray(np.asarray(s.data)).tobytes() for s in a.addressable_shards]


def make_program(cfg: RunConfig, spec: ModelSpec, graphdef: Any, tx: optax.GradientTransformation, devices: list[Any],
                 y_sample_shape: tuple[int, ...]) -> Program:
    denom = loss_denominator(cfg, y_sample_shape)

    def loss_grads_stats(state: Any, x: jax.Array, y: jax.Array) -> tuple[jax.Array, Any, Any]:
        """Also the batch-norm running statistics the forward wrote (empty without BN); the
        module already pmean'd them over the replicas (models/flax/cnn.py)."""
        def f(s: Any) -> tuple[jax.Array, Any]:
            model = nnx.merge(graphdef, s)
            return summed_loss(spec, model(x), y) / denom, nnx.state(model, nnx.BatchStat)

        (loss, stats), grads = jax.value_and_grad(f, has_aux=True)(state)
        return loss, grads, stats

    def loss_and_grads(state: Any, x: jax.Array, y: jax.Array) -> tuple[jax.Array, Any]:
        """One device's slice on its own (FLOP counting): batch norm without the pmap axis."""
        from models.flax.cnn import configure_bn

        def f(s: Any) -> jax.Array:
            model = nnx.merge(graphdef, s)
            configure_bn(model)
            return summed_loss(spec, model(x), y) / denom

        return jax.value_and_grad(f)(state)

    def update(state: Any, opt_state: Any, grads: Any) -> tuple[Any, Any]:
        updates, opt_state = tx.update(grads, opt_state, state)
        return optax.apply_updates(state, updates), opt_state

    pid = jax.process_index()
    local = [d for d in devices if d.process_index == pid]

    if cfg.backend == "jax-pmap":
        def pstep(state: Any, opt_state: Any, x: jax.Array, y: jax.Array) -> tuple[Any, Any, jax.Array]:
            loss, grads, stats = loss_grads_stats(state, x, y)
            grads, loss = lax.psum((grads, loss), AXIS)
            state, opt_state = update(state, opt_state, grads)
            state = nnx.merge_state(state, stats)  # BN running stats (zero grads left them unchanged)
            return state, opt_state, loss

        all_devices = len(devices) == jax.device_count()
        fn = jax.pmap(pstep, axis_name=AXIS, devices=None if all_devices else devices)
        n = len(local)

        def put_rep(a: np.ndarray) -> Any:
            return np.broadcast_to(a, (n, *np.shape(a)))

        def put_batch(a: np.ndarray, global_batch: int) -> Any:
            return a.reshape(n, a.shape[0] // n, *a.shape[1:])

        return Program("pmap", devices, local, fn, put_rep, put_batch, loss_and_grads)

    mesh = Mesh(np.array(devices), (AXIS,))
    rep, dat = NamedSharding(mesh, P()), NamedSharding(mesh, P(AXIS))

    def step(state: Any, opt_state: Any, x: jax.Array, y: jax.Array) -> tuple[Any, Any, jax.Array]:
        loss, grads, stats = loss_grads_stats(state, x, y)  # global batch: the partitioner all-reduces
        state, opt_state = update(state, opt_state, grads)
        state = nnx.merge_state(state, stats)
        return state, opt_state, loss

    if step_kind() == "shard_map":
        # explicit collectives: check_vma=False, or JAX's own psum of the replicated params'
        # gradient plus ours would count it N times (PLATFORM_NOTES)
        def sm_step(state: Any, opt_state: Any, x: jax.Array, y: jax.Array) -> tuple[Any, Any, jax.Array]:
            loss, grads = loss_and_grads(state, x, y)
            grads, loss = lax.psum((grads, loss), AXIS)
            state, opt_state = update(state, opt_state, grads)
            return state, opt_state, loss

        body = jax.shard_map(sm_step, mesh=mesh, in_specs=(P(), P(), P(AXIS), P(AXIS)), out_specs=(P(), P(), P()), check_vma=False)
        fn = jax.jit(body, in_shardings=(rep, rep, dat, dat), out_shardings=(rep, rep, rep))
        kind = "shard_map"
    else:
        fn = jax.jit(step, in_shardings=(rep, rep, dat, dat), out_shardings=(rep, rep, rep))
        kind = "jit"

    def put_rep_j(a: np.ndarray) -> jax.Array:
        a = np.asarray(a)
        return jax.make_array_from_process_local_data(rep, a, a.shape)

    def put_batch_j(a: np.ndarray, global_batch: int) -> jax.Array:
        return jax.make_array_from_process_local_data(dat, a, (global_batch, *a.shape[1:]))

    return Program(kind, devices, local, fn, put_rep_j, put_batch_j, loss_and_grads)


# ---- the run ---------------------------------------------------------------------------------

@dataclass
class Setup:
    spec: ModelSpec
    data: Any
    graphdef: Any
    state: Any
    opt_state: Any
    tx: optax.GradientTransformation
    program: Program


def setup(cfg: RunConfig, params: dict[str, np.ndarray] | None = None) -> Setup:
    spec = get_spec(cfg.model, **cfg.model_opts)
    data = load_dataset(spec, cfg.data, cfg.global_batch, cfg.seed)
    params = load_init(spec, cfg.init, cfg.seed) if params is None else params
    model = mflax.build(spec, params, dtype=compute_dtype(cfg))
    from models.flax.cnn import configure_bn  # batch-norm DP mode; no-op for models without BN

    pmap = cfg.backend == "jax-pmap"
    configure_bn(model, axis_name=AXIS if pmap else None, sync=cfg.sync_bn, groups=1 if (pmap or cfg.sync_bn) else cfg.devices)
    graphdef, state = nnx.split(model)
    state = jax.tree.map(np.asarray, state)
    tx = make_optimizer(cfg)
    opt_state = jax.tree.map(np.asarray, tx.init(state))
    program = make_program(cfg, spec, graphdef, tx, run_devices(cfg), tuple(data.y.shape[1:]))
    return Setup(spec, data, graphdef, state, opt_state, tx, program)


def local_batch(data: Any, step: int, cfg: RunConfig, process: int, processes: int) -> tuple[np.ndarray, np.ndarray]:
    """This process's contiguous slice of step ``step``'s global batch (``scaling.data``'s rule)."""
    return data.shard(step, cfg.global_batch, process, processes)


def compile_step(s: Setup, cfg: RunConfig, state: Any, opt_state: Any, x: Any, y: Any) -> tuple[Any, dict[str, Any]]:
    """Compile the step once; return the executable and what XLA says about it.

    - ``comm_bytes_per_step``: all-reduce bytes per device in the compiled HLO (0 on one device,
      where a single-member all-reduce moves nothing);
    - ``xla_flops_per_device``: XLA's FLOPs for the whole compiled step on one device, optimizer
      update and the replicated elementwise work included: what each device executes;
    - ``xla_flops_per_step``: XLA's FLOPs of the forward + backward on one device's slice, times
      devices: the same quantity as the spec's ``model_flops_per_step``, counted by XLA (the
      optimizer update, repeated on every replica, is not model FLOPs).
    """
    compiled = s.program.jitted.lower(state, opt_state, x, y).compile()
    b = cfg.per_device_batch
    xs, ys = (jax.ShapeDtypeStruct((b, *a.shape[1:]), jnp.asarray(a[:1]).dtype) for a in (s.data.x, s.data.y))
    grad_flops = jax_hlo.cost_flops(jax.jit(s.program.loss_and_grads).lower(s.state, xs, ys).cost_analysis())
    stats = {
        "comm_bytes_per_step": jax_hlo.allreduce_bytes(compiled.as_text()) if cfg.devices > 1 else 0,
        "xla_flops_per_device": jax_hlo.cost_flops(compiled.cost_analysis()),
        "xla_flops_per_step": grad_flops * cfg.devices if grad_flops is not None else None,
        # forward + backward of one device's slice: what shrinks as 1/N in strong scaling
        "xla_train_flops_per_device": grad_flops,
    }
    return compiled, stats


def compiled_stats(cfg: RunConfig) -> dict[str, Any]:
    s = setup(cfg)
    data = s.data
    p = s.program
    x, y = local_batch(data, 0, cfg, jax.process_index(), jax.process_count())
    put = lambda t: jax.tree.map(p.put_replicated, t)  # noqa: E731
    _, stats = compile_step(s, cfg, put(s.state), put(s.opt_state), p.put_batch(x, cfg.global_batch), p.put_batch(y, cfg.global_batch))
    return stats


def _init_distributed(cfg: RunConfig, ctx: Any) -> None:
    if ctx.world <= 1:
        return
    addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = os.environ["MASTER_PORT"]  # free: jax is the only user of it in a jax run
    if addr in ("127.0.0.1", "localhost"):  # one host: keep gloo on loopback too; across hosts
        _loopback_collectives(addr)         # (Ray) each host binds its own address, JAX's default
    jax.distributed.initialize(
        coordinator_address=f"{addr}:{port}",
        coordinator_bind_address=f"{addr}:{port}",
        num_processes=ctx.world,
        process_id=ctx.rank,
        initialization_timeout=max(10, int(cfg.startup_timeout)),
    )


def _loopback_collectives(addr: str) -> None:
    """Make JAX's CPU gloo collectives listen on the coordinator's (loopback) address.

    jax creates them as ``make_gloo_tcp_collectives(client)``, which binds to the host name's
    address; there is no public option, so pass ``hostname`` through when the factory accepts it.
    """
    try:
        from jax._src import xla_bridge as xb
    except ImportError:  # pragma: no cover - layout moved: keep JAX's default
        return
    mod = getattr(xb, "_jax", None) or getattr(getattr(xb, "xla_client", None), "_xla", None)
    make = getattr(mod, "make_gloo_tcp_collectives", None)
    if make is None or getattr(make, "_podscale", False):
        return

    def loopback(distributed_client: Any, hostname: str | None = None, interface: str | None = None) -> Any:
        return make(distributed_client=distributed_client, hostname=hostname or addr, interface=interface)

    loopback._podscale = True  # type: ignore[attr-defined]
    setattr(mod, "make_gloo_tcp_collectives", loopback)


def worker(cfg: RunConfig, ctx: Any) -> dict[str, Any] | None:
    _init_distributed(cfg, ctx)
    try:
        return train(cfg, ctx)
    finally:
        if ctx.world > 1:
            try:
                jax.distributed.shutdown()
            except Exception:  # noqa: BLE001 - best effort: the worker leaves through os._exit
                pass


def _tree_leaves_np(prog: Program, tree: Any) -> list[np.ndarray]:
    return [prog.first(a) for a in jax.tree.leaves(tree)]


def save_checkpoint(cfg: RunConfig, step: int, prog: Program, state: Any, opt_state: Any, losses: list[float], times: list[float]) -> None:
    arrays = {f"state_{i:04d}": a for i, a in enumerate(_tree_leaves_np(prog, state))}
    arrays.update({f"opt_{i:04d}": a for i, a in enumerate(_tree_leaves_np(prog, opt_state))})
    arrays.update(step=np.int64(step), losses=np.asarray(losses, np.float64), step_times=np.asarray(times, np.float64),
                  backend=np.str_(cfg.backend), model=np.str_(cfg.model))
    assert cfg.checkpoint_dir
    checkpoint.write_atomic(checkpoint.path_for(cfg.checkpoint_dir, step, "npz"), lambda f: np.savez(f, **arrays))
    checkpoint.prune(cfg.checkpoint_dir, "npz")


def load_checkpoint(path: Any, state: Any, opt_state: Any) -> tuple[int, Any, Any, list[float], list[float]]:
    """Restore leaves into the trees of a fresh setup (same model and optimizer, checked)."""
    with np.load(path, allow_pickle=False) as z:
        files = set(z.files)

        def rebuild(tree: Any, prefix: str) -> Any:
            leaves, treedef = jax.tree.flatten(tree)
            names = sorted(k for k in files if k.startswith(prefix + "_"))
            if len(names) != len(leaves) or any(z[n].shape != np.shape(a) for n, a in zip(names, leaves)):
                raise UsageError(f"checkpoint {str(path)!r} does not match this run's model and optimizer "
                                 f"(resume with the config that wrote it, or use a fresh --checkpoint-dir)")
            return jax.tree.unflatten(treedef, [z[n] for n in names])

        return (int(z["step"]), rebuild(state, "state"), rebuild(opt_state, "opt"),
                z["losses"].tolist(), z["step_times"].tolist())


def train(cfg: RunConfig, ctx: Any) -> dict[str, Any] | None:
    """Train on this process's devices; process 0 returns the raw record."""
    pid, nproc = jax.process_index(), jax.process_count()
    s = setup(cfg)
    prog, spec, data = s.program, s.spec, s.data

    start, losses_done, times_done = 0, [], []
    state, opt_state = s.state, s.opt_state
    ckpt = checkpoint.latest(cfg.checkpoint_dir, "npz") if cfg.resume and cfg.checkpoint_dir else None
    if ckpt is not None:
        start, state, opt_state, losses_done, times_done = load_checkpoint(ckpt[1], state, opt_state)
        losses_done = losses_done[:start]

    state = jax.tree.map(prog.put_replicated, state)
    opt_state = jax.tree.map(prog.put_replicated, opt_state)

    def batch(step: int) -> tuple[Any, Any]:
        x, y = local_batch(data, step, cfg, pid, nproc)
        return prog.put_batch(x, cfg.global_batch), prog.put_batch(y, cfg.global_batch)

    xb, yb = batch(start)
    compiled, stats = compile_step(s, cfg, state, opt_state, xb, yb)
    if prog.kind == "pmap" and nproc > 1:
        compiled = prog.jitted  # an AOT-compiled multi-process pmap wants global-shaped inputs

    timer = StepTimer()
    losses: list[float] = []
    for step in range(start, cfg.steps):
        maybe_fault(ctx.rank, step)
        xb, yb = batch(step)
        timer.start()
        state, opt_state, loss = compiled(state, opt_state, xb, yb)
        losses.append(float(prog.first(loss).reshape(-1)[0]))  # host sync every step (<= MAX_UNSYNCED_STEPS)
        timer.stop()
        ctx.beat(step + 1)
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps and pid == 0:
            save_checkpoint(cfg, step + 1, prog, state, opt_state, losses_done + losses, times_done + timer.times)

    model = nnx.merge(s.graphdef, jax.tree.map(prog.first, state))
    final = mflax.to_canonical(spec, model)
    identical = _replicas_identical(prog, state)
    if pid != 0:
        return None
    if getattr(ctx, "run_dir", None) is not None:
        np.savez(ctx.run_dir / "final_params.npz", **final)
    import flax

    return {
        "losses": losses_done + losses,
        "step_times": times_done + timer.times,
        "final_params_l2": float(np.sqrt(sum(float(np.sum(p.astype(np.float64) ** 2)) for p in final.values()))),
        "replicas_identical": identical,
        "resumed_from_step": start or None,
        **({"accuracy": acc} if (acc := _accuracy(model, data)) is not None else {}),
        "device_kind": str(prog.devices[0].device_kind),
        "processes": nproc,
        "hardware": hardware_id(prog.devices[0]),
        "versions": {"jax": jax.__version__, "jaxlib": _jaxlib_version(), "flax": flax.__version__, "optax": optax.__version__},
        "backend_info": {"program": prog.kind, "devices_per_process": len(prog.local_devices),
                         "platform": prog.devices[0].platform},
        **stats,
    }


def _accuracy(model: Any, data: Any) -> float | None:
    """Held-out accuracy when the dataset has a test split (``--data digits``)."""
    if getattr(data, "x_test", None) is None:
        return None
    from models.flax.cnn import configure_bn
    from scaling.datasets import accuracy

    configure_bn(model, train=False)  # running BN statistics, no pmap axis outside the step
    return accuracy(lambda x: np.asarray(model(x)), data)


def _jaxlib_version() -> str:
    try:
        import jaxlib

        return str(jaxlib.__version__)
    except Exception:  # noqa: BLE001
        return "unknown"


def _replicas_identical(prog: Program, state: Any) -> bool:
    """Every device's copy of every parameter has the same bytes, in every process."""
    h = hashlib.sha256()
    same = True
    for leaf in jax.tree.leaves(state):
        reps = prog.replicas(leaf)
        same &= all(r == reps[0] for r in reps)
        h.update(reps[0])
    mine = np.frombuffer(h.digest() + bytes([int(same)]), dtype=np.uint8)
    if jax.process_count() == 1:
        return bool(same)
    from jax.experimental import multihost_utils

    every = np.asarray(multihost_utils.process_allgather(mine))
    return bool(np.all(every == every[0]) and np.all(every[:, -1] == 1))
