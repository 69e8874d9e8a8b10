"""Training data as every backend sees it: one array pair walked in order, global batch by batch.

Step s uses samples ``(s * B + i) mod n`` for i in 0..B-1, and rank r of N takes the r-th contiguous
slice of that global batch. That one rule is what makes N devices compute the same SGD step as one
device, and lets a resumed run find its data position from the step number alone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from models.spec import ModelSpec
from scaling.datasets import NAMED_DATASETS, Dataset
from scaling.errors import UsageError

__all__ = ["Dataset", "load_dataset", "load_init", "synthetic_size"]


def synthetic_size(global_batch: int) -> int:
    """Enough distinct samples that consecutive steps differ, small enough to build instantly."""
    return max(4 * global_batch, 256)


def load_dataset(spec: ModelSpec, data: str | None, global_batch: int, seed: int) -> Dataset:
    """The run's data: a user's .npz (x, y), or deterministic synthetic samples from the seed."""
    if data is None or data == "noise":
        x, y = spec.synthetic_data(synthetic_size(global_batch), seed, teacher=data is None)
        return Dataset(x, y, "synthetic" if data is None else "noise")
    if data in NAMED_DATASETS:
        return NAMED_DATASETS[data](spec)
    p = Path(data)
    if not p.is_file():
        raise UsageError(f"--data {data!r}: no such file (expected an .npz with arrays x and y, or one of: {', '.join(['noise', *NAMED_DATASETS])})")
    try:
        with np.load(p, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:  # noqa: BLE001 - any unreadable file is reported in one line
        raise UsageError(f"--data {data!r} is not a readable .npz file ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if "x" not in arrays or "y" not in arrays:
        raise UsageError(f"--data {data!r} holds arrays {sorted(arrays)}; expected arrays 'x' and 'y'")
    x, y = arrays["x"], arrays["y"]
    if x.shape[1:] != spec.input_shape:
        raise UsageError(f"--data {data!r}: x has sample shape {x.shape[1:]}, model {spec.name!r} expects {spec.input_shape}")
    if spec.task == "classification":
        if y.ndim != 1:
            raise UsageError(f"--data {data!r}: y has shape {y.shape}, expected integer labels of shape ({len(x)},)")
        y = y.astype(np.int64)
    elif y.shape[1:] != (spec.output_dim,):
        raise UsageError(f"--data {data!r}: y has sample shape {y.shape[1:]}, model {spec.name!r} expects ({spec.output_dim},)")
    else:
        y = y.astype(np.float32)
    if len(x) != len(y) or len(x) == 0:
        raise UsageError(f"--data {data!r}: x has {len(x)} samples and y has {len(y)}; they must be equal and non-zero")
    if len(x) < global_batch:
        raise UsageError(f"--data {data!r} has {len(x)} samples, fewer than --global-batch {global_batch}: every step would "
                         f"repeat samples; use --global-batch {len(x)} or less, or more data")
    return Dataset(np.ascontiguousarray(x.astype(np.float32)), np.ascontiguousarray(y), p.name)


def load_init(spec: ModelSpec, init: str | None, seed: int) -> dict[str, np.ndarray]:
    """Initial parameters: a user's .npz by canonical name, or the spec's seeded init."""
    if init is None:
        return spec.init_params(seed)
    p = Path(init)
    if not p.is_file():
        raise UsageError(f"--init {init!r}: no such file (expected an .npz of parameters by canonical name: {', '.join(spec.param_shapes())})")
    try:
        with np.load(p, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:  # noqa: BLE001
        raise UsageError(f"--init {init!r} is not a readable .npz file ({type(e).__name__})") from None
    return spec.check_params(arrays, f"--init {init!r}")
