"""The model zoo on jax-pmap and jax-sharded (imported only inside worker processes), trained by the
training API's loop: ``scaling.train_jax.fit``, the one JAX loop for the zoo and users' scripts.

What the zoo adds to that loop is its model, data and loss. Each device's loss is the mean (or, for
``--loss-reduction sum``, the sum) of the per-example losses of the batch it is given, with the
meaning torch's ``F.mse_loss``/``F.cross_entropy`` give them: the mean is over every loss element
(samples × outputs for squared error, samples × positions for sequence cross-entropy). ``fit``
builds the data-parallel step around it:

- jax-pmap: ``jax.pmap`` with ``pmean`` (``psum`` for sums) of gradients and loss over ``data``;
- jax-sharded: ``jax.jit`` over a ``Mesh(('data',))``, batch sharded on ``data``, params
  replicated; XLA's partitioner inserts the same all-reduce (``PODSCALE_JAX_STEP=shard_map``: the
  per-device step with explicit collectives).

The run reports the all-reduce bytes and whole-step FLOPs of the executable ``fit`` compiled and
ran, and, as the model FLOPs XLA counts, the forward + backward of one device's slice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from models import flax as mflax
from models.flax.cnn import configure_bn
from models.spec import ModelSpec, get_spec
from scaling import train_jax as api
from scaling.backends import jax_hlo
from scaling.backends.jax_env import step_kind
from scaling.config import RunConfig
from scaling.context import WorkerContext
from scaling.data import load_dataset, load_init

#: what the API's result holds for a user's model that the zoo's result takes from its spec or
#: reports under its own keys (below)
API_ONLY_KEYS = ("model", "params", "grad_bytes", "global_batch", "steps", "untimed_steps", "scalars", "op_record",
                 "model_flops_per_step", "device_syncs", "sync_every")


def make_optimizer(cfg: RunConfig) -> optax.GradientTransformation:
    """The hyper-parameters of ``torch_common.make_optimizer`` (torch Adam: eps outside the sqrt)."""
    if cfg.optimizer == "adam":
        return optax.adam(cfg.lr, b1=0.9, b2=0.999, eps=1e-8)
    return optax.sgd(cfg.lr)


def summed_loss(spec: ModelSpec, out: jax.Array, y: jax.Array) -> jax.Array:
    out = out.astype(jnp.float32)
    if spec.task == "classification":
        # sequence models classify every position: flatten the leading axes, as torch_common does
        logits = out.reshape(-1, out.shape[-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, y.reshape(-1)).sum()
    return jnp.sum((out - y) ** 2)


def compute_dtype(cfg: RunConfig) -> Any:
    return jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32


@dataclass
class Zoo:
    """One zoo run's parts, as ``fit`` takes them."""

    spec: ModelSpec
    data: Any
    init: dict[str, np.ndarray]
    model: nnx.Module
    tx: optax.GradientTransformation
    loss_fn: Callable[[nnx.Module, Any], jax.Array]
    hooks: api.Hooks

    def global_batch(self, step: int, size: int) -> tuple[np.ndarray, np.ndarray]:
        idx = self.data.indices(step, size)  # scaling.data's rule: (step * B + i) mod n
        return self.data.x[idx], self.data.y[idx]


def build(cfg: RunConfig) -> Zoo:
    spec = get_spec(cfg.model, **cfg.model_opts)
    data = load_dataset(spec, cfg.data, cfg.global_batch, cfg.seed)
    init = load_init(spec, cfg.init, cfg.seed)
    model = mflax.build(spec, init, dtype=compute_dtype(cfg))
    # batch-norm DP mode (a no-op for models without BN): a per-device program (pmap, shard_map)
    # reduces the statistics over the axis; the global jit step splits the batch into one group per device
    per_device = cfg.backend == "jax-pmap" or step_kind() == "shard_map"
    configure_bn(model, axis_name=api.AXIS if per_device else None, sync=cfg.sync_bn,
                 groups=1 if (per_device or cfg.sync_bn) else cfg.devices)
    mean = cfg.loss_reduction == "mean"

    def loss_fn(m: nnx.Module, batch: Any) -> jax.Array:
        x, y = batch
        total = summed_loss(spec, m(x), y)
        return total / y.size if mean else total

    hooks = api.Hooks(params=lambda m: mflax.to_canonical(spec, m), loss_reduction=cfg.loss_reduction)
    return Zoo(spec, data, init, model, make_optimizer(cfg), loss_fn, hooks)


def worker(cfg: RunConfig, ctx: Any) -> dict[str, Any] | None:
    api.init(cfg, ctx, fresh=True)  # joins jax.distributed when the run has several processes
    try:
        return train(cfg)
    finally:
        try:
            api.shutdown()
        except Exception:  # noqa: BLE001 - best effort: the worker leaves through os._exit
            pass


def train(cfg: RunConfig) -> dict[str, Any] | None:
    """Train the zoo's model in this process's session; process 0 returns the raw record."""
    z = build(cfg)
    s = api.session()
    api.fit(z.model, z.tx, z.loss_fn, lambda step: z.global_batch(step, cfg.global_batch), steps=cfg.steps,
            global_batch=cfg.global_batch, sync_every=1, hooks=z.hooks)  # a host sync, and a real step time, every step
    if s.rank != 0:
        return None
    raw = dict(s.result or {})
    record, comm = raw.get("op_record") or {}, raw.get("comm_bytes_per_step")
    for k in API_ONLY_KEYS:
        raw.pop(k, None)
    raw.update(_stats(cfg, z, record, comm[0] if comm else 0))
    acc = _accuracy(z.model, z.data)
    if acc is not None:
        raw["accuracy"] = acc
    return raw


def compiled_stats(cfg: RunConfig) -> dict[str, Any]:
    """Communication and FLOPs of ``cfg``'s compiled step (``jax_dp.compiled_stats``), in this one process."""
    api.init(cfg, WorkerContext(rank=0, world=1, local_rank=0, run_dir=None, progress=None), fresh=True)
    z = build(cfg)
    record = api.compiled_record(z.model, z.tx, z.loss_fn, z.global_batch(0, cfg.global_batch), hooks=z.hooks)
    return _stats(cfg, z, record, record.get("comm_bytes"))


def _stats(cfg: RunConfig, z: Zoo, record: dict[str, Any], comm: Any) -> dict[str, Any]:
    """The zoo's names for what XLA says about the step:

    - ``comm_bytes_per_step``: all-reduce bytes per device in the compiled HLO of the step that
      runs (0 on one device, where a single-member all-reduce moves nothing);
    - ``xla_flops_per_device``: XLA's FLOPs for that whole step on one device, optimizer update and
      the replicated elementwise work included: what each device executes;
    - ``xla_flops_per_step``: XLA's FLOPs of the forward + backward on one device's slice, times
      devices: the spec's ``model_flops_per_step`` counted by XLA (the optimizer update, repeated
      on every replica, is not model FLOPs);
    - ``xla_train_flops_per_device``: that forward + backward on one device's slice (what shrinks
      as 1/N in strong scaling).
    """
    train = _train_flops_per_device(cfg, z)
    return {"comm_bytes_per_step": comm, "allreduce_operands": record.get("allreduce_operands"),
            "xla_flops_per_device": record.get("flops_per_device"),
            "xla_flops_per_step": train * cfg.devices if train is not None else None, "xla_train_flops_per_device": train}


def _train_flops_per_device(cfg: RunConfig, z: Zoo) -> float | None:
    """XLA's count (lowered, not compiled) of the loss's value and gradient on one device's slice,
    batch norm on that slice alone (a fresh module: no replica axis)."""
    graphdef, params, rest = nnx.split(mflax.build(z.spec, z.init, dtype=compute_dtype(cfg)), nnx.Param, ...)
    b = cfg.per_device_batch
    xs, ys = (jax.ShapeDtypeStruct((b, *a.shape[1:]), jnp.asarray(a[:1]).dtype) for a in (z.data.x, z.data.y))

    def f(p: Any, r: Any, x: jax.Array, y: jax.Array) -> jax.Array:
        return z.loss_fn(nnx.merge(graphdef, p, jax.tree.map(lambda a: a, r)), (x, y))  # BN writes r: this trace's copy

    return jax_hlo.cost_flops(jax.jit(jax.value_and_grad(f)).lower(params, rest, xs, ys).cost_analysis())


def _accuracy(model: nnx.Module, data: Any) -> float | None:
    """Held-out accuracy when the dataset has a test split (``--data digits``)."""
    if getattr(data, "x_test", None) is None:
        return None
    from scaling.datasets import accuracy

    configure_bn(model, train=False)  # running BN statistics, no pmap axis outside the step
    return accuracy(lambda x: np.asarray(model(x)), data)
