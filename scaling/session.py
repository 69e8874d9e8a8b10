"""What the training APIs (``scaling.train_torch``, ``scaling.train_jax``) share about one process
of a run: its config and place in the world, the scalars and result keys the user adds, and the
raw record its ``fit`` leaves for the launcher. Framework-free."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from scaling.config import RunConfig
from scaling.context import WorkerContext
from scaling.errors import UsageError


@dataclass
class BaseSession:
    """This process's place in the run. ``config`` is the run's RunConfig (the CLI's flags)."""

    config: RunConfig
    rank: int
    world: int
    local_rank: int
    ctx: WorkerContext
    scalars: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] | None = None
    step: int = 0

    @property
    def backend(self) -> str:
        return self.config.backend

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def log(self, name: str, value: float, step: int | None = None) -> None:
        """A scalar for TensorBoard (rank 0's value), at ``step`` or the current step."""
        if not isinstance(name, str) or not name:
            raise UsageError(f"log name {name!r}: must be a non-empty string")
        self.scalars.setdefault(name, []).append((self.step if step is None else int(step), float(value)))

    def report(self, **values: Any) -> None:
        """Extra keys for the run's result JSON (e.g. ``accuracy=0.97``), from rank 0."""
        self.extras.update(values)


def run_config(backends: tuple[str, ...], api: str) -> RunConfig:
    """The run's config as podscale set it, or the defaults for a plain ``python train.py``."""
    env = os.environ.get("PODSCALE_CONFIG")
    cfg = RunConfig.from_json(env) if env else RunConfig(backend=backends[0])
    if cfg.backend not in backends:
        other = "podscale.jax" if api == "podscale.torch" else "podscale.torch"
        raise UsageError(f"{api} runs on {' or '.join(backends)}; this run's --backend is {cfg.backend} "
                         f"(a script for it imports {other})")
    return cfg


def seed_host_rngs(seed: int) -> None:
    """numpy's and Python's global RNGs, the same on every rank."""
    np.random.seed(seed % 2**32)
    random.seed(seed)


def host_rng_state() -> dict[str, Any]:
    """numpy's and Python's RNG states as plain arrays and lists (checkpoints load weights-only)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, py_gauss = random.getstate()
    return {"np_keys": np.asarray(keys, np.int64), "np_pos": int(pos), "np_has_gauss": int(has_gauss),
            "np_gauss": float(gauss), "py_version": int(version), "py_internal": [int(v) for v in internal],
            "py_gauss": py_gauss}


def set_host_rng_state(st: dict[str, Any]) -> None:
    np.random.set_state(("MT19937", np.asarray(st["np_keys"]).astype(np.uint32), int(st["np_pos"]),
                         int(st["np_has_gauss"]), float(st["np_gauss"])))
    random.setstate((int(st["py_version"]), tuple(int(v) for v in st["py_internal"]), st["py_gauss"]))


def median(xs: list[float]) -> float | None:
    import statistics

    return statistics.median(xs) if xs else None
