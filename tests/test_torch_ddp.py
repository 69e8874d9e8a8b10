"""torch-ddp end to end: data-parallel equivalence against a hand-written single-process loop.

The reference (``tests/mlp_reference.py``) shares no code with podscale: it reads the same .npz
files and applies the textbook update, so a bug in podscale's batch split, loss scaling or
optimizer wiring shows up here.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from tests.conftest import podscale
from tests.mlp_reference import plain_loop, write_inputs

D_IN, H, D_OUT = 20, 16, 3
GLOBAL_BATCH, STEPS, N_SAMPLES = 32, 6, 80


def _write_inputs(tmp_path):
    write_inputs(tmp_path, D_IN, H, D_OUT, N_SAMPLES, seed=123)


def reference(steps, lr, optimizer, reduction, inputs):
    return plain_loop(inputs, steps, GLOBAL_BATCH, lr, optimizer, reduction)


def _run(tmp_path, devices, optimizer, reduction, extra=()):
    out = tmp_path / f"r{devices}{optimizer}{reduction}"
    podscale("run", "--backend", "torch-ddp", "--devices", str(devices), "--global-batch", str(GLOBAL_BATCH),
             "--steps", str(STEPS), "--untimed-steps", "1", "--lr", "0.01", "--optimizer", optimizer,
             "--loss-reduction", reduction, "--data", str(tmp_path / "data.npz"), "--init", str(tmp_path / "init.npz"),
             "--model-opt", f"d_in={D_IN}", "--model-opt", f"hidden={H}", "--model-opt", f"d_out={D_OUT}",
             "--json", str(out.with_suffix(".json")), "--params-out", str(out.with_suffix(".npz")), "--quiet", *extra)
    res = json.loads(out.with_suffix(".json").read_text())
    with np.load(out.with_suffix(".npz")) as z:
        params = {k: z[k] for k in z.files}
    return res, params


@pytest.mark.slow
@pytest.mark.parametrize("devices", [1, 2, 4, 8])
@pytest.mark.parametrize("optimizer,reduction", [("sgd", "mean"), ("adam", "sum")])
def test_data_parallel_equivalence(tmp_path, devices, optimizer, reduction):
    _write_inputs(tmp_path)
    ref_losses, ref_params = reference(STEPS, 0.01, optimizer, reduction, tmp_path)
    res, params = _run(tmp_path, devices, optimizer, reduction)
    assert res["devices"] == devices and res["processes"] == devices
    np.testing.assert_allclose(res["losses"], ref_losses, rtol=1e-5)
    for k in ref_params:
        np.testing.assert_allclose(params[k], ref_params[k], rtol=1e-5, atol=1e-7)
    assert res["replicas_identical"] is True
    assert math.isclose(res["final_params_l2"], math.sqrt(sum(float((v.astype(np.float64) ** 2).sum()) for v in params.values())), rel_tol=1e-9)
