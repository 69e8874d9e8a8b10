"""The predictor: collective closed forms, efficiency invariants, published scaling results from
the catalog alone (one rule for eta and overlap), host-cpu composition from a calibration, and
one-line errors for bad input."""

from __future__ import annotations

import json
import math

import pytest

from launchers import cli
from scaling.throughput import calibration, collectives, estimate, host
from scaling.config import RunConfig
from scaling.errors import UsageError

MB = 1 << 20


def test_ring_closed_form():
    a, bw, B = 5e-6, 10e9, 100 * MB
    for n in (2, 3, 8, 64):
        assert collectives.ring_allreduce_bytes(B, n) == pytest.approx(2 * (n - 1) / n * B)
        assert collectives.ring_allreduce_time(B, n, a, bw) == pytest.approx(2 * (n - 1) * a + 2 * (n - 1) / n * B / bw)
    assert collectives.ring_allreduce_time(B, 1, a, bw) == 0 and collectives.ring_allreduce_bytes(B, 1) == 0
    # bandwidth term tends to 2 x bytes / bw as N grows
    assert collectives.ring_allreduce_time(B, 10_000, 0.0, bw) == pytest.approx(2 * B / bw, rel=1e-3)


def test_tree_and_hierarchical():
    a, bw = 5e-6, 10e9
    assert collectives.tree_allreduce_time(MB, 8, a, bw) == pytest.approx(2 * 3 * a + 2 * MB / bw)
    intra, inter = (2e-6, 100e9), (10e-6, 5e9)
    for n in (2, 4, 8):  # one node: exactly the ring
        assert collectives.hierarchical_allreduce_time(MB, n, 8, intra, inter) == pytest.approx(collectives.ring_allreduce_time(MB, n, *intra))
    # one device per node: exactly the ring across nodes
    assert collectives.hierarchical_allreduce_time(MB, 16, 1, intra, inter) == pytest.approx(collectives.ring_allreduce_time(MB, 16, *inter))
    t = collectives.hierarchical_allreduce_time(MB, 32, 8, intra, inter)
    assert t == pytest.approx(collectives.ring_allreduce_time(MB, 8, *intra) + collectives.ring_allreduce_time(MB, 4, *inter))


@pytest.mark.parametrize("model,hw_id,n", [("resnet50", "dgx-1", 8), ("resnet-50", "goyal-2017-cluster", 256),
                                           ("gpt-tiny", "tpu-v3-pod", 2048), ("vgg16", "h100-sxm", 64)])
def test_efficiency_one_at_n1_and_weak_monotone(model, hw_id, n):
    rows = estimate.predict(model, hw_id, n, per_device_batch=32)
    assert rows[0].devices == 1 and rows[0].efficiency == pytest.approx(1.0)
    effs = [r.efficiency for r in rows]
    assert all(b <= a + 1e-12 for a, b in zip(effs, effs[1:])), effs
    assert [r.devices for r in rows] == estimate.device_counts(n)
    for r in rows:
        assert r.samples_per_s == pytest.approx(r.global_batch / r.step_time_s)
        assert r.mfu == pytest.approx(r.achieved_flops / r.peak_flops)
    strong = estimate.predict(model, hw_id, n, global_batch=32 * n, scaling="strong")
    assert strong[0].efficiency == pytest.approx(1.0) and all(0 < r.efficiency <= 1 + 1e-9 for r in strong)


def test_model_names_v1_and_v1_5():
    # one naming: unsuffixed ResNets are v1.5 (torchvision, NVIDIA's "ResNet-50 v1.5"); -v1 is He et al.'s
    assert estimate.workload("resnet-50").train_flops_per_sample == estimate.workload("resnet50").train_flops_per_sample
    v1, v15 = estimate.workload("resnet50-v1"), estimate.workload("resnet50")
    assert v1.params == v15.params and v1.train_flops_per_sample < v15.train_flops_per_sample
    assert v1.train_flops_per_sample / 6 == pytest.approx(3.86e9, rel=0.02)  # He et al. 2016 Table 1: 3.8 x 10^9
    assert v15.train_flops_per_sample / 6 == pytest.approx(4.1e9, rel=0.02)  # torchvision: 4.1 GMACs
    assert estimate.workload("resnet101-v1").train_flops_per_sample / 6 == pytest.approx(7.6e9, rel=0.02)  # He et al.: 7.6
    assert estimate.workload("vgg-16").params == pytest.approx(138.4e6, rel=0.01)


def test_overlap_rule_hides_at_most_half_and_never_more_than_backward():
    est = estimate.predict_step("vgg16", "horovod-2017-cluster", 512, 512)  # 1 sample/GPU: comm-bound
    assert est.comm_s >= 0.5 * est.allreduce_s - 1e-12
    assert est.comm_s >= est.allreduce_s - est.compute_s - 1e-12
    assert est.step_time_s == pytest.approx(est.compute_s + est.comm_s + est.overhead_s)


def test_tpu_fp32_run_is_measured_against_bf16():
    est = estimate.predict_step("resnet50", "tpu-v3-board", 8, 1024, dtype="float32")
    assert est.peak_dtype == "bf16" and est.peak_flops == pytest.approx(8 * 61.6e12)
    assert any("bf16" in n for n in est.notes)


def _fake_cal() -> dict:
    rates = {"32": 1e9, "512": 8e9}
    coll = {str(n): {"points": [[1024, 1e-4 * n], [1 << 20, 1e-4 * n + 1e-3 * n]], "alpha": 1e-4 * n, "bw": 1e9, "slowdown": max(1, n / 2)}
            for n in (1, 2, 8)}
    return {"version": calibration.VERSION, "host": host.host_fingerprint(), "cores": 2,
            "gemm": {"torch": {"framework_version": "x", "fp32": {"1": rates}}},
            "collectives": {"gloo": coll},
            "backends": {"torch-ddp": {"ref_grad_bytes": 1024, "per_n": {
                str(n): {"overhead_s": 1e-3 * n, "slowdown": max(1, n / 2)} for n in (1, 2, 8)}}}}


def test_host_prediction_composes_calibrated_terms(tmp_path, monkeypatch):
    # an empty cache: a host peak measured by an earlier test would otherwise win over the fake calibration
    monkeypatch.setenv("PODSCALE_CACHE_DIR", str(tmp_path))
    cal = _fake_cal()
    wl = estimate.Workload("w", 1000, 3 * 2 * 512**3, 1 << 20, (3 * 2 * 512**3,))
    e1 = estimate.predict_step(wl, "host-cpu", 1, 1, calibration=cal)
    assert e1.compute_s == pytest.approx(3 * 2 * 512**3 / 8e9)  # one 512^3 GEMM per pass, at the 512 rate
    assert e1.step_time_s == pytest.approx(1e-3 + e1.compute_s)  # one device: no all-reduce, whatever N=1's curve says
    e8 = estimate.predict_step(wl, "host-cpu", 8, 8, calibration=cal)
    comm = (8e-4 + 8e-3) - 8e-4  # the curve at the grads' bytes minus at the reference model's
    assert e8.step_time_s == pytest.approx(8e-3 + e1.compute_s * 4 + comm)
    assert e8.peak_flops == e1.peak_flops == 8e9  # emulated devices share the host's one peak (its best GEMM rate)
    e4 = estimate.predict_step(wl, "host-cpu", 4, 4, calibration=cal)  # between calibrated N: log interpolation
    assert e4.overhead_s == pytest.approx(4e-3) and e1.step_time_s < e4.step_time_s < e8.step_time_s
    with pytest.raises(UsageError, match="jax-pmap"):
        estimate.predict_step(wl, "host-cpu", 2, 2, backend="jax-pmap", calibration=cal)


def test_predict_run_never_raises(tmp_path, monkeypatch):
    monkeypatch.setenv("PODSCALE_CACHE_DIR", str(tmp_path))
    cfg = RunConfig(devices=2, global_batch=8)
    assert estimate.predict_run(cfg, "host-cpu") is None  # no calibration: no guess, and no implicit calibration
    assert not (tmp_path / calibration.FILE_NAME).exists()
    assert estimate.predict_run(cfg, "no-such-chip") is None
    assert estimate.predict_run(cfg, "h100-sxm") == pytest.approx(estimate.predict_step("mlp", "h100-sxm", 2, 8).step_time_s)
    cal = _fake_cal()
    cal["gemm"]["torch"]["framework_version"] = calibration.framework_version("torch")
    cal["backends"]["torch-ddp"]["framework_version"] = calibration.framework_version("torch")
    calibration.save(cal)
    assert estimate.predict_run(cfg, "host-cpu") == pytest.approx(estimate.predict_step("mlp", "host-cpu", 2, 8, calibration=cal).step_time_s)


def test_bad_input_exits_2_with_one_line(capsys):
    cases = [
        (["--hardware", "h100", "--devices", "8", "--global-batch", "256"], "closest: h100-sxm"),
        (["--hardware", "tpu-v3-pod", "--devices", "4096", "--global-batch", "4096"], "2048"),
        (["--hardware", "h100-sxm", "--devices", "0", "--global-batch", "256"], "--devices 0"),
        (["--hardware", "h100-sxm", "--devices", "-2", "--global-batch", "256"], "--devices -2"),
        (["--hardware", "h100-sxm", "--devices", "8", "--global-batch", "0"], "--global-batch 0"),
        (["--hardware", "h100-sxm", "--devices", "8", "--global-batch", "-64"], "--global-batch -64"),
    ]
    for args, needle in cases:
        assert cli.main(["predict", "--model", "resnet50", *args]) == 2, args
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, (args, err)
    with pytest.raises(UsageError, match="unknown model"):
        estimate.predict_step("resnet-5000", "h100-sxm", 1, 1)


def test_cli_predict_json_and_png(tmp_path, capsys):
    assert cli.main(["predict", "--model", "resnet50", "--hardware", "tpu-v3-pod", "--devices", "2048",
                     "--global-batch", "65536", "--json", "--out", str(tmp_path)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["devices"] for r in rows] == [2**k for k in range(12)]
    assert all(r["per_device_batch"] == 32 for r in rows) and rows[-1]["peak_dtype"] == "bf16"
    assert math.isclose(rows[0]["efficiency"], 1.0) and rows[-1]["efficiency"] < 1
    assert (tmp_path / "predict.png").read_bytes()[:4] == b"\x89PNG"


def test_host_predict_table_shows_the_overhead_so_its_columns_add_up(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PODSCALE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("COLUMNS", "200")
    cal = _fake_cal()
    cal["gemm"]["torch"]["framework_version"] = calibration.framework_version("torch")
    cal["backends"]["torch-ddp"]["framework_version"] = calibration.framework_version("torch")
    calibration.save(cal)
    args = ["predict", "--model", "mlp", "--hardware", "host-cpu", "--devices", "8", "--global-batch", "64"]
    assert cli.main([*args, "--wide"]) == 0
    header = next(line for line in capsys.readouterr().out.splitlines() if "step time" in line)
    assert "overhead" in header and "compute" in header and "comm (exposed)" in header
    assert cli.main([*args, "--json"]) == 0
    for r in json.loads(capsys.readouterr().out):
        assert r["overhead_s"] > 0
        assert r["step_time_s"] == pytest.approx(r["overhead_s"] + r["compute_s"] + r["comm_s"])
