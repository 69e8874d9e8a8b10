"""``scaling.partitionable_norms`` computes what torch's own norms compute (the reference here is
torch's ``nn.BatchNorm*d`` / ``nn.LayerNorm``, applied to the whole batch or to each device's slice),
and keeps the module's parameters, buffers and state-dict keys. Under torch-xla SPMD it is what
keeps those norms data parallel (tests/xla/test_partitionable_norms_xla.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from scaling.errors import UsageError
from scaling.partitionable_norms import make_partitionable


def _bn(cls: type, c: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    m = cls(c, momentum=0.3)
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.5, 0.5)
    return m


def _step(m: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward, and backward of the loss sum(y * dy)."""
    x = x.clone().requires_grad_(True)
    y = m(x)
    (y * dy).sum().backward()
    return y.detach(), x.grad


@settings(max_examples=12, deadline=None)
@given(kind=st.sampled_from([(nn.BatchNorm1d, ()), (nn.BatchNorm1d, (5,)), (nn.BatchNorm2d, (3, 2)), (nn.BatchNorm3d, (2, 2, 2))]),
       groups=st.sampled_from([1, 2, 4]), seed=st.integers(0, 2**16))
def test_batch_norm_is_torch_batch_norm_on_each_slice(kind: tuple[type, tuple[int, ...]], groups: int, seed: int) -> None:
    cls, spatial = kind
    c, per = 3, 4
    ref = _bn(cls, c, seed)
    mine = copy.deepcopy(ref)
    weight = mine.weight
    assert make_partitionable(nn.Sequential(mine), groups) == 1
    assert isinstance(mine, cls) and mine.weight is weight
    assert list(mine.state_dict()) == list(ref.state_dict())
    g = torch.Generator().manual_seed(seed)
    copies = [copy.deepcopy(ref) for _ in range(groups)]
    for _ in range(2):  # two training steps: the running statistics move twice
        x = torch.randn((groups * per, c, *spatial), generator=g) * 2 + 1
        dy = torch.randn(x.shape, generator=g)
        y, dx = _step(mine, x, dy)
        parts = [_step(m, xs, ds) for m, xs, ds in zip(copies, x.chunk(groups), dy.chunk(groups))]
        torch.testing.assert_close(y, torch.cat([p[0] for p in parts]), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dx, torch.cat([p[1] for p in parts]), rtol=1e-4, atol=1e-5)
    # parameter gradients: the sum over the slices; running statistics: their mean over the slices
    torch.testing.assert_close(mine.weight.grad, sum(m.weight.grad for m in copies), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(mine.bias.grad, sum(m.bias.grad for m in copies), rtol=1e-4, atol=1e-5)
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(mine, name), sum(getattr(m, name) for m in copies) / groups, rtol=1e-5, atol=1e-6)
    assert int(mine.num_batches_tracked) == 2
    mine.eval()
    ref.load_state_dict(mine.state_dict())
    ref.eval()
    x = torch.randn((per, c, *spatial), generator=g)
    torch.testing.assert_close(mine(x), ref(x), rtol=1e-5, atol=1e-6)


def test_layer_norm_is_torch_layer_norm() -> None:
    torch.manual_seed(0)
    for shape in ((8,), (4, 8)):
        ref = nn.LayerNorm(shape)
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            ref.bias.uniform_(-0.5, 0.5)
        mine = copy.deepcopy(ref)
        assert make_partitionable(mine, 4) == 1 and isinstance(mine, nn.LayerNorm)
        x = torch.randn(3, 5, *shape) * 3 + 2
        dy = torch.randn(x.shape)
        y_ref, dx_ref = _step(ref, x, dy)
        y, dx = _step(mine, x, dy)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dx, dx_ref, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(mine.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-5)


def test_only_torch_own_norms_are_swapped_and_groups_can_change() -> None:
    class MyNorm(nn.BatchNorm2d):
        pass

    model = nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2), MyNorm(2), nn.GroupNorm(1, 2), nn.LayerNorm(2))
    assert make_partitionable(model, 2) == 2  # BatchNorm2d and LayerNorm; a subclass keeps its own forward
    assert type(model[2]) is MyNorm and type(model[3]) is nn.GroupNorm
    assert make_partitionable(model, 1) == 2 and model[1].groups == 1  # a second call resets groups


def test_a_batch_that_does_not_split_is_one_line_naming_it() -> None:
    bn = nn.BatchNorm2d(2)
    make_partitionable(bn, 4)
    with pytest.raises(UsageError, match="batch of 6 samples; use a multiple of 4"):
        bn(torch.randn(6, 2, 2, 2))
    with pytest.raises(UsageError, match="groups 0"):
        make_partitionable(bn, 0)
