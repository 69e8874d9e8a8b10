"""The host step composed from the measured layer table: shapes recovered from the op list, the
grid read exactly where its rule is exact, the reference model's share taken out once, and a real
(tiny) layer table measured in both frameworks."""

from __future__ import annotations

import dataclasses
import math

import pytest

from models.spec import get_spec
from scaling.throughput import calibration, estimate, host_step, layer_rates
from scaling.throughput.roofline import layer_works

C, ALPHA, BETA = 3e-9, 0.7, 2.3


def power_table() -> dict:
    """Seconds that follow power laws (a matmul layer C M^ALPHA S^BETA, the memory-bound curves
    2e-9 n^0.9, the update 1e-9 P^1.1): a log-log grid reads a power law exactly, inside the grid
    and beyond it, so every figure below has a closed form."""
    def mm(m: int, s: int) -> tuple[int, int, int, float]:
        return (m, s, s, C * m**ALPHA * s**BETA)

    curve = [(n, 2e-9 * n**0.9) for n in (1 << 10, 1 << 14, 1 << 18)]
    return {"dense": [mm(m, s) for m in (16, 128) for s in (64, 256)],
            "conv": [(m, 9 * c, c, 2 * C * m**ALPHA * math.sqrt(9 * c * c) ** BETA) for m in (64, 1024) for c in (8, 32)],
            "eltwise": curve, "layernorm": [(n, 2 * t) for n, t in curve], "batchnorm": [(n, 3 * t) for n, t in curve],
            "adam": [(p, 1e-9 * p**1.1) for p in (300, 1 << 16, 1 << 20)], "sgd": [(p, 1e-10 * p) for p in (300, 1 << 20)]}


def per_flop(m: float, s: float, scale: float = 1.0) -> float:
    """The table's seconds per FLOP of a (M, S) layer: t / (6 M S^2), as the closed form gives it."""
    return scale * C * m**ALPHA * s**BETA / (6 * m * s * s)


def torch_cal(n: int) -> dict:
    """A torch-ddp calibration at N = n of made-up terms: overhead 2 ms, slowdown 2.5, a GEMM rate of
    1 GFLOP/s, the power-law layer table, and an all-reduce line from 1 KiB to 16 MiB."""
    cal = calibration._empty()
    cal["cores"] = 2
    cal["gemm"] = {"torch": {"fp32": {"1": {"64": 1e9}}}}
    cal["layers"] = {"torch": power_table()}
    cal["backends"]["torch-ddp"] = {"ref_grad_bytes": 1156, "per_n": {str(n): {"overhead_s": 2e-3, "slowdown": 2.5}}}
    cal["collectives"]["gloo"] = {str(n): {"points": [[1024, 1e-4], [1 << 24, 1e-2]], "alpha": 1e-4, "bw": 1.7e9}}
    return cal


def test_gemm_shapes_come_back_from_the_op_list():
    """M, K and N of each matmul layer from FLOPs, outputs and parameters, against the specs' own
    options: an mlp's dense layers, a ResNet's 3x3 and 1x1 convolutions, a transformer's projections."""
    mlp = layer_works(get_spec("mlp", d_in=256, hidden=1024, d_out=10).layer_costs(), 256)
    assert host_step._gemm_shape(mlp[0], 16) == pytest.approx((16, math.sqrt(256 * 1024)), rel=0.01)
    assert host_step._gemm_shape(mlp[1], 16) == pytest.approx((16, math.sqrt(1024 * 10)), rel=0.01)
    spec = get_spec("resnet18", small=True, image_size=16, width=16, num_classes=10)
    w = {x.name: x for x in layer_works(spec.layer_costs(), 3 * 16 * 16)}
    assert host_step._gemm_shape(w["stem.conv"], 2) == pytest.approx((2 * 16 * 16, math.sqrt(27 * 16)))
    assert host_step._gemm_shape(w["layer2.0.conv2"], 2) == pytest.approx((2 * 8 * 8, math.sqrt(9 * 32 * 32)))
    assert host_step._gemm_shape(w["layer3.0.down.conv"], 2) == pytest.approx((2 * 4 * 4, math.sqrt(32 * 64)))
    gpt = get_spec("gpt-tiny")
    g = {x.name: x for x in layer_works(gpt.layer_costs(), 64)}
    d, t = gpt.d_model, gpt.seq_len
    assert host_step._gemm_shape(g["h0.attn.qkv"], 4) == pytest.approx((4 * t, math.sqrt(d * 3 * d)), rel=0.02)  # bias: +1%


def test_layers_read_the_grid_exactly_where_its_rule_is_exact():
    tab = power_table()
    spec = get_spec("resnet18", small=True, image_size=16, width=16, num_classes=10)
    w = {x.name: x for x in layer_works(spec.layer_costs(), 3 * 16 * 16)}
    conv = w["layer4.1.conv2"]  # 128 channels at 2x2: beyond the conv grid in both M and S
    m, s = 16 * 4, math.sqrt(9 * 128 * 128)
    assert host_step.layer_seconds(conv, 16, tab) == pytest.approx(16 * (conv.fwd_flops + conv.bwd_flops) * per_flop(m, s, 2))
    stem = w["stem.conv"]  # the first layer: no input gradient, 2/3 of the table layer's FLOPs
    assert stem.bwd_flops == stem.fwd_flops
    s0 = math.sqrt(9 * 8 * 8)  # its sqrt(27 x 16) = 20.8 is below the grid's smallest S: costed at that S
    assert host_step.layer_seconds(stem, 16, tab) == pytest.approx(
        16 * 2 * stem.fwd_flops * (s0 / math.sqrt(27 * 16)) ** 2 * per_flop(16 * 256, s0, 2))
    # below the grid in both M and S (the reference's 16 -> 1 layer at 1 sample): the smallest
    # layer's time, a fixed cost, not a per-FLOP rate extrapolated down
    out = layer_works(get_spec("mlp", d_in=16, hidden=16, d_out=1).layer_costs(), 16)[1]
    assert host_step.layer_seconds(out, 1, tab) == pytest.approx(C * 16**ALPHA * 64**BETA, rel=0.01)
    assert host_step.update_seconds(100, tab, "adam") == pytest.approx(1e-9 * 300**1.1)  # below the curve: its first point
    assert host_step.layer_seconds(w["layer1.0.bn1"], 16, tab) == pytest.approx(3 * 2e-9 * (16 * 4096) ** 0.9)
    relu = next(x for x in layer_works(spec.layer_costs(), 3 * 16 * 16) if x.kind == "relu")  # the stem's: 16 x 16 x 16
    assert host_step.layer_seconds(relu, 8, tab) == pytest.approx(2e-9 * (8 * 4096) ** 0.9)
    # a dense layer with bias + relu adds one elementwise pass on its outputs; bias alone does not
    fc1, fc2 = layer_works(get_spec("mlp", d_in=256, hidden=1024, d_out=10).layer_costs(), 256)
    assert host_step.layer_seconds(fc1, 16, tab) == pytest.approx(
        16 * (fc1.fwd_flops + fc1.bwd_flops) * per_flop(16, 512) + 2e-9 * (16 * 1024) ** 0.9)
    assert host_step.layer_seconds(fc2, 16, tab) == pytest.approx(16 * (fc2.fwd_flops + fc2.bwd_flops) * per_flop(16, math.sqrt(10240)))
    assert host_step.update_seconds(1e6, tab, "adam") == pytest.approx(1e-9 * 1e6**1.1)
    assert host_step.update_seconds(1e6, tab, "sgd") == pytest.approx(1e-10 * 1e6)


def test_the_host_prediction_adds_the_models_layers_less_the_reference_ones():
    """step = overhead(N) + slowdown(N) x (the model's layers + update - the reference model's, at
    the one sample per device its step ran) + all-reduce beyond the reference's bytes."""
    cal = torch_cal(4)
    spec = get_spec("mlp", d_in=256, hidden=1024, d_out=10)
    wl = estimate.workload(spec)
    est = estimate.predict_step(wl, "host-cpu", 4, 64, backend="torch-ddp", calibration=cal, optimizer="adam")
    tab = cal["layers"]["torch"]
    ref = layer_works(get_spec("mlp", **calibration.REF_MODEL_OPTS).layer_costs(), 16)
    model_s = sum(host_step.layer_seconds(w, 16, tab) for w in wl.works) + 1e-9 * spec.param_count**1.1
    ref_s = sum(host_step.layer_seconds(w, 1, tab) for w in ref) + 1e-9 * 289**1.1
    ar = lambda b: 1e-4 + (b - 1024) * (1e-2 - 1e-4) / ((1 << 24) - 1024)  # noqa: E731 - the measured line
    assert est.compute_s == pytest.approx(2.5 * (model_s - ref_s))
    assert est.step_time_s == pytest.approx(2e-3 + 2.5 * (model_s - ref_s) + ar(spec.grad_bytes()) - ar(1156))
    sgd = estimate.predict_step(wl, "host-cpu", 4, 64, backend="torch-ddp", calibration=cal, optimizer="sgd")
    assert sgd.compute_s == pytest.approx(2.5 * (model_s - 1e-9 * spec.param_count**1.1 + 1e-10 * spec.param_count
                                                 - ref_s + 1e-9 * 289**1.1 - 1e-10 * 289))


@pytest.mark.parametrize("table", ["torch", "jax"])
def test_real_layer_tables(table):
    """The tiny grids, measured for real: every entry positive, and 16x the FLOPs take longer."""
    check_real_table(layer_rates.torch_table(tiny=True) if table == "torch" else layer_rates.jax_table(tiny=True), table)


def check_real_table(tab: dict, table: str) -> None:
    """What any framework's real tiny table must hold (torch_xla's is checked in tests/xla)."""
    g = layer_rates.TINY
    assert [(m, s) for m, s, _, _ in tab["dense"]] == [(m, s) for m in g["dense_m"] for s in g["dense_s"]]
    assert len(tab["conv"]) == len(g["conv_c"]) * len(g["conv_hw"])
    for kind in ("eltwise", "gelu", "softmax", "layernorm", "batchnorm", "adam", "sgd"):
        assert len(tab[kind]) == len(g["elems" if kind not in ("adam", "sgd") else "params"])
    assert all(p[-1] > 0 for k in tab for p in tab[k])
    assert [(m, k, n) for m, k, n, _ in tab["bmm"]] == [(m, s, s) for m in g["bmm_m"] for s in g["bmm_s"]]
    assert tab["softmax"][-1][0] == g["elems"][-1]
    # an update of 65536 parameters reads and writes a quarter MiB at least: a microsecond is a floor
    # no real update beats (XLA fused the old chain of updates into one pass: SGD at 0.1 us a size)
    assert tab["sgd"][-1][1] > 1e-6
    assert host_step.has_table(tab)
    if table != "torch_xla":  # torch_xla's tiny grid is its tracing, whatever the FLOPs (tests/xla)
        dense = {(m, s): t for m, s, _, t in tab["dense"]}
        assert dense[(128, 256)] > dense[(128, 64)]  # 16x the FLOPs
        bmm = {s: t for _, s, _, t in tab["bmm"]}
        # M / S matrices of S x S: 64x the FLOPs at the same rows (at 4x, torch's two read 0.309 and 0.314
        # ms in one CI run: its eager calls' dispatch outweighed the arithmetic)
        assert bmm[128] > bmm[16]
        assert tab["softmax"][-1][1] > tab["softmax"][0][1]  # 64x the scores
        assert tab["adam"][-1][1] > tab["adam"][0][1]
    counts = layer_rates.TENSORS[table]
    assert [c for c, _ in tab["adam_tensors"]] == list(counts) == [c for c, _ in tab["sgd_tensors"]]
    if table != "jax":  # torch steps tensor by tensor (eagerly, or tracing each): 32 tensors cost more than 4
        assert tab["adam_tensors"][1][1] > tab["adam_tensors"][0][1]


def test_torch_xla_is_priced_from_its_own_table_not_jax_s():
    """torch-xla's programs run on jax's runtime but are torch_xla's own lowering: its step is
    composed from the torch_xla table. With that table 3x jax's, its compute is 3x jax-sharded's
    on otherwise equal terms; without it, torch-xla has no layer table (ensure() measures one)."""
    cal = calibration._empty()
    cal["cores"] = 2
    cal["gemm"] = {"jax": {"fp32": {"device": {"64": 1e9}}}}
    slow = {k: [(*p[:-1], 3 * p[-1]) for p in v] for k, v in power_table().items()}
    cal["layers"] = {"jax": power_table(), "torch_xla": slow}
    for b in ("jax-sharded", "torch-xla"):
        cal["backends"][b] = {"ref_grad_bytes": 1156, "per_n": {"1": {"overhead_s": 2e-3, "slowdown": 1.0}}}
    wl = estimate.workload(get_spec("mlp", d_in=256, hidden=1024, d_out=10))
    jx, tx = (estimate.predict_step(wl, "host-cpu", 1, 16, backend=b, calibration=cal) for b in ("jax-sharded", "torch-xla"))
    assert jx.compute_s > 0 and tx.compute_s == pytest.approx(3 * jx.compute_s)
    assert calibration.host_terms(cal, "torch-xla", 1).layers is slow
    del cal["layers"]["torch_xla"]
    assert calibration.host_terms(cal, "torch-xla", 1).layers is None


def test_each_tensor_adds_to_the_update_and_the_reference_s_come_out():
    """A spec's update is the curve at its parameters plus, for each tensor beyond the count the
    curve was measured with, what the table's two splits differ by per tensor; 0 tensors (unknown)
    or a table without the split: the curve alone. In a prediction the reference's own four tensors
    are in its overhead already: only the model's tensors beyond them add, slowed as the rest."""
    tab = power_table()
    curve = host_step.update_seconds(1e5, tab, "adam")
    tab["adam_tensors"] = [(4, 1e-4), (32, 1e-4 + 28 * 2e-5)]  # 20 us a tensor
    assert host_step.update_seconds(1e5, tab, "adam") == pytest.approx(curve)  # tensors unknown
    assert host_step.update_seconds(1e5, tab, "adam", 2) == pytest.approx(curve)  # fewer than the curve's own
    assert host_step.update_seconds(1e5, tab, "adam", 62) == pytest.approx(curve + 58 * 2e-5)
    spec = get_spec("resnet18", small=True, image_size=16, width=16, num_classes=10)
    wl = estimate.workload(spec)
    assert wl.leaves == len(spec.param_shapes()) == 62
    cal = torch_cal(4)
    without = estimate.predict_step(wl, "host-cpu", 4, 64, backend="torch-ddp", calibration=cal).compute_s
    cal["layers"]["torch"]["adam_tensors"] = tab["adam_tensors"]
    with_ = estimate.predict_step(wl, "host-cpu", 4, 64, backend="torch-ddp", calibration=cal).compute_s
    assert with_ - without == pytest.approx(2.5 * 2e-5 * (62 - 4))


def test_a_users_measured_step_adds_its_own_optimizers_update():
    """A user's script is priced from its recorded matmul calls; its optimizer's update (read off
    the run, not --optimizer) comes from the table by its parameters, less the reference's 289
    (below the curve's first point, 300: that point's time). Unknown optimizer: no update priced."""
    cal = torch_cal(2)

    def compute(optimizer):
        wl = estimate.Workload("script", 10**6, 1.0, 1156, (), source="measured", op_flops=(1e6, 2e6), optimizer=optimizer)
        return estimate.predict_step(wl, "host-cpu", 2, 32, backend="torch-ddp", calibration=cal).compute_s

    assert compute(None) == pytest.approx(2.5 * 3e6 / 1e9)
    assert compute("adam") == pytest.approx(2.5 * (3e6 / 1e9 + 1e-9 * (1e6**1.1 - 300**1.1)))
    assert compute("sgd") == pytest.approx(2.5 * (3e6 / 1e9 + 1e-10 * (1e6 - 300)))


def record_step(model, x):
    """What ``fit``'s first step records of ``model`` at ``x``: its forward op by op, then the backward."""
    import torch

    from scaling.train_torch import OpRecorder, summarize_ops

    with OpRecorder() as rec:
        out = model(x)
        rec.phase = "loss"
        torch.nn.functional.mse_loss(out, torch.zeros_like(out)).backward()
    return summarize_ops(rec.ops, rec, x.shape[0])


@pytest.mark.parametrize("name,opts,batch", [
    ("mlp", {"d_in": 256, "hidden": 1024, "d_out": 10}, 16),
    ("resnet18", {"small": True, "image_size": 16, "width": 16, "num_classes": 10}, 8)])
def test_a_recorded_step_is_priced_as_its_spec_is(name, opts, batch):
    """A user's script has no spec: its first step's recorded forward (each matmul's GEMM shape,
    each other op's outputs) is priced from the same table. For the zoo's own torch modules the
    record must give the very layers the spec's op list does, and so the same seconds: FLOPs
    forward and backward (the first layer computes no input gradient) and every layer's kind."""
    import torch

    from models.torch import build

    spec = get_spec(name, **opts)
    rec = record_step(build(spec), torch.randn(batch, *spec.input_shape))
    got = host_step.recorded_works(rec["layers"], rec["batch"], rec["backward_gemm_flops"])
    want = layer_works(spec.layer_costs(), math.prod(spec.input_shape))
    assert sum(w.fwd_flops for w in got) == pytest.approx(sum(w.fwd_flops for w in want))
    assert sum(w.bwd_flops for w in got) == pytest.approx(sum(w.bwd_flops for w in want))
    assert sorted(w.kind for w in got if w.matmul) == sorted(w.kind for w in want if w.matmul)
    assert sum(not w.matmul for w in got) == sum(not w.matmul for w in want) + sum(  # an mlp's ReLU: the spec's epilogue
        1 for w in want if w.matmul and w.elementwise > w.out_elems)
    tab = power_table()
    for b in (1, batch, 4 * batch):  # and at other per-device batches than the one recorded
        assert host_step.step_seconds(got, b, tab, "adam", spec.param_count) == pytest.approx(
            host_step.step_seconds(want, b, tab, "adam"), rel=1e-9)


def test_the_input_layer_is_priced_without_an_input_gradient():
    """Backward = two GEMMs per matmul, but the first recorded one gets what the recorded backward
    FLOPs leave: one GEMM for a layer on the data, two when its input needs a gradient too."""
    layers = [{"kind": "dense", "m": 32, "k": 64.0, "n": 128, "fwd_flops": 2 * 32 * 64 * 128, "elems": 32 * 128, "count": 1},
              {"kind": "eltwise", "m": 0, "k": 0.0, "n": 0, "fwd_flops": 0, "elems": 32 * 128, "count": 1},
              {"kind": "dense", "m": 32, "k": 128.0, "n": 10, "fwd_flops": 2 * 32 * 128 * 10, "elems": 320, "count": 2}]
    f0, f1 = 2 * 64 * 128, 2 * 128 * 10  # per sample
    on_data = host_step.recorded_works(layers, 32, 32 * (f0 + 2 * 2 * f1))
    assert [w.bwd_flops for w in on_data] == [f0, 0.0, 2 * f1, 2 * f1]
    assert [w.kind for w in on_data] == ["dense", "eltwise", "dense", "dense"]
    assert on_data[0].gemm == (1.0, math.sqrt(64 * 128)) and on_data[1].out_elems == 128
    assert host_step.recorded_works(layers, 32, 32 * (2 * f0 + 4 * f1))[0].bwd_flops == 2 * f0


def test_one_device_all_reduces_nothing():
    """A calibration holds a collective curve at N = 1 (a one-rank group still copies), but no
    backend runs one with one device (no DDP wrapper, no psum in a one-device program): the
    prediction at N = 1 has no communication, and the step no all-reduce term."""
    cal = torch_cal(1)
    wl = estimate.workload(get_spec("mlp", d_in=256, hidden=1024, d_out=10))
    est = estimate.predict_step(wl, "host-cpu", 1, 16, backend="torch-ddp", calibration=cal)
    assert est.comm_s == 0.0 and est.allreduce_s == 0.0
    assert est.step_time_s == pytest.approx(est.overhead_s + est.compute_s)


def test_a_gelu_reads_its_own_curve_by_the_outputs_it_computes():
    """gpt's MLP GELU (after a dense over positions: 10-17x a ReLU's cost in XLA here) is priced by
    the table's GELU curve on the T x F outputs it computes, in place of the generic epilogue (a ReLU
    on the 2 T F activations the layer keeps); a table without the curve prices it as before. A
    run's recorded torch GELU op reads the same curve."""
    import torch

    spec = get_spec("gpt-tiny")
    fc = next(w for w in layer_works(spec.layer_costs(), spec.seq_len) if w.name == "h0.mlp.fc")
    T, F = spec.seq_len, spec.d_model * spec.mlp_ratio
    assert (fc.activation, fc.activation_elems, fc.out_elems) == ("gelu", T * F, 2 * T * F)
    tab = power_table()
    plain = host_step.layer_seconds(fc, 4, tab)
    tab["gelu"] = [(n, 7 * t) for n, t in tab["eltwise"]]
    m, s = host_step._gemm_shape(fc, 4)
    gemm = (fc.fwd_flops + fc.bwd_flops) * 4 * per_flop(m, s)
    assert plain == pytest.approx(gemm + 2e-9 * (4 * 2 * T * F) ** 0.9)
    assert host_step.layer_seconds(fc, 4, tab) == pytest.approx(gemm + 7 * 2e-9 * (4 * T * F) ** 0.9)
    mlp = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 4))
    rec = record_step(mlp, torch.randn(8, 16))
    assert [x["kind"] for x in rec["layers"]] == ["dense", "gelu", "dense"] and rec["layers"][1]["elems"] == 8 * 64
    got = host_step.recorded_works(rec["layers"], 8, rec["backward_gemm_flops"])
    assert host_step.layer_seconds(got[1], 8, tab) == pytest.approx(7 * 2e-9 * 1024**0.9)  # 512 outputs: the curve's first point


def test_attention_reads_the_batched_matmul_table_and_its_softmax_curve():
    """Attention's score and value products are one small product per sample and head: they read the
    batched-matmul table at (samples x heads x T rows, sqrt(head_dim x T)), not the dense one (one
    GEMM of all those rows: a third of their time in eager torch here), and the scores' epilogue
    (scale, causal mask, softmax) reads its own curve by the heads x T x T scores. A table without
    the two prices them as before (the dense table, a ReLU-like epilogue). A run's recorded torch
    attention records its two products as batched matmuls of the same shapes."""
    import torch

    spec = get_spec("gpt-tiny", seq_len=64, d_model=128, heads=2)  # S = sqrt(64 x 64): on the grid
    T, H, hd = spec.seq_len, spec.heads, spec.head_dim
    works = {w.name: w for w in layer_works(spec.layer_costs(), T)}
    scores, av = works["h0.attn.scores"], works["h0.attn.av"]
    assert (scores.activation, scores.activation_elems) == ("softmax", H * T * T)
    tab = power_table()
    old_scores, old_av = host_step.layer_seconds(scores, 4, tab), host_step.layer_seconds(av, 4, tab)
    tab["bmm"] = [(m, s, s, 5 * C * m**ALPHA * s**BETA) for m in (16, 128) for s in (64, 256)]
    tab["softmax"] = [(n, 9 * t) for n, t in tab["eltwise"]]
    m, s = host_step._gemm_shape(scores, 4)
    assert (m, s) == pytest.approx((4 * H * T, math.sqrt(hd * T)))
    gemm = (scores.fwd_flops + scores.bwd_flops) * 4 * per_flop(m, s, 5)
    assert host_step.layer_seconds(scores, 4, tab) == pytest.approx(gemm + 9 * 2e-9 * (4 * H * T * T) ** 0.9)
    assert old_scores == pytest.approx((scores.fwd_flops + scores.bwd_flops) * 4 * per_flop(m, s)
                                       + 2e-9 * (4 * H * T * T) ** 0.9)
    assert host_step.layer_seconds(av, 4, tab) == pytest.approx(5 * old_av)  # no epilogue: the table alone
    # a user's attention, recorded: q k^T and a v come back as batched products, the softmax as its own op
    q = torch.randn(3, H, 16, 8, requires_grad=True)  # T = 16, head_dim = 8

    class Attn(torch.nn.Module):
        def forward(self, x):
            return (x @ x.transpose(-2, -1)).softmax(-1) @ x

    rec = record_step(Attn(), q)
    mats = [x for x in rec["layers"] if x.get("fwd_flops")]
    assert [x["kind"] for x in mats] == ["bmm", "bmm"]
    assert [(x["m"], x["k"], x["n"]) for x in mats] == [(3 * H * 16, 8, 16), (3 * H * 16, 16, 8)]
    got = [w for w in host_step.recorded_works(rec["layers"], 3, rec["backward_gemm_flops"]) if w.matmul]
    assert got[0].kind == "bmm" and host_step.layer_seconds(got[0], 3, tab) > 4 * host_step.layer_seconds(
        dataclasses.replace(got[0], kind="dense"), 3, tab)


@pytest.mark.parametrize("optimizer, bytes_per_param", [("adam", 28), ("sgd", 12)])
def test_n_devices_take_at_least_what_moving_their_bytes_takes(optimizer, bytes_per_param):
    """Each piece of the step at N devices is its one-device time times the GEMM slowdown, or the
    memory probe's time for the bytes it moves, whichever is more. An optimizer update moves float32
    p and g (read), p (written), and Adam's m and v (read and written): 28 bytes a parameter, SGD's
    12. With a probe this slow only the update is bound by it; without a probe nothing changes."""
    cal = torch_cal(4)
    spec = get_spec("mlp", d_in=256, hidden=1024, d_out=10)
    wl = estimate.workload(spec)
    free = estimate.predict_step(wl, "host-cpu", 4, 64, backend="torch-ddp", calibration=cal, optimizer=optimizer)
    upd = host_step.update_seconds(spec.param_count, cal["layers"]["torch"], optimizer)
    floor = 4 * 2.5 * upd  # the probe's time for the update's bytes: 4x what the slowdown gives it
    cal["collectives"]["gloo"]["4"]["stream"] = [[1e3, floor * 1e3 / (bytes_per_param * spec.param_count)],
                                                 [bytes_per_param * spec.param_count, floor]]
    bound = estimate.predict_step(wl, "host-cpu", 4, 64, backend="torch-ddp", calibration=cal, optimizer=optimizer)
    assert bound.compute_s == pytest.approx(free.compute_s - 2.5 * upd + floor)
    assert bound.step_time_s - free.step_time_s == pytest.approx(floor - 2.5 * upd)
    for w in wl.works:  # the layers stay where the slowdown puts them
        t = host_step.layer_seconds(w, 16, cal["layers"]["torch"]) * 2.5
        assert host_step.contended_seconds([w], 16, cal["layers"]["torch"], None, 2.5,
                                           calibration.host_terms(cal, "torch-ddp", 4).stream_seconds, 0) == pytest.approx(t)


def test_jax_sharded_pays_the_partitioners_cost_per_gradient_byte(monkeypatch):
    """jax-sharded's jit step adds, to its communication, the calibrated cost per gradient byte of
    XLA's partitioned program beyond the reference's bytes, for the run's optimizer; jax-pmap and
    the shard_map step (PODSCALE_JAX_STEP) do not. An N between calibrated counts reads it as a
    leaf's latency: the cores' share (N devices of XLA-CPU) taken out, the rest log-log in N."""
    cal = calibration._empty()
    cal["cores"] = 2
    cal["gemm"] = {"jax": {"fp32": {"device": {"64": 1e9}}}}
    cal["layers"] = {"jax": power_table()}
    tax = {2: {"adam": 2e-9, "sgd": 1e-9}, 8: {"adam": 8e-9, "sgd": 4e-9}}  # the same per device
    for n in (1, 2, 8):
        cal["collectives"].setdefault("xla-cpu", {})[str(n)] = {
            "points": [[1024, 1e-4], [1 << 24, 1e-2]], "alpha": 1e-4, "bw": 1.7e9, "gspmd": tax.get(n, {})}
    for b in ("jax-pmap", "jax-sharded"):
        cal["backends"][b] = {"ref_grad_bytes": 1156, "per_n": {str(n): {"overhead_s": 2e-3, "slowdown": 1.0 * n} for n in (1, 2, 8)}}
    wl = estimate.workload(get_spec("mlp", d_in=256, hidden=1024, d_out=10))
    beyond = wl.grad_bytes - 1156

    def comm(backend: str, n: int, opt: str = "adam") -> float:
        return estimate.predict_step(wl, "host-cpu", n, 16 * n, backend=backend, calibration=cal, optimizer=opt).comm_s

    assert comm("jax-sharded", 2) - comm("jax-pmap", 2) == pytest.approx(2e-9 * beyond)
    assert comm("jax-sharded", 2, "sgd") - comm("jax-pmap", 2, "sgd") == pytest.approx(1e-9 * beyond)
    assert comm("jax-sharded", 4) - comm("jax-pmap", 4) == pytest.approx(4e-9 * beyond)  # 4 x 1e-9 a device
    assert comm("jax-sharded", 1) == comm("jax-pmap", 1) == 0.0  # nothing partitioned
    monkeypatch.setenv("PODSCALE_JAX_STEP", "shard_map")
    assert comm("jax-sharded", 2) == pytest.approx(comm("jax-pmap", 2))


def test_jax_sharded_prices_strided_and_plain_weights_each_at_its_rate():
    """A matmul weight whose fan-in is a multiple of 128 floats pays the strided probe's rate, every
    other gradient byte the plain probe's (less the reference's bytes); a calibration without the
    plain rate (an older one) prices every byte at the one rate it has."""
    cal = calibration._empty()
    cal["cores"] = 2
    cal["gemm"] = {"jax": {"fp32": {"device": {"64": 1e9}}}}
    cal["layers"] = {"jax": power_table()}
    tax = {"adam": 4e-9, "sgd": 2e-9, "adam:plain": 1e-9, "sgd:plain": 5e-10}
    cal["collectives"]["xla-cpu"] = {str(n): {"points": [[1024, 1e-4], [1 << 24, 1e-2]], "alpha": 1e-4, "bw": 1.7e9,
                                              "gspmd": tax if n > 1 else {}} for n in (1, 2)}
    for b in ("jax-pmap", "jax-sharded"):
        cal["backends"][b] = {"ref_grad_bytes": 1156, "per_n": {str(n): {"overhead_s": 2e-3, "slowdown": 1.0 * n} for n in (1, 2)}}

    def extra(spec, opt="adam", c=cal):
        wl = estimate.workload(spec)
        return (estimate.predict_step(wl, "host-cpu", 2, 32, backend="jax-sharded", calibration=c, optimizer=opt).comm_s
                - estimate.predict_step(wl, "host-cpu", 2, 32, backend="jax-pmap", calibration=c, optimizer=opt).comm_s)

    # by hand: mlp 1000-1024-10: w1 (1000, 1024) plain, w2 (1024, 10) strided, biases plain
    w2 = 1024 * 10 * 4
    rest = (1000 * 1024 + 1024 + 10) * 4
    assert extra(get_spec("mlp", d_in=1000, hidden=1024, d_out=10)) == pytest.approx(4e-9 * w2 + 1e-9 * (rest - 1156))
    assert extra(get_spec("mlp", d_in=1000, hidden=1024, d_out=10), "sgd") == pytest.approx(2e-9 * w2 + 5e-10 * (rest - 1156))
    # mlp 1024-1000-10: the big weight is the strided one now, and pays four times as much
    w1 = 1024 * 1000 * 4
    assert extra(get_spec("mlp", d_in=1024, hidden=1000, d_out=10)) == pytest.approx(
        4e-9 * w1 + 1e-9 * ((1000 * 10 + 1000 + 10) * 4 - 1156))
    for e in cal["collectives"]["xla-cpu"].values():
        e["gspmd"] = {k: v for k, v in e["gspmd"].items() if ":" not in k}
    assert extra(get_spec("mlp", d_in=1000, hidden=1024, d_out=10)) == pytest.approx(4e-9 * (w2 + rest - 1156))


def test_torch_xla_pays_what_its_spmd_step_grows_beyond_one_devices_growth():
    """torch-xla's SPMD probe (one weight at two sizes, per optimizer, at each N): the part of its
    step's growth with the weight's bytes that one device's growth, slowed by the N-device
    contention, does not explain is priced per gradient byte beyond the reference's; N = 1 pays
    nothing, and an N between calibrated counts reads it with the cores' share out."""
    cal = calibration._empty()
    cal["cores"] = 2
    cal["gemm"] = {"jax": {"fp32": {"device": {"64": 1e9}}}}
    cal["layers"] = {"torch_xla": power_table()}
    mb = 1 << 20
    probe = {1: {"adam": 1e-3, "sgd": 5e-4}, 2: {"adam": 5e-3, "sgd": 2e-3}, 8: {"adam": 3.2e-2, "sgd": 1.0e-2}}
    slow = {1: 1.0, 2: 2.0, 8: 8.0}
    cal["collectives"]["xla-cpu"] = {str(n): {"points": [[1024, 1e-4], [1 << 24, 1e-2]], "alpha": 1e-4, "bw": 1.7e9}
                                     for n in (2, 8)}
    cal["backends"]["torch-xla"] = {"ref_grad_bytes": 1156, "per_n": {
        str(n): {"overhead_s": 4e-3, "slowdown": slow[n], "spmd": {"bytes": mb, **probe[n]}} for n in (1, 2, 8)}}
    # the excess per byte: (grown at N - slowdown(N) x grown at 1) / bytes
    assert calibration.host_terms(cal, "torch-xla", 2).gspmd == pytest.approx({"adam": 3e-3 / mb, "sgd": 1e-3 / mb})
    assert calibration.host_terms(cal, "torch-xla", 8).gspmd == pytest.approx({"adam": 2.4e-2 / mb, "sgd": 6e-3 / mb})
    assert calibration.host_terms(cal, "torch-xla", 1).gspmd == {}
    # N = 4 from N = 2, 8: per device (÷ N) 1.5e-3 and 3e-3 a MiB for Adam, log-log in N, times 4
    assert calibration.host_terms(cal, "torch-xla", 4).gspmd["adam"] == pytest.approx(4 * math.sqrt(1.5e-3 * 3e-3) / mb)
    wl = estimate.workload(get_spec("mlp", d_in=256, hidden=1024, d_out=10))
    with_tax = estimate.predict_step(wl, "host-cpu", 2, 32, backend="torch-xla", calibration=cal, optimizer="sgd").comm_s
    for n in (1, 2, 8):
        del cal["backends"]["torch-xla"]["per_n"][str(n)]["spmd"]
    without = estimate.predict_step(wl, "host-cpu", 2, 32, backend="torch-xla", calibration=cal, optimizer="sgd").comm_s
    assert with_tax - without == pytest.approx(1e-3 / mb * (wl.grad_bytes - 1156))
