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


def test_batch_norm_per_device_and_synchronised_on_four_devices(tmp_path: Path) -> None:
    """Per-device statistics (the default) equal the split reference, ``--sync-bn`` the one-batch
    reference; each sits at least 10x closer to its own reference than the two references are to
    each other, and neither step gathers anything."""
    split, whole = reference(4), reference(1)
    for tag, flags, ref, other in (("per-device", (), split, whole), ("sync", ("--sync-bn",), whole, split)):
        result, got = _run(tmp_path, tag, "--devices", "4", *flags)
        assert result["gathered_bytes_per_step"] == 0, result.get("replication_note")
        assert "replication_note" not in result
        close(got, ref, atol=5e-4, rtol=1e-3)
        for k in ref:
            apart = float(np.abs(ref[k] - other[k]).max())
            assert float(np.abs(got[k] - ref[k]).max()) <= apart / 10 + 1e-6, (tag, k, apart)


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
