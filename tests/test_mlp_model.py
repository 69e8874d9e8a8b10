"""The lecture's TwoLayerNet: spec figures, custom Sigmoid, FLOPs against torch's own counter."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from models import torch as mtorch
from models.spec import MLPSpec, get_spec
from models.torch.mlp import Sigmoid
from scaling.errors import UsageError


def test_sigmoid_gradcheck_and_stability():
    x = torch.randn(30, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(Sigmoid.apply, (x,))
    extreme = torch.tensor([-1000.0, -50.0, 0.0, 50.0, 1000.0], requires_grad=True)
    y = Sigmoid.apply(extreme)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(extreme.grad).all()
    np.testing.assert_allclose(y.detach().numpy(), torch.sigmoid(extreme).detach().numpy(), rtol=1e-6)


@pytest.mark.parametrize("bias", [True, False])
def test_spec_counts(bias):
    s = MLPSpec(d_in=1000, hidden=100, d_out=10, bias=bias)
    assert s.param_count == 1000 * 100 + 100 * 10 + bias * 110
    assert s.grad_bytes() == 4 * s.param_count
    assert s.forward_flops_per_sample == 2 * (1000 * 100 + 100 * 10)
    # backward: 2x forward minus the first layer's input gradient
    assert s.backward_flops_per_sample == 2 * s.forward_flops_per_sample - 2 * 1000 * 100
    m = mtorch.build(s, seed=3)
    assert sum(p.numel() for p in m.parameters()) == s.param_count


@pytest.mark.parametrize("activation", ["relu", "sigmoid"])
def test_flops_match_flop_counter_mode(activation):
    """FlopCounterMode counts matmuls (addmm/mm) only, as the spec does; the first layer's input
    gradient is never computed because the data needs none, so the counts agree exactly."""
    spec = get_spec("mlp", activation=activation)
    model = mtorch.build(spec, seed=0)
    x, y = torch.randn(32, spec.d_in), torch.randn(32, spec.d_out)
    with FlopCounterMode(display=False) as fc:
        torch.nn.functional.mse_loss(model(x), y).backward()
    expected = spec.train_flops_per_sample * 32
    assert fc.get_total_flops() == pytest.approx(expected, rel=0.01)


def test_canonical_round_trip_and_init_is_deterministic():
    spec = get_spec("mlp", hidden="7", bias="false", d_in="5", d_out="2")
    assert list(spec.param_shapes()) == ["w1", "w2"] and spec.param_shapes()["w1"] == (5, 7)
    a, b = spec.init_params(1), spec.init_params(1)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["w1"], spec.init_params(2)["w1"])
    back = mtorch.to_canonical(spec, mtorch.build(spec, a))
    assert all(np.array_equal(a[k], back[k]) for k in a)


def test_bad_model_options_are_one_line_usage_errors():
    with pytest.raises(UsageError, match="activation='tanh'"):
        get_spec("mlp", activation="tanh")
    with pytest.raises(UsageError, match="unknown --model-opt 'width'"):
        get_spec("mlp", width="3")
    with pytest.raises(UsageError, match="hidden='ten'"):
        get_spec("mlp", hidden="ten")
    with pytest.raises(UsageError, match="unknown model 'mlpp'"):
        get_spec("mlpp")
