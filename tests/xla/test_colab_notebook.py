"""The Colab notebook, executed top to bottom on CPU in the Colab-like venv (torch 2.9 + torch_xla 2.9
+ jax 0.7 + flax 0.11), with only the install cell skipped (PODSCALE_NOTEBOOK_CI=1).

The kernel is this interpreter, registered under a private name in a temporary JUPYTER_PATH, so a
``python3`` kernelspec elsewhere on the machine cannot swap in another environment. A cell that
raises (a ``!podscale`` that exits non-zero included) fails the test through nbclient.
"""

from __future__ import annotations

import re

import json
import os
import sys
from pathlib import Path

import nbclient
import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "notebooks" / "colab_tpu.ipynb"
KERNEL = "podscale-colab-test"


def _text(cell: dict) -> str:
    parts = []
    for o in cell.get("outputs", []):
        if o.get("output_type") == "stream":
            parts.append(o["text"])
        for mime in ("text/plain", "text/html"):
            if mime in o.get("data", {}):
                parts.append(o["data"][mime])
    return "".join(parts)


@pytest.fixture(scope="module")
def executed(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, dict], Path]:
    tmp = tmp_path_factory.mktemp("colab")
    spec = tmp / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "podscale .venv-xla", "language": "python",
    }))
    work = tmp / "work"
    work.mkdir()
    env = dict(os.environ)
    for k in ("XLA_FLAGS", "JAX_PLATFORMS", "PJRT_DEVICE", "CPU_NUM_DEVICES", "TPU_ACCELERATOR_TYPE", "PODSCALE_FAULT"):
        env.pop(k, None)  # the notebook must set up the CPU devices itself
    env.update(PODSCALE_NOTEBOOK_CI="1", JUPYTER_PATH=str(tmp / "jupyter"), JUPYTER_RUNTIME_DIR=str(tmp / "runtime"),
               IPYTHONDIR=str(tmp / "ipython"), MPLBACKEND="Agg", PYDEVD_DISABLE_FILE_VALIDATION="1",
               PYTHONPATH=str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""))
    old = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = env["JUPYTER_PATH"]  # the kernelspec lookup happens in this process
    try:
        nb = nbformat.read(NOTEBOOK, as_version=4)
        client = nbclient.NotebookClient(nb, kernel_name=KERNEL, timeout=110, startup_timeout=60,
                                         resources={"metadata": {"path": str(work)}})
        client.execute(env=env, cwd=str(work))
    finally:
        if old is None:
            os.environ.pop("JUPYTER_PATH", None)
        else:
            os.environ["JUPYTER_PATH"] = old
    return {c["id"]: c for c in nb.cells}, work


def test_every_code_cell_ran(executed):
    cells, _ = executed
    code = [c for c in cells.values() if c["cell_type"] == "code"]
    assert code and all(c.get("execution_count") for c in code), [c["id"] for c in code if not c.get("execution_count")]
    assert not any(o.get("output_type") == "error" for c in code for o in c.get("outputs", []))
    assert _text(cells["install"]) == ""  # skipped by the parameter, still executed


def test_detection_said_cpu_with_emulated_devices(executed):
    cells, _ = executed
    out = _text(cells["detect"])
    assert "No accelerator" in out and "2 emulated device(s)" in out and "host-cpu" in out
    setup = _text(cells["setup"])
    assert "'CPU_NUM_DEVICES': '2'" in setup and "--xla_force_host_platform_device_count=2" in setup


def test_results_table_holds_both_backends(executed):
    cells, work = executed
    table = _text(cells["results"])
    assert "achieved TFLOPS" in table and "MFU" in table
    for backend in ("jax-pmap", "torch-xla"):
        assert backend in table
        r = json.loads((work / "runs" / f"{backend}.json").read_text())
        assert r["devices"] == 2 and r["hardware"] == "host-cpu" and r["replicas_identical"]
        assert r["mfu"] is not None and 0 < r["mfu"] and f"{r['mfu'] * 100:.1f}%" in table
    # same init, data and batch: the two frameworks train the same model to the same loss
    losses = [json.loads((work / "runs" / f"{b}.json").read_text())["losses"] for b in ("jax-pmap", "torch-xla")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)


def test_pod_prediction_and_tensorboard(executed):
    cells, _ = executed
    pred = _text(cells["predict"])
    assert "tpu-v5e" in pred and "256" in pred and "weak eff." in pred
    tb = _text(cells["tensorboard"])
    # one TensorBoard run per backend (jax-pmap's holds a second event file: its step breakdown)
    assert re.search(r"jax-pmap \([12] event file\(s\)\)", tb) and "torch-xla (1 event file(s))" in tb, tb
