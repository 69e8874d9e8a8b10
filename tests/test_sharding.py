"""Sharded data parallelism (``--sharding optimizer|full``: FSDP2 on torch-ddp, NamedSharding of the
state on jax-sharded): the same SGD step as
replicated data parallelism, with the training state split N ways, measured from the live tensors.

The reference is one device with no sharding (torch: the plain loop of ``tests/mlp_reference.py``;
jax: a one-device run): the data-parallel tests already hold every N equal to it, so a sharded run
at N that equals it is equal to the replicated run at N as well."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import drop_newest_checkpoint, podscale
from tests.mlp_reference import sharded_runs

pytestmark = pytest.mark.slow

# every first dimension divisible by 4: each rank holds exactly 1/N of every tensor
MODEL = ("--model-opt", "d_in=16", "--model-opt", "hidden=64", "--model-opt", "d_out=8")
COMMON = ("--steps", "6", "--untimed-steps", "1", "--global-batch", "32", "--lr", "0.01", "--probe-steps", "0", *MODEL, "--quiet")


def _run(tmp, name, *args):
    podscale("run", *COMMON, *args, "--json", str(tmp / f"{name}.json"), "--params-out", str(tmp / f"{name}.npz"), timeout=180)
    return json.loads((tmp / f"{name}.json").read_text()), dict(np.load(tmp / f"{name}.npz"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Combined runs, few of them (``tests.mlp_reference.sharded_runs``)."""
    return sharded_runs(tmp_path_factory.mktemp("sharding"), _run)


def _sharded(runs):
    return ((k, v) for k, v in runs.items() if isinstance(k, tuple))


def test_sharded_steps_equal_one_device(runs):
    ref_losses, ref_params = runs["ref"]
    for (mode, n), (r, params) in _sharded(runs):
        assert r["sharding"] == mode and r["devices"] == n
        np.testing.assert_allclose(r["losses"], ref_losses, rtol=1e-5, err_msg=f"{mode} x {n}")
        assert sorted(params) == sorted(ref_params)
        for k in ref_params:
            np.testing.assert_allclose(params[k], ref_params[k], rtol=1e-5, atol=1e-7, err_msg=f"{mode} x {n}: {k}")
        assert r["replicas_identical"], (mode, n)  # every rank gathered the same whole model


def test_state_bytes_per_device_shrink_as_one_over_n(runs):
    params = 4 * (16 * 64 + 64 + 64 * 8 + 8)  # fp32, the mlp's own shapes
    whole = {"params_bytes": params, "grads_bytes": params, "optimizer_bytes": 2 * params}  # adam: m and v
    for (mode, n), (r, _) in (*_sharded(runs), (("full", 2), runs["resumed"])):
        per_rank = r["memory"]["per_rank"]
        assert len(per_rank) == n
        for m in per_rank:
            for k, v in whole.items():
                assert m[k] == v // n, (mode, n, k, m[k], v)
            assert m["rss_peak_bytes"] > 0  # a process's own figure, not divided by N
        # one all-gather per step (optimizer) or two (full), plus the gradients' reduce-scatter
        assert r["comm_bytes_per_step"] == [whole["params_bytes"] * (2 if mode == "optimizer" else 3)] * n


def test_resume_on_another_device_count_reshards(runs):
    """Saved by 4 ranks at step 3, resumed by 2: steps 4-6 equal the uninterrupted reference's."""
    ref_losses, ref_params = runs["ref"]
    resumed, resumed_params = runs["resumed"]
    assert resumed["resumed_from_step"] == 3 and resumed["devices"] == 2
    np.testing.assert_allclose(resumed["losses"], ref_losses, rtol=1e-5)
    for k in ref_params:
        np.testing.assert_allclose(resumed_params[k], ref_params[k], rtol=1e-5, atol=1e-7, err_msg=k)
    # a replicated run cannot continue a sharded checkpoint (its optimizer state is keyed otherwise)
    p = podscale("run", *COMMON, *runs["files"], "--devices", "1", "--checkpoint-dir", str(runs["ck"]), "--resume", check=False,
                 timeout=120)
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
    """The reference; optimizer at 4; full at 8; full on 2 processes x 2 devices (checkpointing at 3,
    the processes assembling the sharded state together); full on 1 process x 2 devices, resumed
    from it at step 3."""
    tmp = tmp_path_factory.mktemp("sharding-jax")
    jax = ("--backend", "jax-sharded")
    out = {"ref": _run(tmp, "ref", *jax, "--devices", "1")}
    for mode, n in (("optimizer", 4), ("full", 8)):
        out[(mode, n)] = _run(tmp, f"{mode}{n}", *jax, "--devices", str(n), "--sharding", mode)
    ck = tmp / "ck"
    out[("full", "2x2")] = _run(tmp, "full2x2", *jax, "--devices", "4", "--processes", "2", "--sharding", "full",
                                "--checkpoint-dir", str(ck), "--checkpoint-every", "3")
    drop_newest_checkpoint(ck)
    out["resumed"] = _run(tmp, "resumed", *jax, "--devices", "2", "--sharding", "full", "--checkpoint-dir", str(ck), "--resume")
    return out


def test_jax_sharded_steps_equal_one_device_with_state_split_n_ways(jax_runs):
    ref, ref_params = jax_runs["ref"]
    whole = ref["memory"]["per_device"][0]
    assert whole["params_bytes"] == 4 * (16 * 64 + 64 + 64 * 8 + 8)
    for (mode, n), (r, params) in (*_sharded(jax_runs), (("full", 2), jax_runs["resumed"])):
        assert r["sharding"] == mode and r["replicas_identical"]
        np.testing.assert_allclose(r["losses"], ref["losses"], rtol=1e-5, err_msg=f"{mode} x {n}")
        for k in ref_params:
            np.testing.assert_allclose(params[k], ref_params[k], rtol=1e-5, atol=1e-7, err_msg=f"{mode} x {n}: {k}")
        per = r["memory"]["per_device"]
        devices = 4 if n == "2x2" else n
        assert r["devices"] == devices
        if n == "2x2":
            continue  # each process reports its own devices
        assert len(per) == n
        for d in per:
            # every array here has a dimension divisible by N: exactly 1/N each (adam's step count,
            # a scalar, stays whole on every device)
            assert d["params_bytes"] == (whole["params_bytes"] // n if mode == "full" else whole["params_bytes"]), (mode, n, d)
            assert d["optimizer_bytes"] == (whole["optimizer_bytes"] - 4) // n + 4, (mode, n, d)
        # the compiled step, both modes: the parameters all-gathered whole once (full: before
        # forward, kept through backward inside the one program; optimizer: the updated shards), the
        # gradients reduced onto the shards (+ the 4-byte loss). XLA:CPU lowers that reduce-scatter
        # as an all-reduce followed by a slice, so here it counts as all-reduce bytes
        assert r["collective_bytes_per_step"] == {"all-reduce": whole["params_bytes"] + 4, "all-gather": whole["params_bytes"],
                                                  "reduce-scatter": 0}, (mode, n, r["collective_bytes_per_step"])


def test_jax_sharded_resume_on_another_device_count(jax_runs):
    """Saved by 2 processes x 2 devices at step 3, resumed by 1 process with 2 devices."""
    resumed = jax_runs["resumed"][0]
    assert resumed["resumed_from_step"] == 3 and resumed["devices"] == 2
    assert jax_runs[("full", "2x2")][0]["processes"] == 2  # equal to the reference: see the test above


USER_STEPS = 4


def _users_plain_loop(script: str) -> tuple[list[float], dict[str, np.ndarray]]:
    """The example's own plain loop (one process, one device, no podscale) from its API tests."""
    if script == "digits_cnn.py":
        from tests.test_train_api import plain_loop

        return plain_loop(USER_STEPS, 64)
    from tests.test_train_api_jax import plain_loop as jax_plain_loop

    return jax_plain_loop(steps=USER_STEPS)


@pytest.mark.parametrize("script, backend", [("digits_cnn.py", "torch-ddp"), ("digits_cnn_jax.py", "jax-sharded")])
def test_a_users_script_shards_through_the_training_api(tmp_path, script, backend):
    """A user's CNN under ``--sharding full`` on 2 devices: the plain loop's losses, each device
    holding half of every parameter."""
    from tests.conftest import ROOT

    podscale("run", str(ROOT / "examples" / script), "--backend", backend, "--devices", "2", "--steps", str(USER_STEPS),
             "--probe-steps", "0", "--sharding", "full", "--quiet", "--json", str(tmp_path / "full.json"), timeout=180)
    got = json.loads((tmp_path / "full.json").read_text())
    losses, params = _users_plain_loop(script)
    np.testing.assert_allclose(got["losses"], losses, rtol=1e-5)
    whole = sum(v.nbytes for k, v in params.items() if "running" not in k and "num_batches" not in k)
    per = got["memory"].get("per_rank") or got["memory"]["per_device"]
    assert [d["params_bytes"] for d in per] == [whole // 2] * 2  # the CNN's own layers, split over 2


# ---- memory per device, predicted beside measured ---------------------------------------------


def test_predicted_state_bytes_equal_the_measured_ones(runs, jax_runs):
    from models.spec import get_spec
    from scaling.throughput.memory import per_device

    spec = get_spec("mlp", d_in=16, hidden=64, d_out=8)
    for (mode, n), (r, _) in _sharded(runs):
        pred = per_device(spec.param_count, spec.activations_per_sample, 32 / n, n, mode, "adam")
        got = r["memory"]["per_rank"][0]
        assert (got["grads_bytes"], got["optimizer_bytes"]) == (pred.grads_bytes, pred.optimizer_bytes), (mode, n)
        # FSDP2 keeps parameters sharded between steps in both modes; the prediction is the step's
        # peak (whole under optimizer), so only full's at-rest bytes are the predicted ones
        if mode == "full":
            assert got["params_bytes"] == pred.params_bytes
    for (mode, n), (r, _) in ((k, v) for k, v in _sharded(jax_runs) if k[1] != "2x2"):
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

    hw, n = catalog.get("a100-sxm4"), 8
    # two units, fc1 and fc2, of the MLP's own shapes (fp32); a gather or a reduce-scatter is half a ring all-reduce
    d_in, h, d_out = 1024, 4096, 512
    b1, b2 = 4 * (d_in * h + h), 4 * (h * d_out + d_out)
    half = (allreduce_time(b1, n, hw) + allreduce_time(b2, n, hw)) / 2
    spec = estimate.workload(__import__("models.spec", fromlist=["get_spec"]).get_spec("mlp", d_in=d_in, hidden=h, d_out=d_out))
    for gb in (8, 2**16):  # communication-bound, then compute-bound
        full, opt = (estimate.predict_step(spec, hw.id, n, gb, sharding=m) for m in ("full", "optimizer"))
        assert full.allreduce_s == pytest.approx(3 * half) and opt.allreduce_s == pytest.approx(2 * half)
        for e in (full, opt):
            first_gather = allreduce_time(b1, n, hw) / 2  # issued at the step's start: nothing hides it
            assert e.comm_s >= max(first_gather, (1 - 0.3) * e.allreduce_s) * (1 - 1e-9)
            assert e.comm_s <= e.allreduce_s * (1 + 1e-9)
    # compute-bound: all but the contention cap hides behind compute
    assert full.comm_s == pytest.approx(0.7 * full.allreduce_s)
    # communication-bound (tiny batch): the link is the step, so nearly all of it is exposed
    tiny = estimate.predict_step(spec, hw.id, n, 8, sharding="full")
    assert tiny.comm_s >= 0.9 * tiny.allreduce_s
    # per-unit latency: a deep model pays (N-1) hops per gather and per reduce-scatter of each block
    wl = estimate.workload("gpt2-xl")
    none, full = (estimate.predict_step(wl, hw.id, n, 64, sharding=m) for m in ("none", "full"))
    assert full.allreduce_s > none.allreduce_s and full.comm_s > none.comm_s  # 1.5x the bytes of an all-reduce
    assert full.compute_s < none.compute_s  # each device updates 1/N of the optimizer state
    one = estimate.predict_step(wl, hw.id, 1, 8, sharding="full")
    assert one.allreduce_s == 0 and one.step_time_s == pytest.approx(estimate.predict_step(wl, hw.id, 1, 8).step_time_s)
    from scaling.errors import UsageError

    with pytest.raises(UsageError, match=r"'zero3'.*valid: optimizer, full"):  # the API, not only the CLI, names it
        estimate.predict_step(wl, hw.id, n, 64, sharding="zero3")


def test_fsdp_units_are_the_units_the_throughput_model_prices():
    """torch's FSDP2 groups and the predictor's units come from one rule (``sharding_unit``): the
    same blocks, holding the same parameters."""
    from models.spec import get_spec
    from models.torch import build
    from scaling.sharding_torch import units
    from scaling.throughput import estimate, roofline

    for name, opts in (("resnet18", {"image_size": 32, "small": True}), ("vgg16", {"image_size": 32}), ("gpt-tiny", {})):
        spec = get_spec(name, **opts)
        groups = units(build(spec, spec.init_params(0)))
        works = estimate.workload(spec).roofline_works()
        priced = roofline.units(works, [0.0] * len(works), [0.0] * len(works), 4.0 * spec.param_count)
        assert len(groups) == len(priced), (name, len(groups), [u.name for u in priced])
        if name != "gpt-tiny":  # (gpt's position table is a root parameter in torch, part of the embedding unit in the spec)
            held = sorted(sum(p.numel() for m in g for p in m.parameters()) for g in groups)
            assert held == sorted(round(u.grad_bytes / 4) for u in priced), name
    blocks = [u.name for u in priced]
    assert blocks == ["embed", "h0", "h1", "ln_f", "head"]  # one unit per transformer block
