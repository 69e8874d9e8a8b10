"""Where the time went on torch-xla (SPMD): the probes measure data, compute (the same compiled step
on each device's share, replicated: no gradient to reduce) and exposed communication (the training
step less that), each with the device drained; the probes leave the run's results alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import measured_breakdown, podscale

pytestmark = [pytest.mark.xla, pytest.mark.timeout(600)]

SMALL_MODEL = ("--model-opt", "d_in=32", "--model-opt", "hidden=16", "--model-opt", "d_out=4")      # 2.4 kB of gradients
BIG_MODEL = ("--model-opt", "d_in=4096", "--model-opt", "hidden=512", "--model-opt", "d_out=16")   # 8.4 MB of gradients


def _run(d: Path, name: str, devices: int, model: tuple[str, ...], *extra: str) -> dict:
    out = d / f"{name}.json"
    podscale("run", "--backend", "torch-xla", "--devices", str(devices), "--global-batch", "32", "--steps", "20",
             "--untimed-steps", "3", *model, "--json", str(out), "--quiet", *extra, timeout=300)
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    d = tmp_path_factory.mktemp("breakdown-xla")
    return {name: _run(d, name, n, model, "--probe-steps", "4")
            for name, n, model in (("big1", 1, BIG_MODEL), ("big4", 4, BIG_MODEL), ("small4", 4, SMALL_MODEL))}


def test_parts_are_measured_and_explain_the_drained_step(runs: dict[str, dict]) -> None:
    for name, r in runs.items():
        m = measured_breakdown(name, r)
        assert abs(m["unattributed_s"]) <= 0.15 * m["step_s"], (name, m)
        assert r["breakdown"]["flag"] is None


def test_exposed_communication_is_none_on_one_device_and_grows_with_gradient_bytes(runs: dict[str, dict]) -> None:
    assert runs["big1"]["breakdown"]["measured"]["comm_exposed_s"] == 0.0
    big, small = runs["big4"], runs["small4"]
    assert big["comm_bytes_per_step"] >= 16 * small["comm_bytes_per_step"]  # what the compiled steps all-reduce
    assert big["breakdown"]["measured"]["comm_exposed_s"] > small["breakdown"]["measured"]["comm_exposed_s"]


def test_probes_leave_the_training_results_alone(runs: dict[str, dict], tmp_path: Path) -> None:
    """The same run as ``small4`` without probes: the same losses and parameters."""
    a = _run(tmp_path, "a", 4, SMALL_MODEL, "--probe-steps", "0")
    b = runs["small4"]
    assert a["losses"] == b["losses"] and a["final_params_l2"] == b["final_params_l2"]
    assert a["breakdown"]["measured"] is None and b["breakdown"]["measured"]["compute_s"] > 0
