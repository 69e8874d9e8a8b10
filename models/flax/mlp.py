"""The lecture's TwoLayerNet as a ``flax.nnx`` module, built from the same spec and numpy init.

``nnx.Linear`` keeps its kernel as (in, out), which is already the canonical layout, so the
canonical arrays go in and come out unchanged (torch transposes them; see models/torch/mlp.py).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.spec import MLPSpec, ModelSpec


def _const(a: np.ndarray) -> Any:
    """An nnx initializer that returns the given canonical array (shape checked by the spec)."""

    def init(key: Any, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        return jnp.asarray(a, dtype=dtype).reshape(shape)

    return init


class TwoLayerNet(nnx.Module):
    """Linear -> relu or sigmoid -> Linear.

    ``jax.nn.sigmoid`` is already the numerically stable logistic (no overflow for large
    negative inputs), and its derivative is y (1 - y): the torch custom Sigmoid's contract.
    """

    def __init__(self, spec: MLPSpec, params: dict[str, np.ndarray], dtype: Any = jnp.float32):
        rngs = nnx.Rngs(0)  # unused: every parameter comes from the canonical arrays
        zeros = np.zeros

        def lin(d_in: int, d_out: int, w: str, b: str) -> nnx.Linear:
            return nnx.Linear(
                d_in, d_out, use_bias=spec.bias, dtype=dtype, param_dtype=jnp.float32,
                kernel_init=_const(params[w]),
                bias_init=_const(params[b] if spec.bias else zeros((d_out,), np.float32)),
                rngs=rngs,
            )

        self.linear1 = lin(spec.d_in, spec.hidden, "w1", "b1")
        self.linear2 = lin(spec.hidden, spec.d_out, "w2", "b2")
        self.activation = spec.activation

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.linear1(x)
        h = jax.nn.relu(h) if self.activation == "relu" else jax.nn.sigmoid(h)
        return self.linear2(h)


def build(spec: ModelSpec, params: dict[str, np.ndarray], dtype: Any = jnp.float32) -> nnx.Module:
    assert isinstance(spec, MLPSpec)
    return TwoLayerNet(spec, params, dtype)


def to_canonical(spec: ModelSpec, m: nnx.Module) -> dict[str, np.ndarray]:
    assert isinstance(spec, MLPSpec) and isinstance(m, TwoLayerNet)
    out = {"w1": np.asarray(m.linear1.kernel[...]), "w2": np.asarray(m.linear2.kernel[...])}
    if spec.bias:
        out["b1"] = np.asarray(m.linear1.bias[...])
        out["b2"] = np.asarray(m.linear2.bias[...])
    return {k: np.array(out[k], dtype=np.float32) for k in spec.param_shapes()}
