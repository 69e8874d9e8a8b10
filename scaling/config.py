"""RunConfig: everything that defines one training run, as one frozen, typed, documented record.

One record travels unchanged from the CLI (or a TOML file, or a Ray job, or a notebook) to every
rank of every backend, so that "the same config" means the same thing everywhere.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from scaling.errors import UsageError

OPTIMIZERS = ("sgd", "adam")
REDUCTIONS = ("mean", "sum")
DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class RunConfig:
    backend: str = "torch-ddp"
    """Data-parallel backend: torch-ddp, jax-pmap, jax-sharded or torch-xla."""
    model: str = "mlp"
    """Model name from the zoo (``podscale models`` lists them)."""
    devices: int = 1
    """Global count of framework-visible devices (ranks for torch-ddp, JAX devices for jax-*)."""
    processes: int = 0
    """Processes the devices are spread over (multi-host shape); 0 = the backend's natural choice."""
    global_batch: int = 64
    """Samples per optimizer step over all devices; split evenly, so it must divide by devices."""
    steps: int = 20
    """Optimizer steps to train (untimed ones included)."""
    untimed_steps: int = 2
    """First steps trained but not timed: compilation, allocator and cache warm-up."""
    lr: float = 1e-3
    """Learning rate."""
    optimizer: str = "sgd"
    """sgd (plain) or adam (beta1 0.9, beta2 0.999, eps 1e-8), identical in every framework."""
    loss_reduction: str = "mean"
    """Squared error: sum over batch and outputs, or that divided by (global_batch x outputs)."""
    seed: int = 0
    """Seeds the parameter initialisation and the synthetic data."""
    dtype: str = "float32"
    """Matmul precision. bfloat16 = autocast compute; params, grads and all-reduce stay fp32."""
    data: str | None = None
    """An .npz with arrays x and y walked in order in global batches; None = synthetic data."""
    init: str | None = None
    """An .npz of initial parameters by canonical name and layout; None = spec's seeded init."""
    model_opts: dict[str, Any] = field(default_factory=dict)
    """Model hyper-parameters (``--model-opt hidden=100``)."""
    logdir: str | None = None
    """TensorBoard log directory for this run's scalars."""
    json_path: str | None = None
    """Where the result JSON goes."""
    params_out: str | None = None
    """Where the final parameters go (.npz by canonical name and layout), for comparing runs."""
    step_timeout: float = 60.0
    """Seconds without progress after which the watchdog kills the whole run (exit 3)."""
    startup_timeout: float = 180.0
    """Seconds allowed for process start-up, imports and the first compiled step."""
    checkpoint_dir: str | None = None
    """Directory for atomic checkpoints; None = no checkpoints."""
    checkpoint_every: int = 0
    """Checkpoint every this many steps (0 = never)."""
    resume: bool = False
    """Continue from the newest checkpoint in checkpoint_dir."""
    hardware: str | None = None
    """Catalog id of the hardware the run is on; None = detect (host-cpu, h100-sxm, ...)."""
    compile: bool = False
    """torch.compile the model (torch backends); JAX always jits."""
    sync_bn: bool = False
    """Cross-replica batch-norm statistics (models with batch norm)."""
    launcher: str = "spmd"
    """torch-xla only: spmd (default), torchrun or xmp."""

    def __post_init__(self) -> None:
        def bad(name: str, value: Any, valid: str) -> UsageError:
            return UsageError(f"invalid --{name.replace('_', '-')} {value!r}: {valid}")

        if self.devices < 1:
            raise bad("devices", self.devices, "must be a positive integer (1, 2, 4, 8, ...)")
        if self.global_batch < 1:
            raise bad("global_batch", self.global_batch, "must be a positive integer")
        if self.global_batch % self.devices:
            raise UsageError(
                f"--global-batch {self.global_batch} does not divide evenly over --devices {self.devices}; "
                f"use a multiple of {self.devices} (e.g. {self.devices * max(1, self.global_batch // self.devices)})"
            )
        if self.processes < 0 or (self.processes and self.devices % self.processes):
            raise bad("processes", self.processes, f"must divide --devices {self.devices}")
        if self.steps < 1:
            raise bad("steps", self.steps, "must be a positive integer")
        if not 0 <= self.untimed_steps < self.steps:
            raise bad("untimed_steps", self.untimed_steps, f"must be in 0..{self.steps - 1} (fewer than --steps)")
        if not self.lr > 0:
            raise bad("lr", self.lr, "must be positive")
        if self.optimizer not in OPTIMIZERS:
            raise bad("optimizer", self.optimizer, f"valid: {', '.join(OPTIMIZERS)}")
        if self.loss_reduction not in REDUCTIONS:
            raise bad("loss_reduction", self.loss_reduction, f"valid: {', '.join(REDUCTIONS)}")
        if self.dtype not in DTYPES:
            raise bad("dtype", self.dtype, f"valid: {', '.join(DTYPES)}")
        if not self.step_timeout > 0:
            raise bad("step_timeout", self.step_timeout, "must be positive seconds")
        if self.checkpoint_every < 0:
            raise bad("checkpoint_every", self.checkpoint_every, "must be >= 0")
        if (self.checkpoint_every or self.resume) and not self.checkpoint_dir:
            raise UsageError("--checkpoint-every/--resume need --checkpoint-dir DIR")
        if self.launcher not in ("spmd", "torchrun", "xmp"):
            raise bad("launcher", self.launcher, "valid: spmd, torchrun, xmp")

    @property
    def per_device_batch(self) -> int:
        return self.global_batch // self.devices

    @property
    def timed_steps(self) -> int:
        return self.steps - self.untimed_steps

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise UsageError(f"unknown config key(s) {', '.join(unknown)}; valid: {', '.join(sorted(names))}")
        return cls(**d)

    @classmethod
    def from_json(cls, s: str) -> RunConfig:
        return cls.from_dict(json.loads(s))


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML (or YAML) file of RunConfig fields; dashes and underscores both accepted."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--config {str(path)!r}: no such file")
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(p.read_text()) or {}
        else:
            raw = tomllib.loads(p.read_text())
    except Exception as e:  # noqa: BLE001 - any parse error is the user's file, reported in one line
        raise UsageError(f"--config {str(path)!r} is not valid {'YAML' if p.suffix in ('.yaml', '.yml') else 'TOML'}: {e}".splitlines()[0]) from None
    if not isinstance(raw, dict):
        raise UsageError(f"--config {str(path)!r} must hold a table of RunConfig fields")
    out = {k.replace("-", "_"): v for k, v in raw.items()}
    if "model_opt" in out:
        out["model_opts"] = out.pop("model_opt")
    names = {f.name for f in fields(RunConfig)}
    unknown = sorted(set(out) - names)
    if unknown:
        raise UsageError(f"--config {str(path)!r}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(sorted(names))}")
    return out
