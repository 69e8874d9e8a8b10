"""Memory per device, predicted: the training state (a replica, or its shards under ``--sharding``)
plus one step's activations. The measured counterpart is each run's ``memory`` (live tensors).

    params     4 B/param (fp32 master weights; whole under none and optimizer, 1/N under full)
    grads      4 B/param (1/N under optimizer and full)
    optimizer  Adam's two moments, 8 B/param (plain SGD: none; 1/N under optimizer and full)
    activations  2 x (values kept for backward per sample) x per-device batch x 4 B (2 B in 16-bit):
               the forward's saved values and their gradients, the spec's own layer list

Under ``optimizer`` the parameters count whole: FSDP2 and the jit step hold them gathered through
the step, which is the peak. Framework workspaces, allocator slack and the process itself are not
in it (the host check adds a measured per-process figure for those).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from scaling.errors import UsageError

OPTIMIZER_BYTES = {"adam": 8, "sgd": 0}


@dataclass(frozen=True)
class MemoryEstimate:
    params_bytes: float
    grads_bytes: float
    optimizer_bytes: float
    activations_bytes: float | None
    """None: the workload has no layer list (a paper's figures), so its activations are unknown."""

    @property
    def total_bytes(self) -> float:
        return self.params_bytes + self.grads_bytes + self.optimizer_bytes + (self.activations_bytes or 0.0)

    def as_dict(self) -> dict[str, float | None]:
        return {**asdict(self), "total_bytes": self.total_bytes}


def per_device(params: int, activations_per_sample: float | None, per_device_batch: float, devices: int,
               sharding: str = "none", optimizer: str = "adam", dtype: str = "float32") -> MemoryEstimate:
    if sharding not in ("none", "optimizer", "full"):
        raise UsageError(f"invalid sharding {sharding!r}; valid: none, optimizer, full")
    if optimizer not in OPTIMIZER_BYTES:
        raise UsageError(f"invalid optimizer {optimizer!r}; valid: {', '.join(OPTIMIZER_BYTES)}")
    n = max(1, devices)
    split = n if sharding != "none" else 1
    p = 4.0 * params / (n if sharding == "full" else 1)
    act = None
    if activations_per_sample is not None:
        act = 2.0 * activations_per_sample * per_device_batch * (2 if dtype in ("bfloat16", "float16") else 4)
    return MemoryEstimate(p, 4.0 * params / split, OPTIMIZER_BYTES[optimizer] * params / split, act)
