"""torch-xla on CPU PJRT: data-parallel equivalence, cross-backend agreement, the compiled all-reduce.

Runs in .venv-xla only (``make test-xla``). Every run goes through the real CLI in a subprocess:
the XLA device count is fixed per process (CPU_NUM_DEVICES). The reference loop shares no code
with podscale: it reads the same .npz files and applies the textbook update.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from models.spec import get_spec
from scaling.backends import xla_hlo
from tests.mlp_reference import plain_loop, write_inputs
from tests.conftest import podscale

D_IN, H, D_OUT = 20, 16, 3
GLOBAL_BATCH, STEPS, N_SAMPLES, LR = 32, 5, 80, 0.05
MODEL_OPTS = ["--model-opt", f"d_in={D_IN}", "--model-opt", f"hidden={H}", "--model-opt", f"d_out={D_OUT}"]
#: devices -> (optimizer, loss reduction, lr): every N, and both of each, are covered. SGD on the
#: summed loss takes a smaller step: at LR it diverges (inf by step 5), which fit stops with exit 4
CASES = {1: ("sgd", "mean", LR), 2: ("adam", "sum", LR), 4: ("sgd", "mean", LR), 8: ("sgd", "sum", 0.005)}
SPEC = get_spec("mlp", d_in=D_IN, hidden=H, d_out=D_OUT)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_inputs(tmp_path_factory.mktemp("xla-inputs"), D_IN, H, D_OUT, N_SAMPLES, seed=7)


class Runs:
    """Each configuration runs once per module; several tests read the same run."""

    def __init__(self, inputs: Path, root: Path):
        self.inputs, self.root, self.done = inputs, root, {}

    def get(self, backend: str, devices: int, launcher: str = "spmd", dump: bool = False) -> tuple[dict, dict, Path]:
        key = (backend, devices, launcher)
        if key not in self.done:
            out = self.root / f"{backend}-{devices}-{launcher}"
            out.mkdir()
            opt, red, lr = CASES[devices]
            extra = ["--launcher", launcher] if backend == "torch-xla" else []
            env = {"XLA_FLAGS": f"--xla_dump_to={out / 'dump'}"} if dump else None
            podscale("run", "--backend", backend, "--devices", str(devices), "--global-batch", str(GLOBAL_BATCH),
                     "--steps", str(STEPS), "--untimed-steps", "1", "--lr", str(lr), "--optimizer", opt,
                     "--loss-reduction", red, *MODEL_OPTS, "--data", str(self.inputs / "data.npz"),
                     "--init", str(self.inputs / "init.npz"), "--json", str(out / "r.json"),
                     "--params-out", str(out / "p.npz"), "--quiet", *extra, env=env, timeout=150)
            with np.load(out / "p.npz") as z:
                params = {k: z[k] for k in z.files}
            self.done[key] = (json.loads((out / "r.json").read_text()), params, out / "dump")
        return self.done[key]


@pytest.fixture(scope="module")
def runs(inputs: Path, tmp_path_factory: pytest.TempPathFactory) -> Runs:
    return Runs(inputs, tmp_path_factory.mktemp("xla-runs"))


def reference(inputs: Path, optimizer: str, reduction: str, lr: float) -> tuple[list[float], dict[str, np.ndarray]]:
    """One process, one device, the whole global batch: relu MLP, squared error."""
    return plain_loop(inputs, STEPS, GLOBAL_BATCH, lr, optimizer, reduction)


@pytest.mark.xla
@pytest.mark.parametrize("devices", sorted(CASES))
def test_spmd_equals_single_device_loop(runs: Runs, inputs: Path, devices: int) -> None:
    result, params, _ = runs.get("torch-xla", devices, dump=True)
    ref_losses, ref_params = reference(inputs, *CASES[devices])
    np.testing.assert_allclose(result["losses"], ref_losses, rtol=1e-5)
    assert ref_losses[-1] != pytest.approx(ref_losses[0], rel=1e-3)  # the run really trained
    for k, v in ref_params.items():
        np.testing.assert_allclose(params[k], v, rtol=1e-5, atol=1e-7, err_msg=k)
    assert result["replicas_identical"] is True
    assert result["processes"] == 1 and result["devices"] == devices
    assert result["versions"]["torch_xla"].startswith("2.9")
    assert len(result["step_times_s"]) == STEPS and result["step_time_s"] > 0


@pytest.mark.xla
@pytest.mark.parametrize("devices", [1, 4, 8])
def test_compiled_step_all_reduces_the_gradient_bytes(runs: Runs, devices: int) -> None:
    """The all-reduce exists only after SPMD partitioning: read it from XLA's own dump."""
    result, _, dump = runs.get("torch-xla", devices, dump=True)
    cost = xla_hlo.train_step_cost(dump)
    assert cost is not None, f"no optimized module with a matmul in {dump}"
    text = (dump / cost.module).read_text()
    grads = [b for b in cost.all_reduce_bytes if b > 4]
    if devices == 1:
        assert cost.all_reduce_bytes == [] and "all-reduce" not in text  # nothing to reduce on one device
    else:
        assert sum(grads) == SPEC.grad_bytes()
        assert cost.comm_bytes - sum(grads) == 4  # plus the one f32 loss, nothing else
        assert re.search(rf"replica_groups=\{{\{{{','.join(map(str, range(devices)))}\}}\}}", text)
    assert result["comm_bytes_per_step"] == cost.comm_bytes
    # the compiled matmuls of the step are exactly the model FLOPs of the spec (MLP: no recompute)
    assert result["xla_flops_per_step"] == result["model_flops_per_step"] == SPEC.train_flops_per_sample * GLOBAL_BATCH


@pytest.mark.xla
def test_same_losses_as_torch_ddp(runs: Runs) -> None:
    xla, xla_params, _ = runs.get("torch-xla", 2, dump=True)
    ddp, ddp_params, _ = runs.get("torch-ddp", 2)
    np.testing.assert_allclose(xla["losses"], ddp["losses"], rtol=1e-4)
    for k in ddp_params:
        np.testing.assert_allclose(xla_params[k], ddp_params[k], rtol=1e-4, atol=1e-6, err_msg=k)


@pytest.mark.xla
def test_torchrun_two_processes_same_results(runs: Runs, inputs: Path) -> None:
    result, params, _ = runs.get("torch-xla", 2, launcher="torchrun")
    ref_losses, ref_params = reference(inputs, *CASES[2])
    np.testing.assert_allclose(result["losses"], ref_losses, rtol=1e-5)
    for k, v in ref_params.items():
        np.testing.assert_allclose(params[k], v, rtol=1e-5, atol=1e-7, err_msg=k)
    assert result["processes"] == 2 and result["replicas_identical"] is True
    assert result["backend_info"]["launcher"] == "torchrun"
    assert result["comm_bytes_per_step"] == SPEC.grad_bytes()


@pytest.mark.xla
def test_xmp_on_one_cpu_device_trains(runs: Runs, inputs: Path) -> None:
    """torch_xla's own spawn works with a single CPU device (the broken case is several)."""
    result, params, _ = runs.get("torch-xla", 1, launcher="xmp")
    ref_losses, ref_params = reference(inputs, *CASES[1])
    np.testing.assert_allclose(result["losses"], ref_losses, rtol=1e-5)
    for k, v in ref_params.items():
        np.testing.assert_allclose(params[k], v, rtol=1e-5, atol=1e-7, err_msg=k)
    assert result["backend_info"]["launcher"] == "xmp" and result["replicas_identical"] is True


@pytest.mark.xla
def test_xmp_on_several_cpu_devices_is_refused_with_the_reason() -> None:
    p = podscale("run", "--backend", "torch-xla", "--launcher", "xmp", "--devices", "2", "--steps", "3",
                 env={"PJRT_DEVICE": "CPU"}, check=False, timeout=60)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr
    assert "pytorch/xla#9089" in lines[0] and "--launcher spmd" in lines[0] and "--launcher torchrun" in lines[0]


@pytest.mark.xla
def test_divergence_exits_4_naming_the_step(inputs: Path) -> None:
    """The zoo's torch-xla run trains in fit's loop: a non-finite loss stops it as on every backend."""
    p = podscale("run", "--backend", "torch-xla", "--devices", "2", "--global-batch", str(GLOBAL_BATCH), "--steps", str(STEPS),
                 "--lr", str(LR), "--optimizer", "sgd", "--loss-reduction", "sum", *MODEL_OPTS, "--data", str(inputs / "data.npz"),
                 "--init", str(inputs / "init.npz"), "--quiet", check=False, timeout=150)
    assert p.returncode == 4, p.stderr
    assert "non-finite loss" in p.stderr and f"at step {STEPS - 1}" in p.stderr, p.stderr
