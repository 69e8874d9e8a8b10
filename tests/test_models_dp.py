"""Data parallelism with batch norm, a real dataset, and torch.compile — through the real CLI.

Sync BN on N devices is the 1-device computation; per-device BN is a different one, checked against
an independent single-process reference that splits each global batch the same way (Flax BatchNorm
with ``groups=N``: statistics per contiguous N-th, running statistics averaged over the groups).
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest

from models import flax as mflax
from models.flax.cnn import configure_bn
from models.spec import get_spec
from scaling.data import load_dataset

pytestmark = pytest.mark.timeout(400)

OPTS = dict(image_size=16, in_channels=1, num_classes=10, width=4, small=True)
STEPS, BATCH, LR = 3, 32, 0.05


def _train(run_cli, tmp_path: Path, tag: str, *flags: str) -> dict[str, np.ndarray]:
    out = tmp_path / f"{tag}.npz"
    args = ["run", "--model", "resnet18", "--steps", str(STEPS), "--untimed-steps", "0", "--global-batch", str(BATCH),
            "--lr", str(LR), "--optimizer", "sgd", "--params-out", str(out), "--quiet", *flags]  # the reference is plain SGD
    for k, v in OPTS.items():
        args += ["--model-opt", f"{k}={v}"]
    run_cli(*args)
    with np.load(out) as z:
        return {k: z[k] for k in z.files}


def _reference(groups: int) -> dict[str, np.ndarray]:
    """Plain single-process SGD in JAX with per-group batch statistics."""
    from flax import nnx
    import optax

    spec = get_spec("resnet18", **OPTS)
    data = load_dataset(spec, None, BATCH, 0)
    model = mflax.build(spec, spec.init_params(0))
    configure_bn(model, groups=groups)
    graphdef, state = nnx.split(model)

    def loss(s, x, y):
        m = nnx.merge(graphdef, s)
        return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean(), nnx.state(m, nnx.BatchStat)

    @jax.jit
    def step_fn(state, x, y):
        (_, stats), g = jax.value_and_grad(loss, has_aux=True)(state, x, y)
        return nnx.merge_state(jax.tree.map(lambda p, d: p - LR * d, state, g), stats)

    for step in range(STEPS):
        idx = data.indices(step, BATCH)
        state = step_fn(state, data.x[idx], data.y[idx])
    return mflax.to_canonical(spec, nnx.merge(graphdef, state))


def _close(a: dict[str, np.ndarray], b: dict[str, np.ndarray], atol: float = 2e-5, rtol: float = 1e-4) -> None:
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=atol, err_msg=k)


def test_sync_bn_equals_one_device(run_cli, tmp_path: Path) -> None:
    one = _train(run_cli, tmp_path, "t1", "--devices", "1")
    _close(_train(run_cli, tmp_path, "t4s", "--devices", "4", "--sync-bn"), one)
    _close(_train(run_cli, tmp_path, "j4s", "--devices", "4", "--sync-bn", "--backend", "jax-pmap"), one)


def test_per_device_bn_equals_split_reference(run_cli, tmp_path: Path) -> None:
    """Statistics over 8 samples amplify float32 rounding in the backward. On an AVX-512 host
    torch's per-device run and the JAX reference land 1.5e-4 apart on the stem after 3 steps; with
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 they agree to 1e-7 and jax-pmap is 1.5e-4 off
    instead: kernel choice, not semantics. So the band is 5e-4, and what makes it a test is the
    other side: every parameter sits at least 10x closer to the per-device reference than the
    per-device and synchronised computations are to each other (49x on that host)."""
    ref, sync = _reference(4), _reference(1)
    for tag, *flags in (("t4",), ("j4", "--backend", "jax-pmap")):
        got = _train(run_cli, tmp_path, tag, "--devices", "4", *flags)
        _close(got, ref, atol=5e-4, rtol=1e-3)
        for k in ref:
            apart = float(np.abs(ref[k] - sync[k]).max())
            assert float(np.abs(got[k] - ref[k]).max()) <= apart / 10 + 1e-6, (tag, k, apart)


def test_digits_accuracy(run_cli, tmp_path: Path) -> None:
    import json

    js = tmp_path / "d.json"
    args = ["run", "--model", "resnet18", "--data", "digits", "--steps", "60", "--global-batch", "64", "--optimizer", "adam",
            "--lr", "0.01", "--json", str(js), "--quiet"]
    for k, v in dict(image_size=8, in_channels=1, num_classes=10, width=8, small=True).items():
        args += ["--model-opt", f"{k}={v}"]
    run_cli(*args)
    assert json.loads(js.read_text())["accuracy"] > 0.9


def test_compile_matches_eager_on_two_ranks(run_cli, tmp_path: Path) -> None:
    import json

    res = {}
    for tag, extra in (("eager", []), ("compiled", ["--compile"])):
        js = tmp_path / f"{tag}.json"
        run_cli("run", "--devices", "2", "--steps", "4", "--global-batch", "16", "--json", str(js), "--quiet", *extra)
        res[tag] = json.loads(js.read_text())
    np.testing.assert_allclose(res["compiled"]["losses"], res["eager"]["losses"], rtol=1e-5)
    assert res["compiled"]["replicas_identical"]


def test_digits_rejects_wrong_model(run_cli) -> None:
    p = run_cli("run", "--model", "resnet18", "--data", "digits", check=False)
    assert p.returncode == 2 and "num_classes=10" in p.stderr and "Traceback" not in p.stderr
