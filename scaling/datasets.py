"""The arrays every backend walks (``Dataset``), and real small datasets that ship inside a package,
so a test can train to a real accuracy offline.

``digits``: scikit-learn's 1,797 handwritten digits (8x8 grey levels 0..16, 10 classes), scaled to
[0, 1], shuffled once with a fixed seed and split 80/20 into train and a held-out test set. The
images are fitted to the model's input: flattened for ``mlp`` (d_in=64), else nearest-neighbour
upsampled by an integer factor to ``image_size`` (a multiple of 8) and repeated over
``in_channels``. A backend that finds ``x_test`` reports ``accuracy`` on it in the run's JSON.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from models.spec import ModelSpec
from scaling.errors import UsageError

TEST_FRACTION = 0.2
SPLIT_SEED = 0


@dataclass(frozen=True)
class Dataset:
    x: np.ndarray
    y: np.ndarray
    name: str

    def __len__(self) -> int:
        return len(self.x)

    def indices(self, step: int, global_batch: int) -> np.ndarray:
        return (np.arange(global_batch, dtype=np.int64) + step * global_batch) % len(self.x)

    def shard(self, step: int, global_batch: int, rank: int, world: int) -> tuple[np.ndarray, np.ndarray]:
        """Rank ``rank``'s slice of step ``step``'s global batch."""
        b = global_batch // world
        idx = self.indices(step, global_batch)[rank * b : (rank + 1) * b]
        return self.x[idx], self.y[idx]


@dataclass(frozen=True)
class SplitDataset(Dataset):
    """Training arrays (walked by ``Dataset``'s rule) plus a held-out test split."""

    x_test: np.ndarray | None = None
    y_test: np.ndarray | None = None


def _fit(images: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """(n, 8, 8) in [0, 1] -> (n, *spec.input_shape)."""
    shape = spec.input_shape
    n = len(images)
    if shape == (64,):
        return images.reshape(n, 64)
    if len(shape) == 3 and shape[1] == shape[2] and shape[1] % 8 == 0:
        f = shape[1] // 8
        up = images.repeat(f, axis=1).repeat(f, axis=2)
        return np.ascontiguousarray(np.broadcast_to(up[:, None], (n, shape[0], shape[1], shape[2])))
    hint = "d_in=64 for mlp" if spec.name == "mlp" else "image_size a multiple of 8 (e.g. image_size=8 in_channels=1)"
    raise UsageError(f"--data digits: model {spec.name!r} takes samples of shape {shape}; digits are 8x8 images (use --model-opt {hint})")


def digits(spec: ModelSpec) -> SplitDataset:
    if spec.task != "classification" or spec.output_dim != 10:
        raise UsageError(f"--data digits has 10 classes: use a CNN (alexnet, vgg16, resnet18, resnet50) with --model-opt num_classes=10; {spec.name!r} has task {spec.task!r} and {spec.output_dim} outputs")
    if spec.name == "gpt-tiny":
        raise UsageError("--data digits holds images; gpt-tiny takes token sequences")
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (d.images / 16.0).astype(np.float32)
    labels = d.target.astype(np.int64)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(labels))
    n_test = int(round(len(labels) * TEST_FRACTION))
    test, train = order[:n_test], order[n_test:]
    x = _fit(images, spec)
    return SplitDataset(np.ascontiguousarray(x[train]), labels[train], "digits",
                        x_test=np.ascontiguousarray(x[test]), y_test=labels[test])


def accuracy(predict: Callable[[np.ndarray], np.ndarray], data: Dataset, batch: int = 256) -> float | None:
    """Fraction of the test split classified right; ``predict`` maps inputs to logits (numpy)."""
    x_test, y_test = getattr(data, "x_test", None), getattr(data, "y_test", None)
    if x_test is None or y_test is None:
        return None
    right = 0
    for i in range(0, len(x_test), batch):
        logits = np.asarray(predict(x_test[i : i + batch]))
        right += int(np.sum(logits.argmax(axis=-1) == y_test[i : i + batch]))
    return right / len(x_test)


#: named datasets that ship inside a package: ``--data NAME``
NAMED_DATASETS: dict[str, Callable[[ModelSpec], Dataset]] = {"digits": digits}
