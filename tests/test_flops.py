"""FLOP counting: the closed forms, the specs' per-layer tables, and two independent counters
(torch FlopCounterMode, XLA cost_analysis) agreeing with the analytic count."""

from __future__ import annotations

import json

import pytest

from launchers import cli
from models.spec import get_spec
from scaling.throughput import flops


def test_closed_forms():
    assert flops.dense_flops(1000, 100, rows=64) == 2 * 64 * 1000 * 100
    # ResNet-50's stem: 7x7/2 conv, 3 -> 64 channels, 224 -> 112
    assert flops.conv2d_flops(112, 112, 3, 64, 7) == 236_027_904
    assert flops.conv2d_flops(56, 56, 64, 64, 3, groups=64) == 2 * 56 * 56 * 64 * 9
    assert flops.attention_flops(seq=128, d_model=64) == 4 * 128 * 128 * 64
    assert flops.train_flops(10) == 30 and flops.train_flops(10, first_layer=True) == 20


def test_resnet50_spec_matches_published_figures():
    fc = flops.count("resnet50")
    assert fc.params == 25_557_032  # torchvision: 25.6M
    assert fc.forward_per_sample / 2 == pytest.approx(4.09e9, rel=0.01)  # ~4.1 GMACs
    stem = fc.layers[0]
    assert stem.forward == flops.conv2d_flops(112, 112, 3, 64, 7)
    assert stem.backward == stem.forward  # first layer: weight gradient only
    assert sum(r.share for r in fc.layers) == pytest.approx(1.0)
    vgg = flops.count("vgg16")
    assert vgg.params == pytest.approx(138.4e6, rel=0.01) and vgg.forward_per_sample / 2 == pytest.approx(15.5e9, rel=0.01)


def test_mlp_matches_torch_flop_counter():
    spec = get_spec("mlp")
    got = flops.torch_counted(spec, batch=4)
    assert got["forward"] == spec.forward_flops_per_sample * 4
    assert got["train"] == spec.train_flops_per_sample * 4  # no input gradient for the first layer


def test_mlp_matches_xla_cost_analysis():
    spec = get_spec("mlp", hidden=32)
    got = flops.xla_counted(spec, batch=8)
    # XLA also counts bias adds, relu and the loss: within 1% of the matmul count
    assert got["train"] == pytest.approx(spec.train_flops_per_sample * 8, rel=0.01)
    assert got["train"] >= spec.train_flops_per_sample * 8


def test_small_cnn_matches_torch_flop_counter():
    spec = get_spec("resnet18", image_size=32)
    got = flops.torch_counted(spec, batch=2)  # batch norm needs 2 samples in training mode
    assert got["forward"] == 2 * spec.forward_flops_per_sample
    assert got["train"] == 2 * spec.train_flops_per_sample


def test_cli_flops_breakdown(capsys):
    assert cli.main(["flops", "--model", "mlp", "--batch", "2", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["train"] == sum(r["forward"] + r["backward"] for r in d["layers"]) == 2 * get_spec("mlp").train_flops_per_sample
    assert [r["name"] for r in d["layers"]] == ["fc1", "fc2"]
    assert cli.main(["flops", "--model", "resnet50"]) == 0
    assert "stem.conv" in capsys.readouterr().out
    assert cli.main(["flops", "--model", "nope"]) == 2
    assert cli.main(["flops", "--model", "mlp", "--batch", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "nope" in err[0] and "--batch 0" in err[1]
