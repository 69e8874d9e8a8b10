"""MFU that cannot lie: the host peak is written only by calibrate, only when its repeats agree;
a run never rewrites it; an MFU above 100% is flagged wherever it is shown."""

from __future__ import annotations

import json

import pytest

from scaling.throughput import host
from tests.conftest import podscale


def test_a_busy_machine_caches_no_peak(tmp_path, monkeypatch):
    monkeypatch.setenv("PODSCALE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(host, "measure_gemm_flops", lambda key, threads, **kw: (1e11, 0.2))  # repeats 20% apart
    with pytest.raises(host.BusyMachine, match="busy"):
        host.measured_host_peaks(write=True)
    assert not (tmp_path / "host_peak.json").exists()
    monkeypatch.setattr(host, "measure_gemm_flops", lambda key, threads, **kw: (1e11, 0.01))
    assert host.measured_host_peaks(write=True) == {"fp32": 1e11, "bf16": 1e11}
    assert json.loads((tmp_path / "host_peak.json").read_text())["peaks"]["fp32"] == 1e11


def test_a_run_never_rewrites_the_peak_and_flags_mfu_above_100(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    peak = cache / "host_peak.json"
    # a peak far too low, as if cached on a busy machine: the run's MFU comes out above 100%
    peak.write_text(json.dumps({"host": host.host_fingerprint(), "peaks": {"fp32": 1e6, "bf16": 1e6}, "measured_at": 0}))
    before = peak.read_bytes(), peak.stat().st_mtime_ns
    p = podscale("run", "--steps", "4", "--untimed-steps", "1", "--model-opt", "d_in=32", "--json", str(tmp_path / "r.json"),
                 env={"PODSCALE_CACHE_DIR": str(cache), "COLUMNS": "120"})
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["mfu"] > 1 and "above 100% of peak" in r["mfu_flag"]
    assert "(above peak!)" in p.stdout and "MFU: above 100% of peak" in p.stdout
    assert (peak.read_bytes(), peak.stat().st_mtime_ns) == before


def test_bf16_on_a_cpu_without_it_says_so(tmp_path):
    r_path = tmp_path / "r.json"
    podscale("run", "--steps", "3", "--untimed-steps", "1", "--model-opt", "d_in=32", "--dtype", "bfloat16",
             "--json", str(r_path), "--quiet")
    r = json.loads(r_path.read_text())
    assert r["peak_dtype"] == "bf16"
    if host.native_bf16():
        assert r["peak_note"] and "emulated" not in r["peak_note"]
    else:
        assert "no native bf16" in r["peak_note"] and "emulated" in r["peak_note"]
