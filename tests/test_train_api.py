"""The torch training API on the user's own model (examples/digits_cnn.py, not in the zoo), run as
a user runs it: ``podscale run examples/digits_cnn.py --devices N``. References are plain loops."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import ROOT, podscale
from scaling.tensorboard import read_scalars

pytestmark = pytest.mark.slow
EXAMPLE = ROOT / "examples" / "digits_cnn.py"
STEPS, GB = 26, 64  # 1,437 training images: 22 steps per epoch, so the run crosses an epoch boundary


def example_module():
    spec = importlib.util.spec_from_file_location("digits_cnn_example", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def plain_loop(steps: int, gb: int, seed: int = 0, lr: float = 1e-3) -> tuple[list[float], dict[str, np.ndarray]]:
    """One process, one device, no podscale: the documented order is np.random.default_rng([seed, epoch])."""
    ex = example_module()
    x, y, _, _ = ex.digits()
    torch.manual_seed(seed)
    model = ex.DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    per_epoch = len(x) // gb
    losses = []
    for step in range(steps):
        epoch, pos = divmod(step, per_epoch)
        idx = np.random.default_rng([seed, epoch]).permutation(len(x))[pos * gb : (pos + 1) * gb]
        loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(x[idx])), torch.from_numpy(y[idx]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, {k: v.detach().numpy() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, tuple[dict, dict, Path]]:
    out = {}
    for n in (1, 2, 4):
        d = tmp_path_factory.mktemp(f"api{n}")
        podscale("run", str(EXAMPLE), "--devices", str(n), "--global-batch", str(GB), "--steps", str(STEPS),
                 "--json", str(d / "r.json"), "--params-out", str(d / "p.npz"), "--logdir", str(d / "tb"), "--quiet")
        with np.load(d / "p.npz") as z:
            out[n] = (json.loads((d / "r.json").read_text()), {k: z[k] for k in z.files}, d)
    return out


@pytest.fixture(scope="module")
def reference() -> tuple[list[float], dict[str, np.ndarray]]:
    return plain_loop(STEPS, GB)


@pytest.mark.parametrize("n", [1, 2, 4])
def test_data_parallel_equals_a_plain_loop(runs, reference, n: int) -> None:
    result, params, _ = runs[n]
    ref_losses, ref_params = reference
    assert result["replicas_identical"] is True and result["processes"] == n
    np.testing.assert_allclose(result["losses"], ref_losses, rtol=1e-5)
    assert set(params) == set(ref_params)
    for k in ref_params:
        np.testing.assert_allclose(params[k], ref_params[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_flops_of_the_step_equal_the_closed_form(runs) -> None:
    """conv 1->16 3x3 on 8x8, conv 16->32 3x3/2 to 4x4, linear 512->10; 2 FLOPs per multiply-add;
    backward = weight gradients of every layer + input gradients of all but the first."""
    conv1 = 8 * 8 * 16 * (3 * 3 * 1)
    conv2 = 4 * 4 * 32 * (3 * 3 * 16)
    fc = 512 * 10
    per_sample = 2 * (conv1 + conv2 + fc) + 2 * (conv1 + conv2 + fc) + 2 * (conv2 + fc)
    for n, (result, _, _) in runs.items():
        assert result["model_flops_per_step"] == GB * per_sample, n
        assert result["flops_per_device"] == [GB // n * per_sample] * n
        assert result["achieved_flops"] == pytest.approx(result["model_flops_per_step"] / result["step_time_s"])
        if result["peak_flops"]:
            assert result["mfu"] == pytest.approx(result["achieved_flops"] / result["peak_flops"])
        ops = result["op_record"]["by_op"]
        assert {"convolution", "convolution_backward", "addmm", "mm"} <= set(ops)
        assert result["op_record"]["optimizer"] == "adam"  # the script's own torch.optim.Adam: its update is priced
        # the forward op by op, as the host predictor prices it: each matmul's GEMM (rows, K, N), the
        # ReLUs by their outputs, no view (flatten), no loss op; the backward's matmul FLOPs in one sum
        rec, b = result["op_record"], GB // n
        assert [(x["kind"], x["m"], x["k"], x["n"], x["count"]) for x in rec["layers"] if x["fwd_flops"]] == [
            ("conv", b * 8 * 8, 9 * 1, 16, 1), ("conv", b * 4 * 4, 9 * 16, 32, 1), ("dense", b, 512, 10, 1)]
        assert [(x["kind"], x["elems"]) for x in rec["layers"] if not x["fwd_flops"]] == [
            ("eltwise", b * 16 * 8 * 8), ("eltwise", b * 32 * 4 * 4)]
        assert rec["backward_gemm_flops"] == b * (2 * (conv1 + conv2 + fc) + 2 * (conv2 + fc)) and rec["batch"] == b


def test_gradient_bytes_come_from_ddp(runs) -> None:
    result, params, _ = runs[2]
    grad_bytes = sum(v.size * 4 for k, v in params.items())
    assert result["comm_bytes_per_step"] == [grad_bytes, grad_bytes]


def test_user_scalars_and_report_reach_tensorboard_and_json(runs) -> None:
    result, _, d = runs[2]
    (run,) = (d / "tb").iterdir()  # the run's own subfolder, named after the script
    assert run.name.startswith("torch-ddp-digits_cnn-2dev-")
    scalars = read_scalars(run)
    assert [v for _, v in scalars["test_accuracy"]] == [pytest.approx(result["accuracy"])]
    assert len(scalars["loss"]) == STEPS
    assert 0.5 < result["accuracy"] <= 1.0


def test_kill_and_resume_gives_the_uninterrupted_parameters(runs, tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    args = ["run", str(EXAMPLE), "--devices", "2", "--global-batch", str(GB), "--steps", str(STEPS),
            "--checkpoint-dir", str(ck), "--checkpoint-every", "5", "--params-out", str(tmp_path / "p.npz"),
            "--json", str(tmp_path / "r.json"), "--quiet"]
    env = {"PODSCALE_FAULT": "1:12", "PODSCALE_FAULT_ONCE": str(tmp_path / "fired")}
    died = podscale(*args, env=env, check=False)
    assert died.returncode == 3 and "rank 1 was killed by SIGKILL at step 12" in died.stderr
    podscale(*args, "--resume", env=env)
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["resumed_from_step"] == 10
    uninterrupted, params_u, _ = runs[2]
    assert result["losses"] == uninterrupted["losses"]
    with np.load(tmp_path / "p.npz") as z:
        for k in params_u:
            assert np.array_equal(z[k], params_u[k]), k


# ---- bad input and the user's own failures ------------------------------------------------------

SCRIPT = '''
import numpy as np, torch, podscale.torch as ps
run = ps.init()
x = np.random.default_rng(0).normal(size=(256, 4)).astype("float32")
y = (x.sum(1) > 0).astype("int64")
model = torch.nn.Linear(4, 2)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
{body}
'''


def write(tmp_path: Path, body: str, name: str = "train.py") -> Path:
    p = tmp_path / name
    p.write_text(SCRIPT.format(body=body))
    return p


def one_line(p) -> str:
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    return lines[0]


@pytest.mark.parametrize("body,needle", [
    ("ps.fit(model, opt, torch.nn.CrossEntropyLoss(reduction='none'), (x, y), steps=3)",
     "loss_fn returned a tensor of shape (32,); it must return a scalar"),
    ("ps.fit(model, opt, torch.nn.BCEWithLogitsLoss(), (x, y.astype('float32')), steps=3)",
     "the loss cannot take the model's output: loss_fn(tensor of shape (32, 2), tensor of shape (32,)) raised ValueError: Target size"),
    ("ps.fit(model, opt, torch.nn.CrossEntropyLoss(), (x[:20], y[:20]), steps=3)",
     "the dataset has 20 samples, fewer than one global batch of 64"),
])
def test_bad_input_in_the_script_exits_2_with_one_line(tmp_path: Path, body: str, needle: str) -> None:
    p = podscale("run", str(write(tmp_path, body)), "--devices", "2", check=False)
    assert p.returncode == 2, p.stderr
    assert needle in one_line(p)


def test_bad_input_before_anything_starts(tmp_path: Path) -> None:
    p = podscale("run", str(tmp_path / "missing.py"), check=False)
    assert p.returncode == 2 and "missing.py': no such file" in one_line(p)
    p = podscale("run", str(write(tmp_path, "")), "--devices", "4", "--global-batch", "30", check=False)
    assert p.returncode == 2 and "--global-batch 30 does not divide evenly over --devices 4" in one_line(p)


def test_an_exception_in_user_code_exits_1_with_their_traceback_and_rank(tmp_path: Path) -> None:
    body = '''
class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 2)
    def forward(self, x):
        if ps.session().rank == 1 and ps.session().step == 2:
            raise ValueError("boom in forward")
        return self.lin(x)
model = Net()
opt = torch.optim.SGD(model.parameters(), lr=0.1)
ps.fit(model, opt, torch.nn.CrossEntropyLoss(), (x, y), steps=5)
'''
    p = podscale("run", str(write(tmp_path, body)), "--devices", "2", check=False)
    assert p.returncode == 1, p.stderr
    assert 'train.py", line' in p.stderr and "in forward" in p.stderr and "ValueError: boom in forward" in p.stderr
    assert p.stderr.strip().splitlines()[-1] == "podscale run: your code failed: rank 1 raised ValueError: boom in forward"
    assert "scaling/" not in p.stderr and "runpy" not in p.stderr  # their frames, not the launcher's


def test_a_non_finite_loss_exits_4_naming_the_step(tmp_path: Path) -> None:
    body = "ps.fit(model, opt, lambda o, t: torch.nn.functional.cross_entropy(o, t) * (1e39 if ps.session().step >= 3 else 1), (x, y), steps=6)"
    p = podscale("run", str(write(tmp_path, body)), check=False)
    assert p.returncode == 4, p.stderr
    assert "non-finite loss (inf) at step 3" in one_line(p)


def test_a_users_models_and_scaling_modules_beside_the_script_are_theirs(tmp_path: Path) -> None:
    (tmp_path / "models.py").write_text("import torch\nclass Net(torch.nn.Linear):\n    def __init__(self):\n        super().__init__(4, 2)\n")
    (tmp_path / "scaling.py").write_text("FACTOR = 0.1\n")
    body = "import sys\nfrom models import Net\nimport scaling\nmodel = Net()\nopt = torch.optim.SGD(model.parameters(), lr=scaling.FACTOR)\n" \
           "ps.report(argv=sys.argv[1:])\nps.fit(model, opt, torch.nn.CrossEntropyLoss(), (x, y), steps=4)"
    write(tmp_path, body)
    # the way a user runs it: the installed `podscale` command, from the script's directory; what
    # follows -- is the script's own argv
    cmd = [str(Path(sys.executable).with_name("podscale")), "run", "train.py", "--devices", "2", "--json", "r.json", "--quiet",
           "--", "--epochs", "3", "x"]
    p = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=240,
                       env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert p.returncode == 0, p.stderr
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["model"] == "Net" and result["replicas_identical"] and math.isfinite(result["losses"][-1])
    assert result["argv"] == ["--epochs", "3", "x"]


@pytest.mark.parametrize("index,backend", [(0, "torch-ddp"), (1, "jax-sharded")])
def test_the_readme_scripts_run_as_the_readme_says(tmp_path: Path, index: int, backend: str) -> None:
    import re

    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Train your own model"):]
    script = re.findall(r"```python\n(.*?)```", section, re.S)[index]
    (tmp_path / "train.py").write_text(script)
    podscale("run", str(tmp_path / "train.py"), "--backend", backend, "--devices", "2", "--steps", "8",
             "--json", str(tmp_path / "r.json"), "--quiet")
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["losses"][-1] < result["losses"][0] and result["replicas_identical"]
    assert result["model_flops_per_step"] > 0 and result["mfu"] is not None
