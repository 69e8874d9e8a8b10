"""Which samples each rank takes at each step: the distributed, deterministic loader's index rule.

Framework-free (numpy only), so the torch and JAX training APIs walk a user's data by the same rule
and a test can check it without either framework. Epoch ``e``'s order is a permutation drawn from
``(seed, e)`` alone (or the identity without shuffling); step ``s`` of the epoch takes positions
``s*B .. s*B+B-1`` of that order, and rank ``r`` of ``W`` takes the ``r``-th contiguous slice of
``B/W``. So every rank computes the same global batch without talking to the others, N ranks take
the same SGD step as one, and a resumed run finds its place from ``(epoch, step)`` alone.

What happens to the last ``n mod B`` samples of an epoch (``remainder``):

- ``drop`` (default, as ``drop_last=True``): they are skipped this epoch (a shuffled run sees them
  in other epochs); every step has the full global batch.
- ``pad``: one more step, filled up to ``B`` with samples from the start of the epoch's order, so
  every sample is seen each epoch and every step has ``B`` samples (a few twice).
- ``keep``: one more, smaller step of the ``r`` remaining samples, trimmed to a multiple of the
  device count (every device must get the same number; ``r < W`` samples are dropped).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from scaling.errors import UsageError

REMAINDERS = ("drop", "pad", "keep")


@dataclass(frozen=True)
class IndexPlan:
    """The index rule for ``n`` samples in global batches of ``global_batch`` over ``world`` ranks."""

    n: int
    global_batch: int
    world: int
    shuffle: bool = True
    seed: int = 0
    remainder: str = "drop"

    def __post_init__(self) -> None:
        if self.remainder not in REMAINDERS:
            raise UsageError(f"invalid remainder {self.remainder!r}; valid: {', '.join(REMAINDERS)}")
        if self.global_batch < 1 or self.global_batch % self.world:
            raise UsageError(f"global batch {self.global_batch} does not divide evenly over {self.world} devices; "
                             f"use a multiple of {self.world}")
        if self.n < self.global_batch:
            raise UsageError(f"the dataset has {self.n} samples, fewer than one global batch of {self.global_batch}; "
                             f"use --global-batch <= {self.n} (a multiple of {self.world}) or more data")

    @property
    def steps_per_epoch(self) -> int:
        full, rest = divmod(self.n, self.global_batch)
        if self.remainder == "drop" or rest == 0:
            return full
        if self.remainder == "keep" and rest < self.world:
            return full
        return full + 1

    _orders: dict[int, np.ndarray] = field(default_factory=dict, compare=False, repr=False)
    """The last epoch's order: a permutation per step would cost a fresh RNG every step (~0.1-0.3 ms,
    3-4% of a small CNN's step on this host)."""

    def order(self, epoch: int) -> np.ndarray:
        cached = self._orders.get(epoch)
        if cached is not None:
            return cached
        if not self.shuffle:
            out = np.arange(self.n, dtype=np.int64)
        else:
            out = np.random.default_rng([self.seed, epoch]).permutation(self.n).astype(np.int64)
        self._orders.clear()
        self._orders[epoch] = out
        return out

    def global_indices(self, epoch: int, step: int) -> np.ndarray:
        """The samples of step ``step`` (0-based, within the epoch) of epoch ``epoch``, all ranks."""
        if not 0 <= step < self.steps_per_epoch:
            raise IndexError(f"step {step} of an epoch of {self.steps_per_epoch}")
        order = self.order(epoch)
        lo = step * self.global_batch
        idx = order[lo : lo + self.global_batch]
        if len(idx) == self.global_batch:
            return idx
        if self.remainder == "pad":
            return np.concatenate([idx, order[: self.global_batch - len(idx)]])
        return idx[: len(idx) - len(idx) % self.world]  # keep

    def rank_indices(self, epoch: int, step: int, rank: int) -> np.ndarray:
        idx = self.global_indices(epoch, step)
        b = len(idx) // self.world
        return idx[rank * b : (rank + 1) * b]

    def position(self, global_step: int) -> tuple[int, int]:
        """(epoch, step within the epoch) of the run's ``global_step``-th step."""
        return divmod(global_step, self.steps_per_epoch)
