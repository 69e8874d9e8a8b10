"""Data parallelism with batch norm, a real dataset, and torch.compile — through the real CLI.

Sync BN on N devices is the 1-device computation; per-device BN is a different one, checked against
an independent single-process reference that splits each global batch the same way (Flax BatchNorm
with ``groups=N``: statistics per contiguous N-th, running statistics averaged over the groups).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.bn_reference import close, reference, run_args

pytestmark = pytest.mark.timeout(400)


def _train(run_cli, tmp_path: Path, tag: str, *flags: str) -> dict[str, np.ndarray]:
    out = tmp_path / f"{tag}.npz"
    run_cli(*run_args("--params-out", str(out), *flags))  # the reference is plain SGD
    with np.load(out) as z:
        return {k: z[k] for k in z.files}


def test_sync_bn_equals_one_device(run_cli, tmp_path: Path) -> None:
    one = _train(run_cli, tmp_path, "t1", "--devices", "1")
    close(_train(run_cli, tmp_path, "t4s", "--devices", "4", "--sync-bn"), one)
    close(_train(run_cli, tmp_path, "j4s", "--devices", "4", "--sync-bn", "--backend", "jax-pmap"), one)


def test_per_device_bn_equals_split_reference(run_cli, tmp_path: Path) -> None:
    """Statistics over 8 samples amplify float32 rounding in the backward. On an AVX-512 host
    torch's per-device run and the JAX reference land 1.5e-4 apart on the stem after 3 steps; with
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 they agree to 1e-7 and jax-pmap is 1.5e-4 off
    instead: kernel choice, not semantics. So the band is 5e-4, and what makes it a test is the
    other side: every parameter sits at least 10x closer to the per-device reference than the
    per-device and synchronised computations are to each other (49x on that host)."""
    ref, sync = reference(4), reference(1)
    for tag, *flags in (("t4",), ("j4", "--backend", "jax-pmap")):
        got = _train(run_cli, tmp_path, tag, "--devices", "4", *flags)
        close(got, ref, atol=5e-4, rtol=1e-3)
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
