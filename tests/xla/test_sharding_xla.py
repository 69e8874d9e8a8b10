"""``--sharding`` on torch-xla SPMD (the FSDP-via-SPMD pattern): parameters (full) and Adam's state
annotated sharded on their largest dimension divisible by N; XLA's partitioner inserts the
gathers. The same step as one device with no sharding; the state per device measured from each
tensor's local shards. Runs in .venv-xla (``make test-xla``)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import podscale

# every first dimension divisible by 4: exactly 1/N per device
MODEL = ("--model-opt", "d_in=16", "--model-opt", "hidden=64", "--model-opt", "d_out=8")
COMMON = ("--backend", "torch-xla", "--steps", "6", "--untimed-steps", "1", "--global-batch", "32", "--lr", "0.01",
          "--probe-steps", "0", *MODEL, "--quiet")
WHOLE_PARAMS = 4 * (16 * 64 + 64 + 64 * 8 + 8)


def _run(tmp, name, *args):
    podscale("run", *COMMON, *args, "--json", str(tmp / f"{name}.json"), "--params-out", str(tmp / f"{name}.npz"),
             env={"PJRT_DEVICE": "CPU"}, timeout=300)
    return json.loads((tmp / f"{name}.json").read_text()), dict(np.load(tmp / f"{name}.npz"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sharding-xla")
    out = {"ref": _run(tmp, "ref", "--devices", "1")}
    for mode, n in (("full", 2), ("optimizer", 4)):  # both modes, both counts
        out[(mode, n)] = _run(tmp, f"{mode}{n}", "--devices", str(n), "--sharding", mode)
    return out


def test_sharded_spmd_equals_one_device_with_the_state_split(runs):
    ref, ref_params = runs["ref"]
    assert ref["memory"]["per_device"] == [{"params_bytes": WHOLE_PARAMS, "optimizer_bytes": 2 * WHOLE_PARAMS}]
    for (mode, n), (r, params) in ((k, v) for k, v in runs.items() if k != "ref"):
        assert r["sharding"] == mode and r["replicas_identical"], (mode, n)
        np.testing.assert_allclose(r["losses"], ref["losses"], rtol=1e-5, err_msg=f"{mode} x {n}")
        for k in ref_params:
            np.testing.assert_allclose(params[k], ref_params[k], rtol=1e-5, atol=1e-7, err_msg=f"{mode} x {n}: {k}")
        want = {"params_bytes": WHOLE_PARAMS // n if mode == "full" else WHOLE_PARAMS, "optimizer_bytes": 2 * WHOLE_PARAMS // n}
        assert r["memory"]["per_device"] == [want] * n, (mode, n, r["memory"]["per_device"])


def test_resume_on_another_device_count(runs, tmp_path):
    straight, straight_params = runs[("full", 2)]  # uninterrupted, 6 steps on 2 devices
    ck = str(tmp_path / "ck")
    podscale("run", *COMMON, "--devices", "4", "--sharding", "full", "--steps", "3", "--checkpoint-dir", ck,
             env={"PJRT_DEVICE": "CPU"}, timeout=300)
    resumed, resumed_params = _run(tmp_path, "resumed", "--devices", "2", "--sharding", "full", "--checkpoint-dir", ck, "--resume")
    assert resumed["resumed_from_step"] == 3
    np.testing.assert_allclose(resumed["losses"], straight["losses"], rtol=1e-5)
    for k in straight_params:
        np.testing.assert_allclose(resumed_params[k], straight_params[k], rtol=1e-5, atol=1e-7, err_msg=k)


def test_sharding_needs_the_spmd_launcher():
    p = podscale("run", "--backend", "torch-xla", "--launcher", "torchrun", "--devices", "2", "--sharding", "full",
                 check=False, env={"PJRT_DEVICE": "CPU"}, timeout=60)
    assert p.returncode == 2 and "use --launcher spmd" in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
