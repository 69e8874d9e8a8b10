"""The batch-norm data-parallel tests' reference: plain single-process SGD in JAX (Flax BatchNorm with
``groups``: statistics per contiguous slice of the batch, running statistics averaged over the
slices). It shares no training code with the backend under test: only the zoo's spec (the model's
definition), its initial parameters and its synthetic data."""

from __future__ import annotations

import jax
import numpy as np

from models import flax as mflax
from models.flax.cnn import configure_bn
from models.spec import get_spec
from scaling.data import load_dataset

#: a small ResNet-18 on 16 px single-channel images: every kind of layer, seconds a run
OPTS = dict(image_size=16, in_channels=1, num_classes=10, width=4, small=True)
STEPS, BATCH, LR = 3, 32, 0.05


def run_args(*flags: str) -> list[str]:
    """A ``podscale run`` of the reference's model, data and plain SGD."""
    args = ["run", "--model", "resnet18", "--steps", str(STEPS), "--untimed-steps", "0", "--global-batch", str(BATCH),
            "--lr", str(LR), "--optimizer", "sgd", "--quiet", *flags]
    for k, v in OPTS.items():
        args += ["--model-opt", f"{k}={v}"]
    return args


def reference(groups: int) -> dict[str, np.ndarray]:
    """Canonical parameters and running statistics after ``STEPS`` of SGD with per-group statistics."""
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


def close(a: dict[str, np.ndarray], b: dict[str, np.ndarray], atol: float = 2e-5, rtol: float = 1e-4) -> None:
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=atol, err_msg=k)
