"""Sharded data parallelism (``--sharding optimizer|full``: FSDP2 on torch-ddp, NamedSharding of the
state on jax-sharded): the same SGD step as
replicated data parallelism, with the training state split N ways, measured from the live tensors.

The reference is one device with no sharding: the data-parallel tests already hold every N equal to
it, so a sharded run at N that equals it is equal to the replicated run at N as well."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import podscale

pytestmark = pytest.mark.slow

# every first dimension divisible by 4: each rank holds exactly 1/N of every tensor
MODEL = ("--model-opt", "d_in=16", "--model-opt", "hidden=64", "--model-opt", "d_out=8")
COMMON = ("--steps", "6", "--untimed-steps", "1", "--global-batch", "32", "--lr", "0.01", "--probe-steps", "0", *MODEL, "--quiet")


def _run(tmp, name, *args):
    podscale("run", *COMMON, *args, "--json", str(tmp / f"{name}.json"), "--params-out", str(tmp / f"{name}.npz"), timeout=180)
    return json.loads((tmp / f"{name}.json").read_text()), dict(np.load(tmp / f"{name}.npz"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sharding")
    out = {"ref": _run(tmp, "ref", "--devices", "1")}
    for mode, n in (("optimizer", 2), ("full", 2), ("full", 4)):  # both modes, both counts, in 3 runs
        out[(mode, n)] = _run(tmp, f"{mode}{n}", "--devices", str(n), "--sharding", mode)
    return out


def test_sharded_steps_equal_one_device(runs):
    ref, ref_params = runs["ref"]
    for (mode, n), (r, params) in ((k, v) for k, v in runs.items() if k != "ref"):
        assert r["sharding"] == mode and r["devices"] == n
        np.testing.assert_allclose(r["losses"], ref["losses"], rtol=1e-5, err_msg=f"{mode} x {n}")
        assert sorted(params) == sorted(ref_params)
        for k in ref_params:
            np.testing.assert_allclose(params[k], ref_params[k], rtol=1e-5, atol=1e-7, err_msg=f"{mode} x {n}: {k}")
        assert r["replicas_identical"], (mode, n)  # every rank gathered the same whole model


def test_state_bytes_per_device_shrink_as_one_over_n(runs):
    ref = runs["ref"][0]["memory"]["per_rank"][0]
    whole = {k: ref[k] for k in ("params_bytes", "grads_bytes", "optimizer_bytes")}
    assert whole["params_bytes"] == 4 * (16 * 64 + 64 + 64 * 8 + 8)  # fp32, the mlp's own shapes
    assert whole["grads_bytes"] == whole["params_bytes"] and whole["optimizer_bytes"] == 2 * whole["params_bytes"]  # adam: m, v
    for (mode, n), (r, _) in ((k, v) for k, v in runs.items() if k != "ref"):
        per_rank = r["memory"]["per_rank"]
        assert len(per_rank) == n
        for m in per_rank:
            for k, v in whole.items():
                assert m[k] == v // n, (mode, n, k, m[k], v)
            assert m["rss_peak_bytes"] > 0  # a process's own figure, not divided by N
        # one all-gather per step (optimizer) or two (full), plus the gradients' reduce-scatter
        assert r["comm_bytes_per_step"] == [whole["params_bytes"] * (2 if mode == "optimizer" else 3)] * n


def test_resume_on_another_device_count_reshards(runs, tmp_path):
    ck = str(tmp_path / "ck")
    straight, straight_params = runs[("full", 2)]  # uninterrupted, 6 steps at 2 ranks
    podscale("run", *COMMON, "--devices", "4", "--sharding", "full", "--steps", "3", "--checkpoint-dir", ck, timeout=180)
    resumed, resumed_params = _run(tmp_path, "resumed", "--devices", "2", "--sharding", "full", "--checkpoint-dir", ck, "--resume")
    assert resumed["resumed_from_step"] == 3
    np.testing.assert_allclose(resumed["losses"], straight["losses"], rtol=1e-5)
    for k in straight_params:
        np.testing.assert_allclose(resumed_params[k], straight_params[k], rtol=1e-5, atol=1e-7, err_msg=k)
    # a replicated run cannot continue a sharded checkpoint (its optimizer state is keyed otherwise)
    p = podscale("run", *COMMON, "--devices", "2", "--checkpoint-dir", ck, "--resume", check=False, timeout=120)
    assert p.returncode == 2 and "written with --sharding full" in p.stderr.strip().splitlines()[-1], p.stderr


@pytest.mark.parametrize("args, words", [
    (("--backend", "jax-pmap", "--devices", "2", "--sharding", "full"), "jax-pmap replicates by design; backends that shard: torch-ddp, jax-sharded, torch-xla"),
    (("--devices", "2", "--sharding", "zero3"), "--sharding: invalid choice: 'zero3'"),
])
def test_sharding_bad_input_is_one_line(args, words):
    p = podscale("run", *args, check=False, timeout=60)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and words in p.stderr, p.stderr


# ---- jax-sharded: NamedSharding of parameters and optimizer state over the data axis ----------


@pytest.fixture(scope="module")
def jax_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sharding-jax")
    out = {"ref": _run(tmp, "ref", "--backend", "jax-sharded", "--devices", "1")}
    for mode, n in (("full", 2), ("optimizer", 4), ("full", 8)):
        out[(mode, n)] = _run(tmp, f"{mode}{n}", "--backend", "jax-sharded", "--devices", str(n), "--sharding", mode)
    return out


def test_jax_sharded_steps_equal_one_device_with_state_split_n_ways(jax_runs):
    ref, ref_params = jax_runs["ref"]
    whole = ref["memory"]["per_device"][0]
    assert whole["params_bytes"] == 4 * (16 * 64 + 64 + 64 * 8 + 8)
    for (mode, n), (r, params) in ((k, v) for k, v in jax_runs.items() if k != "ref"):
        assert r["sharding"] == mode and r["replicas_identical"]
        np.testing.assert_allclose(r["losses"], ref["losses"], rtol=1e-5, err_msg=f"{mode} x {n}")
        for k in ref_params:
            np.testing.assert_allclose(params[k], ref_params[k], rtol=1e-5, atol=1e-7, err_msg=f"{mode} x {n}: {k}")
        per = r["memory"]["per_device"]
        assert len(per) == n
        for d in per:
            # every array here has a dimension divisible by N: exactly 1/N each (adam's step count,
            # a scalar, stays whole on every device)
            assert d["params_bytes"] == (whole["params_bytes"] // n if mode == "full" else whole["params_bytes"]), (mode, n, d)
            assert d["optimizer_bytes"] == (whole["optimizer_bytes"] - 4) // n + 4, (mode, n, d)
        # XLA gathers what it shards: the compiled step all-gathers (on CPU it lowers the gradient
        # reduce-scatter as an all-reduce, so only the gathers are asserted by kind)
        assert r["collective_bytes_per_step"]["all-gather"] > 0, r["collective_bytes_per_step"]
        if mode == "optimizer":  # the gradients all-reduced whole (+ the 4-byte loss), the updated parameters gathered whole
            assert r["collective_bytes_per_step"] == {"all-reduce": whole["params_bytes"] + 4, "all-gather": whole["params_bytes"],
                                                      "reduce-scatter": 0}, r["collective_bytes_per_step"]


def test_jax_sharded_resume_on_another_device_count(jax_runs, tmp_path):
    """Saved by 2 processes x 2 devices (the processes assemble the sharded state together),
    resumed by 1 process with 2 devices."""
    common = ("--backend", "jax-sharded", "--sharding", "full")
    straight, straight_params = jax_runs[("full", 2)]  # uninterrupted, 6 steps on 2 devices
    ck = str(tmp_path / "ck")
    podscale("run", *COMMON, *common, "--devices", "4", "--processes", "2", "--steps", "3", "--checkpoint-dir", ck,
             "--json", str(tmp_path / "first.json"), timeout=180)
    first = json.loads((tmp_path / "first.json").read_text())
    assert first["replicas_identical"]
    np.testing.assert_allclose(first["losses"], straight["losses"][:3], rtol=1e-5)
    resumed, resumed_params = _run(tmp_path, "resumed", *common, "--devices", "2", "--checkpoint-dir", ck, "--resume")
    assert resumed["resumed_from_step"] == 3
    np.testing.assert_allclose(resumed["losses"], straight["losses"], rtol=1e-5)
    for k in straight_params:
        np.testing.assert_allclose(resumed_params[k], straight_params[k], rtol=1e-5, atol=1e-7, err_msg=k)


@pytest.mark.parametrize("script, backend", [("digits_cnn.py", "torch-ddp"), ("digits_cnn_jax.py", "jax-sharded")])
def test_a_users_script_shards_through_the_training_api(tmp_path, script, backend):
    from tests.conftest import ROOT

    out = {}
    for mode in ("none", "full"):
        podscale("run", str(ROOT / "examples" / script), "--backend", backend, "--devices", "2", "--steps", "4",
                 "--probe-steps", "0", "--sharding", mode, "--quiet", "--json", str(tmp_path / f"{mode}.json"), timeout=180)
        out[mode] = json.loads((tmp_path / f"{mode}.json").read_text())
    np.testing.assert_allclose(out["full"]["losses"], out["none"]["losses"], rtol=1e-5)
    per = out["full"]["memory"].get("per_rank") or out["full"]["memory"]["per_device"]
    whole = (out["none"]["memory"].get("per_rank") or out["none"]["memory"]["per_device"])[0]["params_bytes"]
    assert [d["params_bytes"] for d in per] == [whole // 2] * 2  # the CNN's own layers, split over 2


# ---- memory per device, predicted beside measured ---------------------------------------------


def test_predicted_state_bytes_equal_the_measured_ones(runs, jax_runs):
    from models.spec import get_spec
    from scaling.throughput.memory import per_device

    spec = get_spec("mlp", d_in=16, hidden=64, d_out=8)
    for (mode, n), (r, _) in ((k, v) for k, v in runs.items() if k != "ref"):
        pred = per_device(spec.param_count, spec.activations_per_sample, 32 / n, n, mode, "adam")
        got = r["memory"]["per_rank"][0]
        assert (got["grads_bytes"], got["optimizer_bytes"]) == (pred.grads_bytes, pred.optimizer_bytes), (mode, n)
        # FSDP2 keeps parameters sharded between steps in both modes; the prediction is the step's
        # peak (whole under optimizer), so only full's at-rest bytes are the predicted ones
        if mode == "full":
            assert got["params_bytes"] == pred.params_bytes
    for (mode, n), (r, _) in ((k, v) for k, v in jax_runs.items() if k != "ref"):
        pred = per_device(spec.param_count, spec.activations_per_sample, 32 / n, n, mode, "adam")
        got = r["memory"]["per_device"][0]
        assert got["params_bytes"] == pred.params_bytes and got["optimizer_bytes"] - 4 == pred.optimizer_bytes, (mode, n)


def test_predict_says_whether_memory_fits_the_device():
    rows = json.loads(podscale("predict", "--model", "gpt3-2.7b", "--hardware", "a100-sxm4", "--devices", "8", "--global-batch", "8",
                               "--sharding", "full", "--json", timeout=60).stdout)
    mems = [r["memory"] for r in rows]
    assert [r["devices"] for r in rows] == [1, 2, 4, 8]
    # weak scaling, one sample per device: the state shrinks as 1/N, the activations stay
    assert all(m["params_bytes"] == pytest.approx(mems[0]["params_bytes"] / r["devices"]) for m, r in zip(mems, rows))
    assert all(m["activations_bytes"] == pytest.approx(mems[0]["activations_bytes"]) for m in mems)
    # 2.7e9 params x 16 B of state alone exceed an 80 GB A100 at N=1; split 2+ ways they fit
    assert [m["fits"] for m in mems] == [m["total_bytes"] <= 80e9 for m in mems] == [False, True, True, True]
    out = podscale("predict", "--model", "gpt2-xl", "--hardware", "a100-sxm4", "--devices", "8", "--global-batch", "64",
                   timeout=60).stdout
    assert "does not fit" in out and "--sharding full splits the state" in out


def test_throughput_model_prices_the_sharded_collectives_by_its_stated_rule():
    from scaling.throughput import catalog, estimate
    from scaling.throughput.collectives import allreduce_time

    wl, hw, n, gb = estimate.workload("gpt2-xl"), catalog.get("a100-sxm4"), 8, 64
    none, opt, full = (estimate.predict_step(wl, hw.id, n, gb, sharding=m) for m in ("none", "optimizer", "full"))
    ar = allreduce_time(wl.grad_bytes, n, hw)  # the closed form, straight from the catalog's collectives
    # collective time, hidden or not: 2 gathers + 1 reduce-scatter (full), 1 + 1 (optimizer), at half an all-reduce each
    assert opt.allreduce_s == pytest.approx(ar) and full.allreduce_s == pytest.approx(1.5 * ar)
    units = sum(1 for w in wl.roofline_works() if w.params)
    assert full.comm_s >= ar / 2 / units * (1 - 1e-9)  # exposed: the first unit's gather is never hidden
    assert full.step_time_s >= opt.step_time_s  # one more gather per step, the same compute
    one = estimate.predict_step(wl, hw.id, 1, gb / n, sharding="full")
    assert one.allreduce_s == 0 and one.step_time_s == pytest.approx(estimate.predict_step(wl, hw.id, 1, gb / n).step_time_s)
