"""The digits CNN of ``digits_cnn.py`` in ``flax.nnx``, trained data parallel by podscale's JAX API.

    podscale run examples/digits_cnn_jax.py --backend jax-sharded --devices 4 --steps 200 --optimizer adam
    podscale run examples/digits_cnn_jax.py --backend jax-pmap --devices 4 --processes 2

Images are NHWC (N, 8, 8, 1); cross-entropy over 10 classes; optax Adam with ``--lr``.
"""

from __future__ import annotations

import jax
import numpy as np
import optax
from flax import nnx

import podscale.jax as ps


class DigitsCNN(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, width: int = 16, classes: int = 10):
        self.conv1 = nnx.Conv(1, width, (3, 3), padding=1, rngs=rngs)
        self.conv2 = nnx.Conv(width, 2 * width, (3, 3), strides=2, padding=1, rngs=rngs)
        self.fc = nnx.Linear(2 * width * 4 * 4, classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jax.nn.relu(self.conv1(x))
        x = jax.nn.relu(self.conv2(x))
        return self.fc(x.reshape(x.shape[0], -1))


def loss_fn(model: DigitsCNN, batch: tuple) -> jax.Array:
    x, y = batch
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def digits(test_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, ...]:
    """scikit-learn's digits as float32 NHWC images in [0, 1], split once by a fixed seed."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[..., None]
    y = d.target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(x))
    cut = int(len(x) * (1 - test_fraction))
    return x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]


def main() -> None:
    run = ps.init()
    x, y, x_test, y_test = digits()
    model = DigitsCNN(nnx.Rngs(run.config.seed))
    tx = optax.adam(run.config.lr) if run.config.optimizer == "adam" else optax.sgd(run.config.lr)
    ps.fit(model, tx, loss_fn, (x, y), shuffle=True)
    accuracy = float((np.asarray(model(x_test)).argmax(-1) == y_test).mean())
    ps.log("test_accuracy", accuracy)
    ps.report(accuracy=accuracy)


if __name__ == "__main__":
    main()
