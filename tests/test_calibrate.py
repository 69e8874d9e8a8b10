"""Calibration: the alpha-beta fit, the file's keying and atomic merge, and a real (tiny) measurement
of gloo and XLA-CPU on this host that `run` then uses for predicted_step_time_s."""

from __future__ import annotations

import functools
import json
import math

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


def _synthetic(backend: str, family: str, cores: int, slowdown, overhead, curve) -> dict:
    """A calibration at the given N of made-up terms whose rules are known in closed form."""
    data = calibration._empty()
    data["cores"] = cores
    data["gemm"] = {calibration.gemm_source(backend): {"fp32": {"1": {"64": 1e9}, "device": {"64": 1e9}}}}
    data["backends"][backend] = {"ref_grad_bytes": 1024, "per_n": {
        str(n): {"overhead_s": overhead(n), "slowdown": slowdown(n)} for n in curve}}
    data["collectives"][family] = {str(n): {"points": [[b, t] for b, t in pts], "alpha": pts[0][1], "bw": 1e9}
                                   for n, pts in curve.items()}
    return data


@pytest.mark.parametrize("backend, family", [("torch-ddp", "gloo"), ("jax-sharded", "xla-cpu")])
def test_an_uncalibrated_n_takes_the_cores_out_before_interpolating(backend, family):
    """N devices on C cores: the contention the cores explain is exact at every N (gloo ranks share
    C cores from N > C on; XLA-CPU devices split one process's cores N ways), so a slowdown that is
    exactly that comes back exactly at N the calibration never ran, inside and beyond its range,
    where plain log-log interpolation of 1.0 (N=1) and 2.0 (N=4) would give 1.41 at N=2."""
    cores = 2
    ideal = (lambda n: max(1.0, n / cores)) if family == "gloo" else (lambda n: float(n))
    curve = {1: [(1024, 1e-6), (1 << 20, 1e-6)], 4: [(1024, 4e-4), (1 << 20, 3e-3)], 8: [(1024, 8e-4), (1 << 20, 7e-3)]}
    hops = lambda n: 2 * (n - 1)  # noqa: E731 - a ring all-reduce's sequential steps
    if family == "gloo":  # one rank's step + a ring of 2(N-1) hops, each 2e-4 N^0.5 s, stretched N/C past the cores
        overhead = lambda n: 1e-3 + 2e-4 * n**0.5 * hops(n) * ideal(n)  # noqa: E731
    else:  # one process's N devices: a power law of N on top of the cores' share
        overhead = lambda n: 1e-3 * n**0.5 * ideal(n)  # noqa: E731
    cal = _synthetic(backend, family, cores, ideal, overhead, curve)
    sub = calibration.restricted(cal, [1, 8])  # as `podscale calibrate --devices 1,8` would write it
    assert sorted(sub["backends"][backend]["per_n"]) == sorted(sub["collectives"][family]) == ["1", "8"]
    assert calibration.host_terms(sub, backend, 4).slowdown == pytest.approx(ideal(4))
    # across N = C for gloo: from one multi-rank count, its per-hop cost is all there is to go on
    o4 = 1e-3 + 2e-4 * 8**0.5 * hops(4) * ideal(4) if family == "gloo" else overhead(4)
    assert calibration.host_terms(sub, backend, 4).overhead == pytest.approx(o4)
    if family == "gloo":  # from N = 1, 2 alone: linear in the one-to-two jump, not its square (log-log of the step)
        two = _synthetic(backend, family, cores, ideal, overhead, {1: curve[1], 2: curve[4]})
        assert calibration.host_terms(two, backend, 4).overhead == pytest.approx(1e-3 + (overhead(2) - 1e-3) * 3 * 2)
    for n in (2, 16):
        t = calibration.host_terms(cal, backend, n)
        assert t.interpolated and t.slowdown == pytest.approx(ideal(n))
        assert t.overhead == pytest.approx(overhead(n))  # the cores' share out, a power law of N is a line in log-log
    # the curve: between the multi-device counts only (N=1's "all-reduce" moves nothing)
    t6 = calibration.host_terms(cal, backend, 6)
    w = (math.log(6) - math.log(4)) / (math.log(8) - math.log(4))
    assert t6.allreduce(1 << 20) == pytest.approx(math.exp(math.log(3e-3) + w * (math.log(7e-3) - math.log(3e-3))))
    # one multi-device curve to go on: scaled by the ring's 2(N-1)/N bytes per device
    one = _synthetic(backend, family, cores, ideal, lambda n: 1e-3, {1: curve[1], 4: curve[4]})
    t2 = calibration.host_terms(one, backend, 2)
    assert t2.allreduce(1 << 20) == pytest.approx(3e-3 * (1 / 2) / (3 / 4))
    # calibrated at N = 1 too, but no backend runs a collective on one device
    assert calibration.host_terms(one, backend, 1).allreduce(1 << 20) == 0.0


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


def test_a_layer_table_measured_another_way_is_measured_again(cache):
    """A changed measurement (jax's update: its own program, no longer a fused chain) reaches
    calibrations written before it: their table is dropped on load, so `calibrate` and the
    sweep's ensure() measure it again; a table of the current method stays."""
    from scaling.throughput import layer_rates

    data = calibration._empty()
    tab = {"dense": [[16, 64, 64, 1e-5]], "eltwise": [[1024, 1e-6]]}
    data["layers"] = {"jax": {"framework_version": calibration.framework_version("jax"), **tab},
                      "torch": {"framework_version": calibration.framework_version("torch"),
                                "method": layer_rates.METHOD["torch"], **tab}}
    calibration.save(data)
    assert sorted(calibration.load()["layers"]) == ["torch"]  # jax's, of no method named: the first
    data["layers"]["jax"]["method"] = layer_rates.METHOD["jax"]
    calibration.save(data)
    assert sorted(calibration.load()["layers"]) == ["jax", "torch"]


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
        # the memory probe: 20 bytes an element (p, m, g read; p, m written) at each of its sizes
        assert [b for b, _ in c["stream"]] == [20 * e for e in measure.TINY.stream] and all(t > 0 for _, t in c["stream"])
    assert set(data["gemm"]["torch"]["fp32"]) == {str(t) for t in range(1, host.host_cores() + 1)}
    # ensure() finds nothing missing: no second measurement
    assert measure.ensure(["torch-ddp"], [2])["measured_at"] == data["measured_at"]
    cfg = RunConfig(devices=2, global_batch=16, steps=6, untimed_steps=2, probe_steps=2)
    result = finish(cfg, run_local(cfg))
    assert result["predicted_step_time_s"] == pytest.approx(estimate.predict_run(cfg, "host-cpu"))
    assert result["prediction_error"] == pytest.approx(result["predicted_step_time_s"] / result["step_time_s"] - 1)
    est = estimate.predict_step("mlp", "host-cpu", 2, 16, backend="torch-ddp")
    ref = data["backends"]["torch-ddp"]["per_n"]["2"]  # the reference's step less its data part, now priced apart
    assert est.overhead_s == pytest.approx(ref["overhead_s"] - ref["data_s"]) and est.compute_s > 0 and est.data_s > 0
    # the layer table was measured with it, and the prediction is composed from it
    assert calibration.host_terms(data, "torch-ddp", 2).layers == data["layers"]["torch"]
    assert {"dense", "conv", "eltwise", "adam"} <= set(data["layers"]["torch"])
    # and gloo's gradient bytes are priced from the wide reference's real step
    e2 = data["backends"]["torch-ddp"]["per_n"]["2"]
    assert e2["wide_grad_bytes"] == calibration.ref_grad_bytes(calibration.WIDE_REF_OPTS) > 1_000_000
    assert 0 < e2["wide_step_s"] < 1
    _gloo_bytes_are_priced_by_the_wide_reference(data)
    # the data reference: its probe's data part is measured, and a batch's bytes are priced by it
    assert e2["data_wide_bytes"] == calibration.DATA_REF_BATCH * 4 * (4096 + 1) > 1_000_000
    assert e2["data_bytes"] == 4 * (16 + 1) and 0 < e2["data_s"] < 1
    assert 0 < e2["data_wide_s"] < 1
    _batch_bytes_are_priced_by_the_data_reference(data)
    # and a run's predicted breakdown holds the data part beside the measured one
    assert result["breakdown"]["predicted"]["data_s"] == pytest.approx(estimate.predict_step(
        "mlp", "host-cpu", 2, 16, backend="torch-ddp", calibration=data).data_s)
    assert result["breakdown"]["measured"]["data_s"] >= 0


def _batch_bytes_are_priced_by_the_data_reference(data: dict) -> None:
    """The data term on a real calibration's entries: the reference's own data part moves from the
    overhead to data (the step keeps it once), each byte beyond the reference's costs the data
    reference's extra time over its extra bytes, and N between calibrated counts gets their
    geometric mean; a calibration without the data reference prices no data, as before."""
    import copy

    from models.spec import get_spec

    wl = estimate.workload(get_spec("mlp"))  # 1000 inputs, 10 targets: 4040 bytes a sample
    assert wl.sample_bytes == 4 * (1000 + 10)
    base = copy.deepcopy(data)
    e2 = base["backends"]["torch-ddp"]["per_n"]["2"]
    e2.update(data_s=1e-4, data_wide_s=1e-4 + 1e-3)  # 1 ms more for the data reference's extra bytes
    per_byte = 1e-3 / (e2["data_wide_bytes"] - e2["data_bytes"])

    def est(cal: dict, n: int, per_dev: int = 16) -> estimate.Estimate:
        return estimate.predict_step(wl, "host-cpu", n, per_dev * n, backend="torch-ddp", calibration=cal)

    e = est(base, 2)
    assert e.data_s == pytest.approx(1e-4 + per_byte * (16 * wl.sample_bytes - e2["data_bytes"]))
    assert e.overhead_s == pytest.approx(e2["overhead_s"] - 1e-4)
    assert e.step_time_s == pytest.approx(e.overhead_s + e.data_s + e.compute_s + e.comm_s)
    assert est(base, 2, 32).data_s - e.data_s == pytest.approx(per_byte * 16 * wl.sample_bytes)
    # N = 8 at 8x N = 2's rate: with the cores' share out (N / C ranks a core), N = 4 lies half way
    # in log N between their rates a core; beyond the counts the nearest one's holds (N = 16)
    c = functools.partial(calibration.contention, "gloo", cores=base["cores"])
    base["backends"]["torch-ddp"]["per_n"]["8"] = dict(e2, data_wide_s=1e-4 + 8e-3)
    base["collectives"]["gloo"]["8"] = copy.deepcopy(base["collectives"]["gloo"]["2"])
    extra = 16 * wl.sample_bytes - e2["data_bytes"]
    r2, r8 = per_byte / c(2), 8 * per_byte / c(8)
    ref4 = c(4) * math.sqrt(1e-4 / c(2) * 1e-4 / c(8))  # the reference's own data part, by the same rule
    assert est(base, 4).data_s == pytest.approx(ref4 + c(4) * math.sqrt(r2 * r8) * extra)
    assert est(base, 16).data_s == pytest.approx(1e-4 / c(8) * c(16) + c(16) * r8 * extra)
    # a rate of zero at N = 1 (two noisy probes alike) does not blow up N = 4 beyond N = 1, 2
    base["backends"]["torch-ddp"]["per_n"]["1"] = dict(e2, data_wide_s=e2["data_s"])
    del base["backends"]["torch-ddp"]["per_n"]["8"]
    assert est(base, 4).data_s == pytest.approx(1e-4 / c(2) * c(4) + c(4) * r2 * extra)
    for entry in base["backends"]["torch-ddp"]["per_n"].values():
        entry.pop("data_wide_s")
    old = est(base, 2)
    assert old.data_s == 0 and old.overhead_s == e2["overhead_s"]


def _gloo_bytes_are_priced_by_the_wide_reference(data: dict) -> None:
    """The rule on a real calibration's terms: what a gradient byte beyond the reference's costs is
    linear in the wide reference's step (its own layers and update, whatever they are, drop out of
    a difference), log-log in N between calibrated counts, and the all-reduce probe's without it."""
    import copy

    from models.spec import get_spec

    wl = estimate.workload(get_spec("mlp"))
    extra_bytes = wl.grad_bytes - calibration.ref_grad_bytes()
    wide_extra = calibration.ref_grad_bytes(calibration.WIDE_REF_OPTS) - calibration.ref_grad_bytes()

    def comm(cal: dict, n: int) -> float:
        return estimate.predict_step(wl, "host-cpu", n, 16 * n, backend="torch-ddp", calibration=cal).comm_s

    base = copy.deepcopy(data)
    e2 = base["backends"]["torch-ddp"]["per_n"]["2"]
    e2["wide_step_s"] = e2["overhead_s"] + 0.05  # large enough that the byte's cost is positive
    more = copy.deepcopy(base)
    more["backends"]["torch-ddp"]["per_n"]["2"]["wide_step_s"] += 0.01
    assert comm(more, 2) - comm(base, 2) == pytest.approx(0.01 * extra_bytes / wide_extra)
    r2 = comm(base, 2) / extra_bytes
    # N = 8 as N = 2 but 30 ms more in the wide step (its own layers there are slowed by 8 ranks on
    # the cores): N = 4 lies half way in log N, so its rate is the geometric mean of theirs
    base["backends"]["torch-ddp"]["per_n"]["8"] = dict(e2, wide_step_s=e2["wide_step_s"] + 0.03)
    base["collectives"]["gloo"]["8"] = copy.deepcopy(base["collectives"]["gloo"]["2"])
    r8 = comm(base, 8) / extra_bytes
    assert r8 > r2
    assert comm(base, 4) == pytest.approx(math.sqrt(r2 * r8) * extra_bytes)
    # a calibration from before the wide reference: the all-reduce probe prices the bytes
    for e in base["backends"]["torch-ddp"]["per_n"].values():
        e.pop("wide_step_s", None)
    t = calibration.host_terms(base, "torch-ddp", 2)
    assert comm(base, 2) == pytest.approx(max(0.0, t.allreduce(wl.grad_bytes) - t.allreduce(t.ref_bytes)))


def test_real_xla_cpu_collectives():
    m = measure.measure_xla(2, measure.TINY, gemm_table=True)
    assert [p[0] for p in m["points"]] == list(measure.TINY.messages) and all(p[1] > 0 for p in m["points"])
    assert m["slowdown"] >= 1 and 0 < m["ref_step_s"] < 1
    assert set(m["gemm"]["fp32"]["device"]) == {str(s) for s in measure.TINY.gemm}
    assert [b for b, _ in m["stream"]] == [20 * e for e in measure.TINY.stream] and all(t > 0 for _, t in m["stream"])
    assert m["stream_passes"] == measure.STREAM_PASSES
    assert m["leaf_s"] > 0  # two devices: sixteen small leaves take longer than one array of their bytes
    # jax-sharded's partitioner cost per gradient byte, per optimizer, for strided and plain weights
    assert set(m["gspmd"]) == {"adam", "sgd", "adam:plain", "sgd:plain"} and all(v >= 0 for v in m["gspmd"].values())


@pytest.mark.parametrize("backend, family", [("torch-ddp", "gloo"), ("jax-sharded", "xla-cpu")])
def test_the_memory_probe_at_an_uncalibrated_n(backend, family):
    """The memory probe's seconds, size by size, as the slowdown is: the cores' share out, the rest
    log-log in N over the multi-device counts (one device has no floor: its layer table is what it
    measured alone); more bytes never take less time; beyond the largest size, proportional."""
    cores = 2
    ideal = (lambda n: max(1.0, n / cores)) if family == "gloo" else (lambda n: float(n))
    curve = {n: [(1024, 1e-4 * n), (1 << 20, 3e-3 * n)] for n in (1, 2, 8)}
    cal = _synthetic(backend, family, cores, ideal, lambda n: 1e-3, curve)
    probe = {1: [(1e6, 1e-4), (1e8, 1e-2)], 2: [(1e6, 4e-4), (1e8, 3e-2)], 8: [(1e6, 4e-3), (1e8, 0.6)]}
    for n, pts in probe.items():
        cal["collectives"][family][str(n)]["stream"] = [list(p) for p in pts]
    assert calibration.host_terms(cal, backend, 1).stream_seconds(1e8) == 0.0
    t8 = calibration.host_terms(cal, backend, 8)
    assert t8.stream_seconds(1e8) == pytest.approx(0.6) and t8.stream_seconds(4e8) == pytest.approx(2.4)
    assert t8.stream_seconds(1e7) == pytest.approx(math.sqrt(4e-3 * 0.6))  # log-log halfway
    for n in (4, 16):
        t = calibration.host_terms(cal, backend, n)
        for i, (b, _) in enumerate(probe[2]):
            per = [probe[m][i][1] / ideal(m) for m in (2, 8)]
            want = ideal(n) * math.exp(math.log(per[0]) + (math.log(n) - math.log(2)) / (math.log(8) - math.log(2))
                                       * (math.log(per[1]) - math.log(per[0])))
            assert t.stream_seconds(b) == pytest.approx(want)
    # one multi-device count to go on (`calibrate --devices 1,2`): the cores' share carries it to N
    two = calibration.host_terms(calibration.restricted(cal, [1, 2]), backend, 4)
    assert [two.stream_seconds(b) for b, _ in probe[2]] == pytest.approx([t * ideal(4) / ideal(2) for _, t in probe[2]])
    cal["collectives"][family]["8"]["stream"] = [[1e6, 0.7], [1e8, 0.6]]  # a hiccup at the small size
    assert calibration.host_terms(cal, backend, 8).stream_seconds(1e6) == pytest.approx(0.6)


def test_each_gradient_tensor_pays_the_collectives_latency(cache):
    """XLA-CPU reduces a pytree's leaves one after another (one HLO all-reduce, operand by operand),
    so a model's all-reduce is the curve at its gradient bytes plus the per-leaf cost of each tensor
    beyond the reference model's four (its overhead holds those); log-log in N between the
    calibrated counts; a workload that does not know its tensors is one message, as gloo's buckets are."""
    from models.spec import get_spec

    curve = {1: [(1024, 1e-6), (1 << 24, 1e-6)], 2: [(1024, 1e-4), (1 << 24, 1e-2)], 8: [(1024, 4e-4), (1 << 24, 4e-2)]}
    cal = _synthetic("jax-pmap", "xla-cpu", 2, float, lambda n: 1e-3, curve)
    cal["collectives"]["xla-cpu"]["2"]["leaf_s"] = 1e-5
    cal["collectives"]["xla-cpu"]["8"]["leaf_s"] = 1.6e-4
    assert calibration.host_terms(cal, "jax-pmap", 4).leaf_s == pytest.approx(4e-5)  # 1e-5 x (4/2)^2
    # from N = 2 alone: the cores' share (XLA-CPU devices split the cores N ways)
    assert calibration.host_terms(calibration.restricted(cal, [1, 2]), "jax-pmap", 4).leaf_s == pytest.approx(2e-5)
    assert calibration.host_terms(cal, "jax-pmap", 1).leaf_s == 0.0

    def line(b: float) -> float:  # N = 8's measured curve, linear between its points
        return 4e-4 + (b - 1024) * (4e-2 - 4e-4) / ((1 << 24) - 1024)

    cnn = get_spec("resnet18", small=True, image_size=16, width=16, num_classes=10)
    wl = estimate.workload(cnn)
    assert wl.leaves == len(cnn.param_shapes()) > 40
    est = estimate.predict_step(wl, "host-cpu", 8, 128, backend="jax-pmap", calibration=cal)
    assert est.comm_s == pytest.approx(line(cnn.grad_bytes()) - line(1024) + 1.6e-4 * (wl.leaves - 4))
    mlp = estimate.workload(get_spec("mlp", hidden=64))  # four tensors, as the reference has
    assert estimate.predict_step(mlp, "host-cpu", 8, 128, backend="jax-pmap", calibration=cal).comm_s == pytest.approx(
        line(mlp.grad_bytes) - line(1024))
    unknown = estimate.Workload("script", wl.params, wl.train_flops_per_sample, wl.grad_bytes, wl.layer_flops)
    assert estimate.predict_step(unknown, "host-cpu", 8, 128, backend="jax-pmap", calibration=cal).comm_s == pytest.approx(
        line(cnn.grad_bytes()) - line(1024))


def test_an_xla_entry_from_an_older_probe_is_measured_again():
    """What ``ensure`` re-measures: an XLA-CPU entry whose memory probe made one pass (the first
    pass's timings ran 1.3-2.4x the later ones'), or whose partitioner probe lacks the plain weight."""
    full = {"stream": [[1e6, 1e-4]], "leaf_s": 1e-5, "gspmd": {"adam": 1e-9, "adam:plain": 1e-10},
            "stream_passes": measure.STREAM_PASSES}
    assert measure._probed(full, "xla-cpu")
    assert not measure._probed({k: v for k, v in full.items() if k != "stream_passes"}, "xla-cpu")
    assert not measure._probed(dict(full, gspmd={"adam": 1e-9}), "xla-cpu")
    assert measure._probed({"stream": [[1e6, 1e-4]], "gloo_io": "idle"}, "gloo")  # gloo's probe is in place: one pass


def test_a_gloo_entry_measured_at_the_other_io_priority_is_measured_again(monkeypatch):
    """Gloo's entries (its collectives and torch-ddp's reference step) hold the I/O thread's priority
    they ran at: 2-8 ranks' steps differ 2-2.5x between the two, so one of the other setting, or of
    a calibration from before the setting existed, is measured again."""
    monkeypatch.delenv("PODSCALE_GLOO_IO", raising=False)
    entry = {"stream": [[1e6, 1e-4]], "gloo_io": "idle"}
    assert measure._probed(entry, "gloo") and measure._io_current("gloo", {"overhead_s": 1e-3, "gloo_io": "idle"})
    assert not measure._probed({"stream": [[1e6, 1e-4]]}, "gloo")  # from before the setting
    assert not measure._io_current("gloo", {"overhead_s": 1e-3})
    monkeypatch.setenv("PODSCALE_GLOO_IO", "normal")
    assert not measure._probed(entry, "gloo") and not measure._io_current("gloo", {"overhead_s": 1e-3, "gloo_io": "idle"})
    assert measure._io_current("xla-cpu", {"overhead_s": 1e-3})  # XLA's entries know nothing of gloo
    monkeypatch.delenv("PODSCALE_GLOO_IO")
    # gloo's reference entries past N = 1 hold the wide reference's step too, and every backend's
    # with probes the data reference; torch-xla has no probes (no data part to measure)
    data = {"data_s": 1e-5, "data_bytes": 68, "data_wide_s": 1e-4, "data_wide_bytes": 1 << 20}
    assert not measure._ref_current("torch-ddp", 2, {"overhead_s": 1e-3, "gloo_io": "idle", **data})
    assert measure._ref_current("torch-ddp", 2, {"overhead_s": 1e-3, "gloo_io": "idle", "wide_step_s": 2e-3, **data})
    assert not measure._ref_current("torch-ddp", 2, {"overhead_s": 1e-3, "gloo_io": "idle", "wide_step_s": 2e-3})
    assert measure._ref_current("torch-ddp", 1, {"overhead_s": 1e-3, "gloo_io": "idle", **data})
    assert measure._ref_current("jax-pmap", 4, {"overhead_s": 1e-3, **data})
    assert not measure._ref_current("jax-sharded", 4, {"overhead_s": 1e-3})
    assert measure._ref_current("torch-xla", 4, {"overhead_s": 1e-3})
    assert not measure._io_current("xla-cpu", None)


@pytest.mark.parametrize("backends, tables", [(["torch-xla"], {"torch_xla"}), (["jax-pmap"], {"jax"}),
                                              (["torch-ddp", "jax-sharded"], {"torch", "jax"})])
def test_calibration_measures_only_the_layer_tables_its_backends_read(cache, monkeypatch, backends, tables):
    """.venv-xla calibrating torch-xla alone measured jax's layer table too (92 s of a CI sweep) that
    no torch-xla prediction reads. The measurements are stubbed: which tables get measured is the point."""
    import importlib.util

    measured: set[str] = set()

    def table(name):
        def f(*_a, **_k):
            measured.add(name)
            return {"dense": []}
        return f

    real_find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: object() if n == "torch_xla" else real_find(n, *a))
    monkeypatch.setattr(measure.layer_rates, "torch_table", table("torch"))
    monkeypatch.setattr(measure, "measure_xla_layers", table("jax"))
    monkeypatch.setattr(measure, "measure_torch_xla_layers", table("torch_xla"))
    monkeypatch.setattr(measure.host, "measured_host_peaks", lambda **_k: None)
    monkeypatch.setattr(measure, "torch_gemm_table", lambda *_a: {"fp32": {}})
    probe = {"points": [(1024, 1e-5), (1 << 20, 1e-3)], "slowdown": 1.0, "gemm": {"fp32": {}}}
    monkeypatch.setattr(measure, "measure_gloo", lambda *_a: dict(probe))
    monkeypatch.setattr(measure, "measure_xla", lambda *_a: dict(probe))
    monkeypatch.setattr(measure, "_reference_entry", lambda *_a: {"overhead_s": 1e-3, "slowdown": 1.0})
    monkeypatch.setattr(measure, "measure_torch_xla_spmd", lambda _n: {"bytes": 1, "sgd": 1e-3, "adam": 1e-3})
    data = measure.calibrate(backends, [1], measure.TINY)
    assert measured == tables and set(data["layers"]) == tables
    assert set(data["layers"]) == {calibration.layer_source(b) for b in backends}
