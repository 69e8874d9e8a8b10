"""Batch and layer norm under torch-xla SPMD stay data parallel, and mean what they mean on the
other backends (README: batch norm under data parallelism). torch_xla lowers both norms to XLA's
batch-norm-training op, which the partitioner cannot split along the batch: without
``scaling.partitionable_norms`` the compiled step all-gathers the activations and runs the model on
the whole global batch on every device (ResNet-18 at N = 4: 7.6x one device's step for 4x the
samples). The compiled step is read from XLA's own dump (the run's ``gathered_bytes_per_step``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.bn_reference import close, reference, run_args
from tests.conftest import podscale

pytestmark = [pytest.mark.xla, pytest.mark.timeout(600)]


def _run(tmp_path: Path, tag: str, *flags: str) -> tuple[dict, dict[str, np.ndarray]]:
    out, js = tmp_path / f"{tag}.npz", tmp_path / f"{tag}.json"
    podscale(*run_args("--backend", "torch-xla", "--params-out", str(out), "--json", str(js), *flags), timeout=300)
    with np.load(out) as z:
        return json.loads(js.read_text()), {k: z[k] for k in z.files}


def test_batch_norm_per_device_on_four_devices(tmp_path: Path) -> None:
    """Per-device statistics (the default) equal the split reference, at least 10x closer to it than
    to the one-batch reference, and the step gathers nothing. (``--sync-bn``'s statistics over the
    whole batch are the same module with one group: tests/test_partitionable_norms.py.)"""
    split, whole = reference(4), reference(1)
    result, got = _run(tmp_path, "per-device", "--devices", "4")
    assert result["gathered_bytes_per_step"] == 0, result.get("replication_note")
    assert "replication_note" not in result
    close(got, split, atol=5e-4, rtol=1e-3)
    for k in split:
        apart = float(np.abs(split[k] - whole[k]).max())
        assert float(np.abs(got[k] - split[k]).max()) <= apart / 10 + 1e-6, (k, apart)


def test_layer_norm_model_gathers_nothing(tmp_path: Path) -> None:
    """gpt-tiny (pre-LayerNorm blocks) at N = 4: the step all-reduces its gradients and gathers
    nothing; its losses are the one-device run's (layer norm has no batch statistics)."""
    args = ["run", "--backend", "torch-xla", "--model", "gpt-tiny", "--model-opt", "layers=1", "--model-opt", "d_model=32",
            "--model-opt", "seq_len=16", "--steps", "3", "--untimed-steps", "0", "--global-batch", "8", "--quiet"]
    got = {}
    for n in (1, 4):
        js = tmp_path / f"gpt{n}.json"
        podscale(*args, "--devices", str(n), "--json", str(js), timeout=300)
        got[n] = json.loads(js.read_text())
    assert got[4]["gathered_bytes_per_step"] == 0, got[4].get("replication_note")
    assert got[4]["comm_bytes_per_step"] > 0  # the gradients are still all-reduced
    np.testing.assert_allclose(got[4]["losses"], got[1]["losses"], rtol=1e-5)
