"""torch-ddp end to end: data-parallel equivalence against a hand-written single-process loop.

The reference below shares no code with podscale: it reads the same .npz files and applies the
textbook update, so a bug in podscale's sharding, loss scaling or optimizer wiring shows up here.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from tests.conftest import podscale

D_IN, H, D_OUT = 20, 16, 3
GLOBAL_BATCH, STEPS, N_SAMPLES = 32, 6, 80


def _write_inputs(tmp_path):
    rng = np.random.default_rng(123)
    x = rng.standard_normal((N_SAMPLES, D_IN)).astype(np.float32)
    y = rng.standard_normal((N_SAMPLES, D_OUT)).astype(np.float32)
    init = {
        "w1": (rng.standard_normal((D_IN, H)) * 0.3).astype(np.float32),
        "b1": (rng.standard_normal(H) * 0.1).astype(np.float32),
        "w2": (rng.standard_normal((H, D_OUT)) * 0.3).astype(np.float32),
        "b2": (rng.standard_normal(D_OUT) * 0.1).astype(np.float32),
    }
    np.savez(tmp_path / "data.npz", x=x, y=y)
    np.savez(tmp_path / "init.npz", **init)
    return x, y, init


def reference(x, y, init, steps, lr, optimizer, reduction):
    """Plain single-process loop: global batch s is samples (s*B + i) mod n, i < B."""
    p = {k: torch.tensor(v, dtype=torch.float32, requires_grad=True) for k, v in init.items()}
    opt = torch.optim.Adam(p.values(), lr=lr) if optimizer == "adam" else torch.optim.SGD(p.values(), lr=lr)
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    losses = []
    for s in range(steps):
        idx = (torch.arange(GLOBAL_BATCH) + s * GLOBAL_BATCH) % len(xs)
        xb, yb = xs[idx], ys[idx]
        pred = (xb @ p["w1"] + p["b1"]).clamp(min=0) @ p["w2"] + p["b2"]
        err = ((pred - yb) ** 2).sum()
        loss = err / (GLOBAL_BATCH * D_OUT) if reduction == "mean" else err
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, {k: v.detach().numpy() for k, v in p.items()}


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
    x, y, init = _write_inputs(tmp_path)
    ref_losses, ref_params = reference(x, y, init, STEPS, 0.01, optimizer, reduction)
    res, params = _run(tmp_path, devices, optimizer, reduction)
    assert res["devices"] == devices and res["processes"] == devices
    np.testing.assert_allclose(res["losses"], ref_losses, rtol=1e-5)
    for k in ref_params:
        np.testing.assert_allclose(params[k], ref_params[k], rtol=1e-5, atol=1e-7)
    assert res["replicas_identical"] is True
    assert math.isclose(res["final_params_l2"], math.sqrt(sum(float((v.astype(np.float64) ** 2).sum()) for v in params.values())), rel_tol=1e-9)
