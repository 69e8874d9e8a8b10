"""The torch training API on torch-xla (SPMD over CPU PJRT devices), in .venv-xla: example (a),
unchanged, equals a plain torch 2.9 loop written here."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import ROOT, podscale

EXAMPLE = ROOT / "examples" / "digits_cnn.py"
STEPS, GB = 6, 64


def plain_loop() -> tuple[list[float], dict[str, np.ndarray]]:
    spec = importlib.util.spec_from_file_location("digits_cnn_example", EXAMPLE)
    ex = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ex)  # type: ignore[union-attr]
    x, y, _, _ = ex.digits()
    torch.manual_seed(0)
    model = ex.DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for step in range(STEPS):
        idx = np.random.default_rng([0, 0]).permutation(len(x))[step * GB : (step + 1) * GB]
        loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(x[idx])), torch.from_numpy(y[idx]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, {k: v.detach().numpy() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("devices", [1, 4])
def test_example_a_on_torch_xla_equals_a_plain_torch_loop(tmp_path: Path, devices: int) -> None:
    podscale("run", str(EXAMPLE), "--backend", "torch-xla", "--devices", str(devices), "--global-batch", str(GB),
             "--steps", str(STEPS), "--json", str(tmp_path / "r.json"), "--params-out", str(tmp_path / "p.npz"), "--quiet")
    result = json.loads((tmp_path / "r.json").read_text())
    ref_losses, ref_params = plain_loop()
    np.testing.assert_allclose(result["losses"], ref_losses, rtol=1e-5)
    with np.load(tmp_path / "p.npz") as z:
        for k, v in ref_params.items():
            np.testing.assert_allclose(z[k], v, rtol=1e-5, atol=1e-6, err_msg=k)
    assert result["backend"] == "torch-xla" and result["model"] == "DigitsCNN"
    # the closed form of tests/test_train_api.py: one SPMD program over the global batch
    conv1, conv2, fc = 8 * 8 * 16 * 9, 4 * 4 * 32 * 9 * 16, 512 * 10
    assert result["model_flops_per_step"] == GB * (4 * (conv1 + conv2 + fc) + 2 * (conv2 + fc))
    assert result["device_syncs"] >= 1
