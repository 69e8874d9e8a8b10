"""The MLP data-parallel tests' reference: a hand-written single-process loop that shares no code
with podscale. It reads the same ``--data`` / ``--init`` files a run gets and applies the textbook
update to the whole global batch, so a bug in podscale's batch split, loss scaling, sharding or
optimizer wiring shows up as a difference."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch


def write_inputs(d: Path, d_in: int, hidden: int, d_out: int, n_samples: int, seed: int) -> Path:
    """``d/data.npz`` (x, y) and ``d/init.npz`` (w1, b1, w2, b2: the relu MLP's parameters)."""
    rng = np.random.default_rng(seed)
    np.savez(d / "data.npz", x=rng.standard_normal((n_samples, d_in)).astype(np.float32),
             y=rng.standard_normal((n_samples, d_out)).astype(np.float32))
    np.savez(d / "init.npz", w1=(rng.standard_normal((d_in, hidden)) * 0.3).astype(np.float32),
             b1=(rng.standard_normal(hidden) * 0.1).astype(np.float32),
             w2=(rng.standard_normal((hidden, d_out)) * 0.3).astype(np.float32),
             b2=(rng.standard_normal(d_out) * 0.1).astype(np.float32))
    return d


def plain_loop(inputs: Path, steps: int, global_batch: int, lr: float, optimizer: str,
               reduction: str) -> tuple[list[float], dict[str, np.ndarray]]:
    """Step s trains on samples (s*B + i) mod n, i < B; squared error, mean or sum."""
    with np.load(inputs / "data.npz") as z:
        x, y = torch.from_numpy(z["x"]), torch.from_numpy(z["y"])
    with np.load(inputs / "init.npz") as z:
        p = {k: torch.tensor(z[k], dtype=torch.float32, requires_grad=True) for k in z.files}
    opt = torch.optim.Adam(p.values(), lr=lr) if optimizer == "adam" else torch.optim.SGD(p.values(), lr=lr)
    losses = []
    for s in range(steps):
        idx = (torch.arange(global_batch) + s * global_batch) % len(x)
        out = (x[idx] @ p["w1"] + p["b1"]).clamp(min=0) @ p["w2"] + p["b2"]
        err = ((out - y[idx]) ** 2).sum()
        loss = err / out.numel() if reduction == "mean" else err
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, {k: v.detach().numpy() for k, v in p.items()}


def sharded_runs(tmp: Path, run: Callable[..., Any]) -> dict[Any, Any]:
    """The sharding tests' combined runs of one backend (``run(tmp, name, *flags)`` returns its
    result and parameters): optimizer at 2; full at 4, checkpointing at 3 of 6 steps; full at 2,
    resumed from the 4-device checkpoint at step 3 (a reshard), after the final checkpoint is
    dropped as if the run had died after step 3. The reference: this module's plain loop."""
    inputs = write_inputs(tmp, 16, 64, 8, 80, seed=11)
    files = ("--data", str(inputs / "data.npz"), "--init", str(inputs / "init.npz"))
    out: dict[Any, Any] = {"ref": plain_loop(inputs, 6, 32, 0.01, "adam", "mean"),
                           ("optimizer", 2): run(tmp, "optimizer2", *files, "--devices", "2", "--sharding", "optimizer")}
    ck = tmp / "ck"
    out[("full", 4)] = run(tmp, "full4", *files, "--devices", "4", "--sharding", "full", "--checkpoint-dir", str(ck),
                           "--checkpoint-every", "3")
    from tests.conftest import drop_newest_checkpoint

    drop_newest_checkpoint(ck)
    out["resumed"] = run(tmp, "resumed", *files, "--devices", "2", "--sharding", "full", "--checkpoint-dir", str(ck), "--resume")
    out["ck"], out["files"] = ck, files
    return out
