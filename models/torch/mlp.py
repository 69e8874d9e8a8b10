"""The lecture's TwoLayerNet and its custom-autograd Sigmoid."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from models.spec import MLPSpec, ModelSpec


class Sigmoid(torch.autograd.Function):
    """The lecture's custom autograd op, made numerically stable in both directions.

    The naive ``1 / (1 + exp(-x))`` overflows ``exp`` for large negative x (inf, then a NaN
    gradient through autograd's view of it). Computing from ``exp(-|x|)`` never overflows, and the
    backward uses the saved output, ``y (1 - y)``, so no exponential is evaluated twice.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        z = torch.exp(-x.abs())
        y = torch.where(x >= 0, 1.0 / (1.0 + z), z / (1.0 + z))
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (y,) = ctx.saved_tensors
        return grad_y * y * (1.0 - y)


class TwoLayerNet(nn.Module):
    """Linear -> relu (clamp, as in the lecture) or custom Sigmoid -> Linear."""

    def __init__(self, d_in: int, hidden: int, d_out: int, bias: bool = True, activation: str = "relu"):
        super().__init__()
        self.linear1 = nn.Linear(d_in, hidden, bias=bias)
        self.linear2 = nn.Linear(hidden, d_out, bias=bias)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear1(x)
        h = h.clamp(min=0) if self.activation == "relu" else Sigmoid.apply(h)
        return self.linear2(h)


def build_mlp(spec: ModelSpec, params: dict[str, np.ndarray]) -> nn.Module:
    assert isinstance(spec, MLPSpec)
    m = TwoLayerNet(spec.d_in, spec.hidden, spec.d_out, spec.bias, spec.activation)
    with torch.no_grad():
        # canonical layout is (in, out); nn.Linear stores (out, in)
        m.linear1.weight.copy_(torch.from_numpy(np.ascontiguousarray(params["w1"].T)))
        m.linear2.weight.copy_(torch.from_numpy(np.ascontiguousarray(params["w2"].T)))
        if spec.bias:
            m.linear1.bias.copy_(torch.from_numpy(params["b1"]))
            m.linear2.bias.copy_(torch.from_numpy(params["b2"]))
    return m


def mlp_to_canonical(spec: ModelSpec, m: nn.Module) -> dict[str, np.ndarray]:
    assert isinstance(spec, MLPSpec) and isinstance(m, TwoLayerNet)
    out = {"w1": m.linear1.weight.detach().cpu().T.numpy().copy()}
    if spec.bias:
        out["b1"] = m.linear1.bias.detach().cpu().numpy().copy()
    out["w2"] = m.linear2.weight.detach().cpu().T.numpy().copy()
    if spec.bias:
        out["b2"] = m.linear2.bias.detach().cpu().numpy().copy()
    return {k: out[k] for k in spec.param_shapes()}
