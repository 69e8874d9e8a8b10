"""A small CNN of our own on scikit-learn's handwritten digits, trained data parallel by podscale.

    podscale run examples/digits_cnn.py --backend torch-ddp --devices 4 --global-batch 64 --steps 200
    podscale run examples/digits_cnn.py --backend torch-xla --devices 2      # in .venv-xla
    python examples/digits_cnn.py                                           # one process, no podscale run

The data ship inside scikit-learn (1,797 8x8 images, 10 classes; no download). Cross-entropy,
Adam, a shuffled loader; the held-out accuracy goes into the run's JSON as ``accuracy``. Script
arguments (after ``--``): ``--epochs E`` trains whole epochs instead of ``--steps``, ``--lr``.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from torch import nn

import podscale.torch as ps


class DigitsCNN(nn.Module):
    """conv 1→16 (3x3) → ReLU → conv 16→32 (3x3, stride 2) → ReLU → linear 512→10, on 8x8 images."""

    def __init__(self, width: int = 16, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.fc = nn.Linear(2 * width * 4 * 4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.fc(x.flatten(1))


def digits(test_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, ...]:
    """scikit-learn's digits as float32 images in [0, 1] (N, 1, 8, 8), split once by a fixed seed."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    y = d.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    cut = int(len(x) * (1 - test_fraction))
    return x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    args = ap.parse_args()

    run = ps.init()
    x, y, x_test, y_test = digits()
    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=args.lr or run.config.lr)
    out = ps.fit(model, opt, nn.CrossEntropyLoss(), (x, y), shuffle=True, epochs=args.epochs)

    model.eval()
    with torch.no_grad():
        pred = model(torch.from_numpy(x_test).to(run.device)).argmax(1).cpu().numpy()
    accuracy = float((pred == y_test).mean())
    ps.log("test_accuracy", accuracy)
    ps.report(accuracy=accuracy)
    if run.is_main:
        print(f"loss {out['losses'][0]:.3f} -> {out['losses'][-1]:.3f}, held-out accuracy {accuracy:.3f}")


if __name__ == "__main__":
    main()
