"""FLOP counting: closed forms per layer kind, the per-layer table of a spec, and two independent
cross-checks (torch ``FlopCounterMode`` and XLA ``cost_analysis``).

The predictor needs FLOPs of full-size networks without building them, so the count is analytic and
comes from the spec (``models.spec.LayerCost``). The closed forms below are the conventions the specs
follow (a multiply-add = 2 FLOPs; backward = 2 x forward except a first layer, whose input is data);
the framework counters exist to catch a spec whose arithmetic drifted from what actually runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from models.spec import ModelSpec, get_spec

# ---- closed forms (per sample, forward) ------------------------------------------------------


def dense_flops(d_in: int, d_out: int, rows: int = 1) -> int:
    """x (rows x d_in) @ W (d_in x d_out): one multiply-add per weight per row."""
    return 2 * rows * d_in * d_out


def conv2d_flops(h_out: int, w_out: int, c_in: int, c_out: int, k: int, groups: int = 1) -> int:
    """Every output element is a dot product of length c_in/groups x k x k."""
    return 2 * h_out * w_out * c_out * (c_in // groups) * k * k


def attention_flops(seq: int, d_model: int) -> int:
    """Scores (Q K^T) and the weighted sum (A V): 2 x seq^2 x d_model each, over all heads together."""
    return 2 * (2 * seq * seq * d_model)


def pool_ops(h_out: int, w_out: int, c: int, k: int) -> int:
    """Comparisons/adds of a k x k pool: elementwise work, not model FLOPs (counters skip it too)."""
    return h_out * w_out * c * k * k


def norm_ops(elements: int) -> int:
    """Batch/layer norm: ~8 elementwise ops per element (mean, var, normalise, scale, shift)."""
    return 8 * elements


def train_flops(forward: int, first_layer: bool = False) -> int:
    """Forward + backward: backward = input gradient + weight gradient = 2 x forward, except the
    first layer, whose input needs no gradient."""
    return forward + (forward if first_layer else 2 * forward)


# ---- a spec's table ------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerRow:
    name: str
    kind: str
    params: int
    forward: int
    backward: int
    share: float
    """This layer's fraction of the model's training FLOPs."""


@dataclass(frozen=True)
class FlopCount:
    model: str
    params: int
    forward_per_sample: int
    backward_per_sample: int
    grad_bytes: int
    layers: list[LayerRow]

    @property
    def train_per_sample(self) -> int:
        return self.forward_per_sample + self.backward_per_sample

    def per_step(self, global_batch: int) -> int:
        return self.train_per_sample * global_batch


def count(spec: ModelSpec | str, **opts: Any) -> FlopCount:
    """The analytic count of a spec (or model name), with its per-layer breakdown."""
    if isinstance(spec, str):
        spec = get_spec(spec, **opts)
    costs = spec.layer_costs()
    total = sum(c.forward_flops + c.backward_flops for c in costs) or 1
    rows = [LayerRow(c.name, c.kind, c.params, c.forward_flops, c.backward_flops, (c.forward_flops + c.backward_flops) / total)
            for c in costs]
    return FlopCount(spec.name, spec.param_count, spec.forward_flops_per_sample, spec.backward_flops_per_sample,
                     spec.grad_bytes(), rows)


# ---- cross-checks through the frameworks (imported lazily) ----------------------------------


def torch_counted(spec: ModelSpec, batch: int) -> dict[str, int]:
    """forward and forward+backward FLOPs of the torch module, counted by ``FlopCounterMode``."""
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    from models import torch as mtorch

    model = mtorch.build(spec, spec.init_params(0))
    x, y = spec.synthetic_data(batch, 0)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    with FlopCounterMode(display=False) as fc:
        model(xt)
    fwd = fc.get_total_flops()
    with FlopCounterMode(display=False) as fc:
        out = model(xt).float()
        loss = F.cross_entropy(out, yt) if spec.task == "classification" else F.mse_loss(out, yt)
        loss.backward()
    return {"forward": int(fwd), "train": int(fc.get_total_flops())}


def xla_counted(spec: ModelSpec, batch: int) -> dict[str, int]:
    """forward+backward FLOPs of the same computation, from XLA's ``cost_analysis`` of the compiled
    gradient (an MLP written directly in jax.numpy from the spec's parameters, so this check does not
    depend on any module implementation)."""
    import jax
    import jax.numpy as jnp

    if spec.name != "mlp":
        raise ValueError("xla_counted covers the mlp spec (other models: use their flax modules)")
    params = {k: jnp.asarray(v) for k, v in spec.init_params(0).items()}
    x, y = spec.synthetic_data(batch, 0)
    act = jax.nn.relu if getattr(spec, "activation", "relu") == "relu" else jax.nn.sigmoid

    def loss(p: dict[str, Any], xb: Any, yb: Any) -> Any:
        h = act(xb @ p["w1"] + p.get("b1", 0.0))
        return jnp.mean((h @ p["w2"] + p.get("b2", 0.0) - yb) ** 2)

    def fwd(p: dict[str, Any], xb: Any) -> Any:
        return act(xb @ p["w1"] + p.get("b1", 0.0)) @ p["w2"] + p.get("b2", 0.0)

    def flops_of(fn: Any, *args: Any) -> int:
        cost = jax.jit(fn).lower(*args).compile().cost_analysis()
        if isinstance(cost, list):
            cost = cost[0]
        return int(cost["flops"])

    return {"forward": flops_of(fwd, params, x), "train": flops_of(jax.grad(loss), params, x, y)}
