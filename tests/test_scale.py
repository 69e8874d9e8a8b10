"""`podscale scale` on CPU emulation: consistent numbers, a real plot, TensorBoard runs, and
structural scaling facts measured on every rank (FLOPs, gradient bytes) rather than from config."""

from __future__ import annotations

import json

import matplotlib.image as mpimg
import pytest

from launchers.cmd_scale import choose_backends, find_xla_python
from models.spec import get_spec
from scaling.backends import is_installed
from scaling.errors import UsageError
from scaling.tensorboard import read_scalars
from tests.conftest import ROOT, podscale

SMALL = ("--model-opt", "d_in=256", "--model-opt", "hidden=64")


def per_device_flops(run):
    """FLOPs one device executed in one step, as the framework counted them on that device."""
    if run.get("flops_per_device"):
        vals = run["flops_per_device"]
        assert len(vals) == run["devices"] and len(set(vals)) == 1, vals  # every rank did the same work
        return vals[0]
    # XLA's cost analysis of one device's forward + backward (jax), or of one device's compiled
    # SPMD program (torch-xla: its dot/convolution FLOPs)
    return run.get("xla_train_flops_per_device") or run["xla_flops_per_device"]


def comm_bytes(run):
    c = run["comm_bytes_per_step"]
    if isinstance(c, list):
        assert len(set(c)) == 1, c
        return c[0]
    return c


@pytest.fixture(scope="module")
def weak_sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("scale")
    # 3 passes over the configurations, a run each (the median reported, the fastest held to the
    # band below): one 2-rank gloo run's median step varied from 1.1 to 5.5 ms between runs here
    # no breakdown probes (tests/test_breakdown.py has them): a CI run of this sweep with them, 4
    # backends on a slow day, passed its 20 minutes
    # 48 timed steps a run, not 20: a run is mostly its start-up, and its median the steadier
    p = podscale("scale", "--devices", "1,2,4", "--steps", "60", "--untimed-steps", "12", "--per-device-batch", "32",
                 "--repeats", "3", "--probe-steps", "0", *SMALL, "--out", str(out / "out"), "--logdir", str(out / "tb"),
                 timeout=1800)
    return out, json.loads((out / "out" / "scale.json").read_text()), p.stdout


@pytest.mark.slow
@pytest.mark.timeout(2100)  # the module's sweep: 12 configurations x 3 runs, on the first test that asks
def test_weak_sweep_numbers_are_consistent(weak_sweep):
    out, doc, stdout = weak_sweep
    expected = [b for b in ("torch-ddp", "jax-pmap", "jax-sharded") if is_installed(b)]
    if find_xla_python(None):
        expected.append("torch-xla")
    assert doc["backends"] == expected and not doc["failures"]
    assert len(doc["runs"]) == 3 * len(expected)
    for r in doc["runs"]:  # --repeats 3: the reported run is the median of three
        assert len(r["repeat_step_times_s"]) == 3 and r["step_time_s"] == sorted(r["repeat_step_times_s"])[1]
    # in passes: every configuration's first run ended before any second run began
    runs_dir = out / "out" / "runs"
    first = [p.stat().st_mtime for p in runs_dir.glob("*dev.json")]
    second = [p.stat().st_mtime for p in runs_dir.glob("*dev-repeat1.json")]
    assert len(first) == len(second) == len(doc["runs"]) and max(first) < min(second)
    for backend, rows in doc["summary"].items():
        assert [r["devices"] for r in rows] == [1, 2, 4]
        base = rows[0]
        for r in rows:
            assert r["global_batch"] == 32 * r["devices"]
            eff = (r["global_batch"] / r["step_time_s"]) / (r["devices"] * base["global_batch"] / base["step_time_s"])
            assert r["efficiency"] == pytest.approx(eff)
            assert r["achieved_flops"] == pytest.approx(r["model_flops_per_step"] / r["step_time_s"])
            assert r["mfu"] == pytest.approx(r["achieved_flops"] / r["peak_flops"])
        assert base["efficiency"] == pytest.approx(1.0)
        assert f"{backend} · mlp · weak scaling" in stdout
    # the host's ceiling: N emulated devices on C cores compute at most min(N, C) times one device
    cores = doc["host_cores"]
    assert doc["host_ceiling_efficiency"] == {str(n): pytest.approx(min(n, cores) / n) for n in (1, 2, 4)}
    img = mpimg.imread(out / "out" / "scale.png")
    assert img.ndim == 3 and img.shape[0] > 300 and img.shape[1] > 600
    for run in doc["runs"]:
        scalars = read_scalars(out / "tb" / f"{run['backend']}-{run['devices']}dev")
        assert len(scalars["loss"]) == 60 and len(scalars["step_time_s"]) == 48


@pytest.mark.slow
@pytest.mark.timeout(2100)  # the module's sweep: 12 configurations x 3 runs, on the first test that asks
def test_weak_sweep_structure_measured_per_rank(weak_sweep):
    _, doc, _ = weak_sweep
    spec = get_spec("mlp", d_in=256, hidden=64)
    for backend in doc["summary"]:
        runs = sorted((r for r in doc["runs"] if r["backend"] == backend), key=lambda r: r["devices"])
        flops = [per_device_flops(r) for r in runs]
        assert flops[0] > 0 and all(f == pytest.approx(flops[0], rel=0.01) for f in flops), (backend, flops)
        for r in runs[1:]:
            # gradient bytes all-reduced per step = the spec's gradient bytes (JAX adds the 4-byte loss)
            assert spec.grad_bytes() <= comm_bytes(r) <= spec.grad_bytes() + 8, (backend, r["devices"], comm_bytes(r))


@pytest.mark.slow
@pytest.mark.timeout(2100)  # the module's sweep: 12 configurations x 3 runs, on the first test that asks
def test_weak_sweep_prediction_within_band(weak_sweep):
    """Loose band only: the tight targets (on-grid median 10%; off-grid median 15%, max 35%) live in
    bench/predictor.py. A prediction is for an idle host and other load only adds time, so it is
    held against the fastest of the three runs (one from each pass over the configurations): on
    this host one configuration's run varied more than 2x within minutes (torch-ddp at N = 2: 3.1
    to 8.9 ms over three sweeps, 2026-12-07), and a CI run read 0.46x (torch-ddp, N = 2) of a
    median that quieter sweeps put at 0.6-0.85x."""
    _, doc, _ = weak_sweep
    for backend, rows in doc["summary"].items():  # torch-xla too, from .venv-xla's own calibration
        for r in rows:
            assert r["predicted_step_time_s"] is not None, (backend, r["devices"])
            run = next(x for x in doc["runs"] if x["backend"] == backend and x["devices"] == r["devices"])
            ratio = r["predicted_step_time_s"] / min(run["repeat_step_times_s"])
            assert 0.5 <= ratio <= 2.0, (backend, r["devices"], ratio, run["repeat_step_times_s"])


OFF_GRID = ("--model-opt", "d_in=256", "--model-opt", "hidden=1024")  # 16x the sweep model's gradient bytes


@pytest.mark.slow
@pytest.mark.timeout(2100)  # the module's sweep: 12 configurations x 3 runs, on the first test that asks
def test_off_grid_predictions_from_a_calibration_that_never_ran_that_n(weak_sweep, tmp_path):
    """The sweep's calibration restricted to N = 1, 2 (what `podscale calibrate --devices 1,2`
    writes: each N is measured on its own) predicts N = 4, beyond it and past this host's cores,
    for the sweep's mlp and one with 16x its gradient bytes, neither ever calibrated (the reference
    is a 289-parameter mlp), within 0.5-2x of the fastest measured steps (why the fastest: the
    test above). The tight off-grid figures live in bench/predictor.py."""
    _, doc, _ = weak_sweep
    from scaling.throughput import calibration, estimate

    cal = calibration.restricted(calibration.load(), [1, 2])
    assert sorted(cal["backends"]["torch-ddp"]["per_n"]) == ["1", "2"]
    for backend in (b for b in ("torch-ddp", "jax-sharded") if b in doc["summary"]):
        big = []
        for k in range(2):
            podscale("run", "--backend", backend, "--devices", "4", "--global-batch", "128", "--steps", "60",
                     "--untimed-steps", "12", "--probe-steps", "0", *OFF_GRID, "--quiet", "--json", str(tmp_path / f"{backend}{k}.json"))
            big.append(json.loads((tmp_path / f"{backend}{k}.json").read_text())["step_time_s"])
        small = next(r for r in doc["runs"] if r["backend"] == backend and r["devices"] == 4)
        for opts, measured in ((SMALL, min(small["repeat_step_times_s"])), (OFF_GRID, min(big))):
            spec = get_spec("mlp", d_in=256, hidden=int(opts[-1].split("=")[1]))
            est = estimate.predict_step(estimate.workload(spec), "host-cpu", 4, 128, "float32", backend, calibration=cal)
            assert "interpolated" in est.basis, est.basis  # N=4 is not in the restricted calibration
            assert 0.5 <= est.step_time_s / measured <= 2.0, (backend, opts, est.step_time_s, measured)


@pytest.mark.slow
@pytest.mark.timeout(2100)  # the module's sweep: 12 configurations x 3 runs, on the first test that asks
def test_a_users_script_is_predicted_from_the_layers_it_ran(weak_sweep, tmp_path):
    """examples/digits_cnn.py: a model no spec describes and the calibration never ran. Its first
    step's recorded forward (two convolutions, two ReLUs, a linear layer, at their shapes) is
    priced from the layer table, within 0.5-2x of the measured step (pricing its matmul calls as
    square GEMMs, the rule this replaced, gave 0.31x and 0.40x here). The prediction is for an idle
    machine and other load only ever adds time, so each N is run twice and held against the faster
    (one CI run on a busy host measured 5.9 ms at N = 2, where three runs minutes later read 3.7-4.6)."""
    script = ROOT / "examples" / "digits_cnn.py"
    for n in (1, 2):
        runs = []
        for k in range(2):
            out = tmp_path / f"digits{n}-{k}.json"
            podscale("run", str(script), "--backend", "torch-ddp", "--devices", str(n), "--global-batch", "64",
                     "--steps", "40", "--probe-steps", "0", "--quiet", "--json", str(out))
            runs.append(json.loads(out.read_text()))
        r = min(runs, key=lambda x: x["step_time_s"])
        assert r["op_record"]["layers"] and r["predicted_step_time_s"] is not None, n
        assert 0.5 <= r["predicted_step_time_s"] / r["step_time_s"] <= 2.0, (n, r["predicted_step_time_s"], r["step_time_s"])


@pytest.mark.slow
def test_strong_sweep_per_device_flops_shrink_as_one_over_n(tmp_path):
    backends = ",".join(b for b in ("torch-ddp", "jax-sharded") if is_installed(b))
    podscale("scale", "--backends", backends, "--mode", "strong", "--global-batch", "64", "--devices", "1,2,4",
             "--steps", "6", "--untimed-steps", "2", *SMALL, "--no-calibrate", "--out", str(tmp_path / "o"),
             "--logdir", str(tmp_path / "tb"), timeout=600)
    doc = json.loads((tmp_path / "o" / "scale.json").read_text())
    for backend in backends.split(","):
        runs = sorted((r for r in doc["runs"] if r["backend"] == backend), key=lambda r: r["devices"])
        assert [r["global_batch"] for r in runs] == [64, 64, 64]
        f1 = per_device_flops(runs[0])
        for r in runs[1:]:
            assert per_device_flops(r) == pytest.approx(f1 / r["devices"], rel=0.02), (backend, r["devices"])


@pytest.mark.parametrize("args,message", [
    (("--devices", ""), "is empty"),
    (("--devices", "1,4,2"), "strictly increasing"),
    (("--devices", "1,2,17"), "more devices than this host can emulate"),
    (("--devices", "1,2", "--model-opt", "d_in=200000", "--model-opt", "hidden=100000"), "above 80% of this host's RAM"),
    (("--backends", "torch-ddp,jax-pmapp"), "unknown backend 'jax-pmapp'"),
    (("--mode", "strong", "--global-batch", "10", "--devices", "1,4"), "does not divide evenly over --devices 4"),
])
def test_bad_sweeps_exit_2_with_one_line(args, message):
    p = podscale("scale", "--no-calibrate", *args, check=False, timeout=60)
    assert p.returncode == 2, p.stderr
    assert message in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_uninstalled_backend_names_how_to_install_it():
    if is_installed("torch-xla"):
        pytest.fail("this test expects the main venv, where torch_xla cannot be installed beside torch 2.13")
    with pytest.raises(UsageError, match=r"backend 'torch-xla' is not installed: build its environment with `make venv-xla`"):
        choose_backends("torch-ddp,torch-xla", None)
    names, notes = choose_backends(None, None)
    assert "torch-xla" not in names and "make venv-xla" in notes[0]
