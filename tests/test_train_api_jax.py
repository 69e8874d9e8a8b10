"""The JAX training API on the user's own model (examples/digits_cnn_jax.py) and example (c), run
as a user runs them. The reference is a plain single-device optax loop written here."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT, podscale

pytestmark = pytest.mark.slow
EXAMPLE = ROOT / "examples" / "digits_cnn_jax.py"
STEPS, GB = 24, 64  # 22 steps per epoch: the run crosses an epoch boundary
#: 1/2/4/8 devices in one process and 2 processes x 2 devices, each backend in both shapes
LAYOUTS = [("jax-sharded", 1, 1), ("jax-sharded", 2, 1), ("jax-pmap", 4, 1), ("jax-sharded", 8, 1),
           ("jax-sharded", 4, 2), ("jax-pmap", 4, 2)]


def plain_loop(steps: int = STEPS) -> tuple[list[float], dict[str, np.ndarray]]:
    import jax
    import optax
    from flax import nnx

    spec = importlib.util.spec_from_file_location("digits_cnn_jax_example", EXAMPLE)
    ex = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ex)  # type: ignore[union-attr]
    x, y, _, _ = ex.digits()
    model = ex.DigitsCNN(nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    tx = optax.adam(1e-3)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, xb, yb):
        def f(p):
            logits = nnx.merge(graphdef, p)(xb)
            return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
        loss, g = jax.value_and_grad(f)(params)
        upd, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, upd), opt, loss

    losses, per_epoch = [], len(x) // GB
    for s in range(steps):
        epoch, pos = divmod(s, per_epoch)
        idx = np.random.default_rng([0, epoch]).permutation(len(x))[pos * GB : (pos + 1) * GB]
        params, opt, loss = step(params, opt, x[idx], y[idx])
        losses.append(float(loss))
    flat = {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(params)}
    return losses, flat


@pytest.fixture(scope="module")
def reference():
    return plain_loop()


@pytest.mark.parametrize("backend,devices,processes", LAYOUTS)
def test_data_parallel_equals_a_plain_single_device_loop(reference, tmp_path: Path, backend: str, devices: int, processes: int) -> None:
    podscale("run", str(EXAMPLE), "--backend", backend, "--devices", str(devices), "--processes", str(processes),
             "--global-batch", str(GB), "--steps", str(STEPS), "--optimizer", "adam",
             "--json", str(tmp_path / "r.json"), "--params-out", str(tmp_path / "p.npz"), "--quiet")
    result = json.loads((tmp_path / "r.json").read_text())
    ref_losses, ref_params = reference
    assert result["replicas_identical"] is True and result["processes"] == processes
    np.testing.assert_allclose(result["losses"], ref_losses, rtol=1e-5)
    with np.load(tmp_path / "p.npz") as z:
        got = {k: z[k] for k in z.files}
    assert len(got) == len(ref_params)
    for (k, v), ref in zip(sorted(got.items()), [ref_params[k] for k in sorted(ref_params)]):
        np.testing.assert_allclose(v, ref, rtol=1e-5, atol=1e-6, err_msg=k)
    # FLOPs and all-reduce bytes of the compiled step that ran
    assert result["model_flops_per_step"] > 0 and result["op_record"]["source"].startswith("XLA cost analysis")
    if devices > 1 and processes == 1:
        grad_bytes = result["grad_bytes"]
        assert grad_bytes <= result["comm_bytes_per_step"][0] <= grad_bytes + 64
    assert result["accuracy"] > 0.3


@pytest.mark.parametrize("backend,devices,processes", [("jax-sharded", 2, 1), ("jax-pmap", 4, 2)])
def test_the_flax_language_model_ends_below_the_unigram_entropy(tmp_path: Path, backend: str, devices: int, processes: int) -> None:
    podscale("run", str(ROOT / "examples" / "flax_lm.py"), "--backend", backend, "--devices", str(devices),
             "--processes", str(processes), "--global-batch", "16", "--steps", "30", "--lr", "3e-3", "--optimizer", "adam",
             "--json", str(tmp_path / "r.json"), "--quiet")
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["final_loss"] == result["losses"][-1] < result["unigram_entropy"] < result["losses"][0]
    assert 3.0 < result["unigram_entropy"] < 3.3  # bytes of English prose: ~4.5 bits


def test_a_torch_script_on_a_jax_backend_is_refused_in_one_line(tmp_path: Path) -> None:
    p = podscale("run", str(ROOT / "examples" / "digits_cnn.py"), "--backend", "jax-pmap", check=False)
    assert p.returncode == 2 and "podscale.torch runs on torch-ddp or torch-xla; this run's --backend is jax-pmap" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
