"""Calibration: the alpha-beta fit, the file's keying and atomic merge, and a real (tiny) measurement
of gloo and XLA-CPU on this host that `run` then uses for predicted_step_time_s."""

from __future__ import annotations

import json

import pytest

from launchers import cli
from scaling.world import run_local
from scaling.throughput import calibration, estimate, host, measure
from scaling.config import RunConfig
from scaling.run import finish


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PODSCALE_CACHE_DIR", str(tmp_path))
    return tmp_path


def test_fit_recovers_alpha_and_bandwidth():
    alpha, bw = 3e-5, 2e9
    pts = [(b, alpha + b / bw) for b in (1 << 10, 1 << 16, 1 << 20, 1 << 24)]
    a, w = calibration.fit_alpha_beta(pts)
    assert a == pytest.approx(alpha, rel=1e-6) and w == pytest.approx(bw, rel=1e-6)
    terms = calibration.HostTerms(0, 1, tuple(pts), a, w, 1024, ((2.0, 1e9),), False)
    assert terms.allreduce(1 << 18) == pytest.approx(alpha + (1 << 18) / bw)  # between points: on the line
    assert terms.allreduce(1 << 26) == pytest.approx(alpha + (1 << 26) / bw)  # beyond: the fit's slope


def test_curve_is_made_monotone():
    pts = [(1024, 6e-3), (16384, 5e-4), (1 << 20, 8e-4), (1 << 22, 5e-3)]
    assert calibration.monotone(pts) == [(1024, 5e-4), (16384, 5e-4), (1 << 20, 8e-4), (1 << 22, 5e-3)]


def test_file_is_keyed_by_host_and_versions(cache):
    data = calibration._empty()
    data["backends"]["torch-ddp"] = {"framework_version": calibration.framework_version("torch"), "per_n": {"1": {}}}
    data["backends"]["jax-pmap"] = {"framework_version": "0.0.1-stale", "per_n": {"1": {}}}
    p = calibration.save(data)
    assert p.parent == cache and not list(cache.glob(".*tmp"))
    loaded = calibration.load()
    assert "torch-ddp" in loaded["backends"] and "jax-pmap" not in loaded["backends"]  # stale version dropped
    data["host"] = "another machine x64"
    calibration.save(data)
    assert calibration.load() is None


def test_bad_calibrate_input_exits_2(cache, capsys):
    assert cli.main(["calibrate", "--backends", "torch-ddp", "--devices", "0,2"]) == 2
    assert cli.main(["calibrate", "--backends", "torch-xla"]) == 2
    assert cli.main(["calibrate", "--devices", "two"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and "0,2" in err[0] and "torch-xla" in err[1] and "two" in err[2]


def test_real_gloo_calibration_feeds_runs(cache):
    data = measure.calibrate(["torch-ddp"], [2], measure.TINY)
    on_disk = json.loads((cache / calibration.FILE_NAME).read_text())
    assert on_disk["host"] == host.host_fingerprint() and set(on_disk["backends"]["torch-ddp"]["per_n"]) == {"2"}
    for n in ("2",):
        e = data["backends"]["torch-ddp"]["per_n"][n]
        c = data["collectives"]["gloo"][n]
        assert 0 < e["overhead_s"] < 1 and e["slowdown"] >= 1 and len(c["points"]) == len(measure.TINY.messages)
        assert all(t > 0 for _, t in c["points"])
    assert set(data["gemm"]["torch"]["fp32"]) == {str(t) for t in range(1, host.host_cores() + 1)}
    # ensure() finds nothing missing: no second measurement
    assert measure.ensure(["torch-ddp"], [2])["measured_at"] == data["measured_at"]
    cfg = RunConfig(devices=2, global_batch=16, steps=6, untimed_steps=2)
    result = finish(cfg, run_local(cfg))
    assert result["predicted_step_time_s"] == pytest.approx(estimate.predict_run(cfg, "host-cpu"))
    assert result["prediction_error"] == pytest.approx(result["predicted_step_time_s"] / result["step_time_s"] - 1)
    est = estimate.predict_step("mlp", "host-cpu", 2, 16, backend="torch-ddp")
    assert est.overhead_s == data["backends"]["torch-ddp"]["per_n"]["2"]["overhead_s"] and est.compute_s > 0


def test_real_xla_cpu_collectives():
    m = measure.measure_xla(2, measure.TINY, gemm_table=True)
    assert [p[0] for p in m["points"]] == list(measure.TINY.messages) and all(p[1] > 0 for p in m["points"])
    assert m["slowdown"] >= 1 and 0 < m["ref_step_s"] < 1
    assert set(m["gemm"]["fp32"]["device"]) == {str(s) for s in measure.TINY.gemm}
