"""Model zoo: counts against published figures and framework counters, torch vs flax numerics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from launchers.cmd_models import jax_train_flops, torch_train_flops
from models import flax as mflax
from models import torch as mtorch
from models.cnn_spec import PUBLISHED, train_flops_without_padding
from models.spec import get_spec
from scaling.errors import UsageError

CNNS = ("alexnet", "vgg16", "resnet18", "resnet50")
SMALL = {
    "alexnet": dict(image_size=16, num_classes=10, width=8, hidden=32, small=True),
    "vgg16": dict(image_size=32, num_classes=10, width=4, hidden=32),
    "resnet18": dict(image_size=16, num_classes=10, width=8, small=True),
    "resnet50": dict(image_size=16, num_classes=10, width=4, small=True),
    "gpt-tiny": dict(vocab=32, seq_len=16, d_model=32, heads=4, layers=2),
}


@pytest.mark.parametrize("name", CNNS)
def test_full_size_counts_match_published(name: str) -> None:
    spec = get_spec(name)
    pub = PUBLISHED[name]
    assert abs(spec.param_count / pub["params"] - 1) < 0.01
    if "macs" in pub:
        assert abs(spec.forward_flops_per_sample / 2 / pub["macs"] - 1) < 0.01
    assert sum(c.params for c in spec.layer_costs()) == spec.param_count


@pytest.mark.parametrize("name", (*CNNS, "gpt-tiny", "mlp"))
def test_torch_flop_counter_equals_spec(name: str) -> None:
    """FlopCounterMode on the meta device counts the full k x k window and skips the first layer's
    input gradient, exactly as the spec does."""
    spec = get_spec(name)
    assert torch_train_flops(spec) == spec.train_flops_per_sample


@pytest.mark.parametrize("name", (*CNNS, "gpt-tiny"))
def test_xla_cost_analysis_matches_spec(name: str) -> None:
    """XLA counts only taps on real (non-padding) inputs and adds elementwise work (BN, relu,
    softmax, loss): compare with the spec's padding-free count, within 2%."""
    spec = get_spec(name)
    xla = jax_train_flops(spec)
    ref = spec.train_flops_per_sample if name == "gpt-tiny" else train_flops_without_padding(spec)
    assert abs(xla / ref - 1) < 0.02, (xla, ref)


def test_gpt_matches_six_n_rule() -> None:
    spec = get_spec("gpt-tiny", layers=4, d_model=256, heads=8, seq_len=128, vocab=512)
    L, d, T = spec.layers, spec.d_model, spec.seq_len
    per_token = spec.train_flops_per_sample / T
    assert per_token == 6 * spec.matmul_params + 12 * L * d * T
    non_embedding = spec.param_count - (spec.vocab + spec.seq_len) * d  # biases and LN included
    assert abs(per_token / (6 * non_embedding + 12 * L * d * T) - 1) < 0.02


@pytest.mark.parametrize("name", (*CNNS, "gpt-tiny"))
def test_torch_and_flax_agree(name: str) -> None:
    spec = get_spec(name, **SMALL[name])
    params = spec.init_params(3)
    x, _ = spec.synthetic_data(4, 0)
    tm = mtorch.build(spec, params)
    lt = tm(torch.from_numpy(x)).detach().numpy()
    fm = mflax.build(spec, params)
    lf = np.asarray(fm(x))
    out = (4, spec.seq_len, spec.vocab) if name == "gpt-tiny" else (4, 10)
    assert lt.shape == lf.shape == out
    np.testing.assert_allclose(lf, lt, rtol=1e-4, atol=1e-4 * float(np.abs(lt).max()))
    ct, cf = mtorch.to_canonical(spec, tm), mflax.to_canonical(spec, fm)
    assert set(ct) == set(cf) >= set(spec.param_shapes())
    for k in ct:  # parameters unchanged, BN running statistics updated the same way (train mode)
        np.testing.assert_allclose(cf[k], ct[k], rtol=1e-4, atol=1e-5)


def test_round_trip_and_bad_options() -> None:
    spec = get_spec("resnet18", **SMALL["resnet18"])
    p = {**spec.init_params(0), **spec.init_state()}
    back = mtorch.to_canonical(spec, mtorch.build(spec, p))
    assert all(np.array_equal(back[k], p[k]) for k in p)
    with pytest.raises(UsageError, match="image_size=4"):
        get_spec("alexnet", image_size=4)
    with pytest.raises(UsageError, match="heads=3"):
        get_spec("gpt-tiny", heads=3)
