"""AlexNet, VGG-16, ResNet-18/50 as ``flax.nnx`` modules interpreting the spec's op list.

The same op list as ``models/torch/cnn.py``; canonical layouts are already JAX's (conv HWIO,
linear (in, out)), so arrays go in and out unchanged. Inputs arrive as (N, C, H, W) like torch's and
are transposed to NHWC; before flattening the map goes back to C, H, W order so the classifier rows
mean the same thing in both frameworks.

Batch norm (``BatchNorm``) is written out rather than taken from ``nnx.BatchNorm`` because it must
match torch bit-for-bit in meaning: the running variance is the *unbiased* batch variance with
torch's momentum convention, and it has the three data-parallel modes the backends need
(``configure_bn``):

- ``axis_name`` + ``sync=True``: cross-replica statistics (``lax.pmean`` over the pmap axis);
- ``axis_name`` + ``sync=False``: per-device statistics; only the *running* statistics are
  pmean'd every step, which equals averaging them once at the end (they are linear in the batch
  statistics) and keeps every replica identical;
- ``groups=G`` without an axis: statistics per contiguous G-th of the batch, i.e. per-device
  batch norm written in the global view (jax-sharded, and single-process references).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from models.cnn_spec import BN_EPS, BN_MOMENTUM, CNNSpec, Op
from models.spec import ModelSpec


def _key(name: str) -> str:
    return name.replace(".", "_")


class Conv(nnx.Module):
    def __init__(self, op: Op, params: dict[str, np.ndarray], dtype: Any):
        _, _, _, self.stride, self.pad, bias = op.args
        self.w = nnx.Param(jnp.asarray(params[f"{op.name}.w"]))
        self.b = nnx.Param(jnp.asarray(params[f"{op.name}.b"])) if bias else None
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        y = lax.conv_general_dilated(x.astype(self.dtype), self.w[...].astype(self.dtype), (self.stride, self.stride),
                                     [(self.pad, self.pad)] * 2, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     preferred_element_type=jnp.float32)
        return y + self.b[...] if self.b is not None else y


class Linear(nnx.Module):
    def __init__(self, op: Op, params: dict[str, np.ndarray], dtype: Any):
        self.w = nnx.Param(jnp.asarray(params[f"{op.name}.w"]))
        self.b = nnx.Param(jnp.asarray(params[f"{op.name}.b"])) if op.args[2] else None
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.matmul(x.astype(self.dtype), self.w[...].astype(self.dtype), preferred_element_type=jnp.float32)
        return y + self.b[...] if self.b is not None else y


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def _allreduce_sum(x: jax.Array, axis_name: str) -> jax.Array:
    """Sum over replicas whose gradient is the sum over replicas of the incoming gradients: every
    replica's loss depends on every replica's statistics (torch's ``_AllReduceSum``). Written out
    because what ``psum`` transposes to depends on JAX's replication typing."""
    return lax.psum(x, axis_name)


def _allreduce_fwd(x: jax.Array, axis_name: str) -> tuple[jax.Array, None]:
    return lax.psum(x, axis_name), None


def _allreduce_bwd(axis_name: str, _res: None, g: jax.Array) -> tuple[jax.Array]:
    return (lax.psum(g, axis_name),)


_allreduce_sum.defvjp(_allreduce_fwd, _allreduce_bwd)


class BatchNorm(nnx.Module):
    def __init__(self, op: Op, params: dict[str, np.ndarray], state: dict[str, np.ndarray]):
        self.scale = nnx.Param(jnp.asarray(params[f"{op.name}.scale"]))
        self.bias = nnx.Param(jnp.asarray(params[f"{op.name}.bias"]))
        self.mean = nnx.BatchStat(jnp.asarray(state[f"{op.name}.mean"]))
        self.var = nnx.BatchStat(jnp.asarray(state[f"{op.name}.var"]))
        self.train = True
        self.axis_name: str | None = None
        self.sync = False
        self.groups = 1

    def __call__(self, x: jax.Array) -> jax.Array:  # NHWC
        x = x.astype(jnp.float32)
        if not self.train:
            return (x - self.mean[...]) * lax.rsqrt(self.var[...] + BN_EPS) * self.scale[...] + self.bias[...]
        b, h, w, c = x.shape
        g = self.groups
        xg = x.reshape(g, b // g, h, w, c)
        n = (b // g) * h * w
        sync = bool(self.axis_name and self.sync)
        total = (lambda v: _allreduce_sum(v, self.axis_name)) if sync else (lambda v: v)
        if sync:
            n = n * lax.psum(1, self.axis_name)
        mean = total(xg.sum(axis=(1, 2, 3), keepdims=True)) / n
        xc = xg - mean
        var = total((xc * xc).sum(axis=(1, 2, 3), keepdims=True)) / n
        y = xc * lax.rsqrt(var + BN_EPS) * self.scale[...] + self.bias[...]
        # running statistics: torch's update, averaged over groups (and replicas)
        bm = lax.stop_gradient(mean.reshape(g, c).mean(axis=0))
        bv = lax.stop_gradient(var.reshape(g, c).mean(axis=0)) * (n / (n - 1))
        if self.axis_name and not self.sync:
            bm, bv = lax.pmean((bm, bv), self.axis_name)
        self.mean[...] = (1 - BN_MOMENTUM) * self.mean[...] + BN_MOMENTUM * bm
        self.var[...] = (1 - BN_MOMENTUM) * self.var[...] + BN_MOMENTUM * bv
        return y.reshape(b, h, w, c)


class CNN(nnx.Module):
    def __init__(self, spec: CNNSpec, params: dict[str, np.ndarray], dtype: Any = jnp.float32):
        self.program = tuple(spec.ops())  # static: part of the graph definition
        state = {**spec.init_state(), **{k: v for k, v in params.items() if k in spec.state_shapes()}}
        for op in self.program:
            if op.kind == "conv":
                setattr(self, _key(op.name), Conv(op, params, dtype))
            elif op.kind == "linear":
                setattr(self, _key(op.name), Linear(op, params, dtype))
            elif op.kind == "bn":
                setattr(self, _key(op.name), BatchNorm(op, params, state))

    def __call__(self, x: jax.Array) -> jax.Array:
        regs = {"h": jnp.transpose(x.astype(jnp.float32), (0, 2, 3, 1))}  # NCHW -> NHWC
        for op in self.program:
            a = regs[op.src]
            if op.kind in ("conv", "bn", "linear"):
                a = getattr(self, _key(op.name))(a)
            elif op.kind == "relu":
                a = jax.nn.relu(a)
            elif op.kind == "maxpool":
                k, s, p = op.args
                a = lax.reduce_window(a, -jnp.inf, lax.max, (1, k, k, 1), (1, s, s, 1), [(0, 0), (p, p), (p, p), (0, 0)])
            elif op.kind == "gap":
                a = a.mean(axis=(1, 2))
            elif op.kind == "flatten":
                a = jnp.transpose(a, (0, 3, 1, 2)).reshape(a.shape[0], -1)  # C, H, W order, as torch
            elif op.kind == "add":
                a = a + regs[op.args[0]]
            regs[op.dst] = a
        return regs["h"]


def configure_bn(module: nnx.Module, *, train: bool = True, axis_name: str | None = None, sync: bool = False, groups: int = 1) -> None:
    """Set every batch norm's mode (see the module docstring); a no-op for models without BN."""
    walk = nnx.iter_modules(module) if hasattr(nnx, "iter_modules") else module.iter_modules()
    for _, m in walk:
        if isinstance(m, BatchNorm):
            m.train, m.axis_name, m.sync, m.groups = train, axis_name, sync, groups


def build(spec: ModelSpec, params: dict[str, np.ndarray], dtype: Any = jnp.float32) -> nnx.Module:
    assert isinstance(spec, CNNSpec)
    return CNN(spec, params, dtype)


def to_canonical(spec: ModelSpec, m: nnx.Module) -> dict[str, np.ndarray]:
    """Parameters and batch-norm running statistics by canonical name (as ``cnn_to_canonical``)."""
    assert isinstance(spec, CNNSpec) and isinstance(m, CNN)
    out: dict[str, np.ndarray] = {}
    for op in m.program:
        layer = getattr(m, _key(op.name), None) if op.name else None
        if isinstance(layer, (Conv, Linear)):
            out[f"{op.name}.w"] = np.array(layer.w[...], dtype=np.float32)
            if layer.b is not None:
                out[f"{op.name}.b"] = np.array(layer.b[...], dtype=np.float32)
        elif isinstance(layer, BatchNorm):
            for k in ("scale", "bias", "mean", "var"):
                out[f"{op.name}.{k}"] = np.array(getattr(layer, k)[...], dtype=np.float32)
    return out
