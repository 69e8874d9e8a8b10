"""RunConfig: everything that defines one training run, as one frozen, typed, documented record.

One record travels unchanged from the CLI (or a TOML file, or a Ray job, or a notebook) to every
rank of every backend, so that "the same config" means the same thing everywhere.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from models.spec import canonical_model_name
from scaling.errors import UsageError

OPTIMIZERS = ("sgd", "adam")
REDUCTIONS = ("mean", "sum")
DTYPES = ("float32", "bfloat16")
SHARDINGS = ("none", "optimizer", "full")
#: backends that shard the training state (torch-xla: SPMD annotations, its spmd launcher only)
SHARDED_BACKENDS = ("torch-ddp", "jax-sharded", "torch-xla")
#: fields whose flag is not the field's name with dashes
_FLAGS = {"model_opts": "--model-opt", "json_path": "--json", "script_args": "script arguments (after --)"}


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
    probe_steps: int | None = None
    """Rounds of probes after training that measure where a step's time goes (data, compute,
    exposed communication); the model and optimizer are restored after. A round runs each part a
    few times, about 9 steps' work, so None (auto) gives one round per 30 training steps, at most
    10: a short run is not made several times longer by its own probes. 0 = none."""
    lr: float = 1e-3
    """Learning rate."""
    optimizer: str = "adam"
    """adam (beta1 0.9, beta2 0.999, eps 1e-8) or sgd (plain), identical in every framework. adam is
    the default: at the default lr it learns within the default steps, where plain SGD barely moves."""
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
    """TensorBoard log directory; this run's scalars go in its subfolder ``run_name``."""
    run_name: str | None = None
    """The run's subfolder of ``logdir`` (one TensorBoard run each); None = backend, model,
    devices and a timestamp, chosen when the run starts."""
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
    sharding: str = "none"
    """What is split over the devices besides the batch: none (replicated data parallelism),
    optimizer (gradients + optimizer state; FSDP2 keeping parameters gathered through a step) or
    full (parameters too, ZeRO-3 style). See ``scaling.sharding_torch``."""
    launcher: str = "spmd"
    """torch-xla only: spmd (default), torchrun or xmp."""
    script: str | None = None
    """A user's training script, run as ``__main__`` in every process (``podscale run train.py``);
    None = train the zoo's ``model``."""
    script_args: list[str] = field(default_factory=list)
    """The script's own arguments (what follows ``--``), its ``sys.argv[1:]``."""

    def __post_init__(self) -> None:
        def bad(name: str, value: Any, valid: str) -> UsageError:
            flag = _FLAGS.get(name, "--" + name.replace("_", "-"))
            return UsageError(f"invalid {flag} {value!r}: {valid}")

        for f in fields(self):  # types first: a TOML/YAML file or a caller can hand in anything
            object.__setattr__(self, f.name, _typed(f.name, getattr(self, f.name), str(f.type), bad))
        object.__setattr__(self, "model", canonical_model_name(self.model))  # resnet-50 = resnet50
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
        if self.probe_steps is not None and self.probe_steps < 0:
            raise bad("probe_steps", self.probe_steps, "must be >= 0 (0 = no breakdown)")
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
        if not self.startup_timeout > 0:
            raise bad("startup_timeout", self.startup_timeout, "must be positive seconds")
        if self.seed < 0:
            raise bad("seed", self.seed, "must be a non-negative integer")
        if self.run_name is not None and (not self.run_name.strip() or self.run_name.startswith("/") or ".." in Path(self.run_name).parts):
            raise bad("run_name", self.run_name, "must be a non-empty relative name inside --logdir (e.g. ddp4-adam)")
        if self.launcher not in ("spmd", "torchrun", "xmp"):
            raise bad("launcher", self.launcher, "valid: spmd, torchrun, xmp")
        if self.sharding not in SHARDINGS:
            raise bad("sharding", self.sharding, f"valid: {', '.join(SHARDINGS)}")
        if self.sharding != "none" and self.backend not in SHARDED_BACKENDS:
            why = "jax-pmap replicates by design" if self.backend == "jax-pmap" else f"{self.backend} has no sharded mode yet"
            raise UsageError(f"--sharding {self.sharding} on --backend {self.backend}: {why}; "
                             f"backends that shard: {', '.join(SHARDED_BACKENDS)}")
        if self.sharding != "none" and self.backend == "torch-xla" and self.launcher != "spmd":
            raise UsageError(f"--sharding {self.sharding} on torch-xla shards through SPMD annotations: "
                             f"use --launcher spmd (the default), not {self.launcher}")

    @property
    def per_device_batch(self) -> int:
        return self.global_batch // self.devices

    def probe_rounds(self, steps: int) -> int:
        """``probe_steps``, with auto (None) resolved against the run's length in steps."""
        return self.probe_steps if self.probe_steps is not None else min(10, steps // 30)

    def probe_why_none(self, steps: int) -> str:
        """Why a run has no breakdown probes, in the words a user would act on."""
        if self.probe_steps == 0:
            return "no probes (--probe-steps 0)"
        return f"no probes: auto gives one round per 30 steps and this run has {steps} (--probe-steps K to probe anyway)"

    @property
    def timed_steps(self) -> int:
        return self.steps - self.untimed_steps

    @property
    def collective_timeout(self) -> float:
        """Seconds a rank waits in one collective before it gives up.

        Longer than ``step_timeout`` on purpose: the launcher's watchdog fires first and names the
        stuck rank; a collective timing out first would blame the peer that was waiting for it.
        Still bounded, so a rank whose launcher is gone cannot wait for ever.
        """
        return 2 * self.step_timeout + 5

    def with_run_name(self) -> RunConfig:
        """This config with its TensorBoard run named (the default name, if none was given)."""
        if self.run_name is not None:
            return self
        stamp = time.strftime("%Y%m%d-%H%M%S")
        what = Path(self.script).stem if self.script else self.model
        return self.replace(run_name=f"{self.backend}-{what}-{self.devices}dev-{stamp}")

    @property
    def run_logdir(self) -> Path | None:
        """Where this run's event files go: ``logdir/run_name``."""
        if self.logdir is None:
            return None
        return Path(self.logdir) / (self.with_run_name().run_name or "")

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


#: what each annotation accepts, in the words of the error message
_TYPE_WORDS = {"int": "an integer", "float": "a finite number", "str": "a string", "bool": "true or false",
               "dict[str, Any]": "a table of KEY = VALUE (e.g. {hidden = 100})", "list[str]": "a list of strings"}


def _typed(name: str, value: Any, annotation: str, bad: Any) -> Any:
    """``value`` checked against the field's annotation (ints stay ints; an int is a valid float)."""
    base = annotation.removesuffix(" | None")
    if value is None:
        if base != annotation:
            return None
        raise bad(name, value, f"must be {_TYPE_WORDS[base]}")
    ok: bool
    if base == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif base == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        value = float(value) if ok else value
    elif base == "str":
        ok = isinstance(value, str)
    elif base == "bool":
        ok = isinstance(value, bool)
    elif base == "dict[str, Any]":
        ok = isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, (str, int, float, bool))
                                             for k, v in value.items())
    elif base == "list[str]":
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    else:  # a new field with a new kind of annotation: teach this table its words
        raise TypeError(f"RunConfig.{name}: no type check for {annotation!r}")
    if not ok:
        raise bad(name, value, f"must be {_TYPE_WORDS[base]}")
    return value


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
