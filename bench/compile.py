"""Eager vs compiled: the speedup of ``torch.compile`` over eager for each zoo model, on this machine.

The lecture's dynamic vs static graphs, made measurable. One process, one thread per core, small
inputs (CPU); each model trains ``--steps`` SGD steps after ``--warmup`` untimed ones (the compile).
JAX always jits, so its eager twin is not timed here. Usage: ``python -m bench.compile [models...]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from models import torch as mtorch
from models.spec import get_spec

SMALL = {
    "mlp": {},
    "alexnet": dict(image_size=32, num_classes=10, width=16, hidden=256, small=True),
    "vgg16": dict(image_size=32, num_classes=10, width=8, hidden=256),
    "resnet18": dict(image_size=32, num_classes=10, width=16, small=True),
    "resnet50": dict(image_size=32, num_classes=10, width=8, small=True),
    "gpt-tiny": dict(seq_len=64, d_model=128, layers=2, heads=4),
}


def step_time(name: str, compiled: bool, batch: int, steps: int, warmup: int) -> float:
    spec = get_spec(name, **SMALL[name])
    model = mtorch.build(spec)
    fwd = torch.compile(model) if compiled else model
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x, y = (torch.from_numpy(a) for a in spec.synthetic_data(batch, 0))
    times = []
    for i in range(warmup + steps):
        t = time.perf_counter()
        out = fwd(x).float()
        if spec.task == "classification":
            loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
        else:
            loss = F.mse_loss(out, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", default=list(SMALL))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    a = ap.parse_args()
    print(f"{'model':10} {'eager ms':>9} {'compiled ms':>12} {'speedup':>8}   (torch {torch.__version__}, batch {a.batch})")
    for name in a.models:
        e = step_time(name, False, a.batch, a.steps, a.warmup)
        c = step_time(name, True, a.batch, a.steps, a.warmup)
        print(f"{name:10} {e * 1e3:9.2f} {c * 1e3:12.2f} {e / c:7.2f}x")


if __name__ == "__main__":
    main()
