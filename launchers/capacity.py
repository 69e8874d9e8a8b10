"""What this host can run, checked before any process starts (exit 2, one line).

Emulated devices are processes or XLA host devices sharing the host's cores and RAM: 512 gloo
ranks on 2 cores would not fail cleanly, they would thrash for minutes. And ``--hardware`` names
the chip the ranks run on (its peak is the MFU basis), so it must be the kind of chip they find
here; what-ifs on other chips are ``podscale predict``'s job.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from scaling.config import RunConfig
from scaling.errors import UsageError
from scaling.throughput import catalog, host

#: resident memory of one idle worker process, measured here (torch/jax imported), for the RAM check
PROCESS_RSS = {"torch-ddp": 0.35e9, "jax-pmap": 0.5e9, "jax-sharded": 0.5e9, "torch-xla": 1.2e9}
#: emulated devices per host core beyond which a run is refused
MAX_DEVICES_PER_CORE = 8


def total_ram() -> float:
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def check_host_capacity(backends: list[str], devices: list[int], model: str | None, model_opts: dict[str, Any],
                        batch_of: Callable[[int], int], sharding: str = "none", optimizer: str = "adam") -> None:
    """Refuse emulated-device runs this host cannot hold: too many devices per core, or more memory
    than 80% of its RAM (``model`` None: a user's script, whose size is unknown before it runs)."""
    cores = host.host_cores()
    top = devices[-1]
    if top > MAX_DEVICES_PER_CORE * cores:
        raise UsageError(f"--devices {top}: more devices than this host can emulate ({MAX_DEVICES_PER_CORE} × {cores} cores = "
                         f"{MAX_DEVICES_PER_CORE * cores}); use at most {MAX_DEVICES_PER_CORE * cores}")
    if model is None:
        return
    from models.spec import get_spec
    from scaling.throughput.memory import per_device

    spec = get_spec(model, **model_opts)
    ram = total_ram()
    for b in backends:
        procs = top if b in ("torch-ddp",) else 1
        # the predicted state and activations of each device (scaling.throughput.memory), all in this RAM
        mem = per_device(spec.param_count, spec.activations_per_sample, batch_of(top) / top, top, sharding, optimizer)
        need = procs * PROCESS_RSS.get(b, 0.5e9) + top * mem.total_bytes
        if need > 0.8 * ram:
            raise UsageError(f"--devices {top} with {b}: predicted memory {need / 1e9:.1f} GB is above 80% of this host's "
                             f"RAM ({ram / 1e9:.1f} GB); use fewer devices, a smaller model/batch, or --sharding full")


def ranks_platform(backend: str) -> str:
    """'cpu', 'gpu' or 'tpu': what a ``backend`` run started on this host computes on, found
    without starting a framework (the platform variables a user set win, as in the frameworks)."""
    from launchers import colab

    env = os.environ
    if backend.startswith("jax") and env.get("JAX_PLATFORMS"):
        first = env["JAX_PLATFORMS"].split(",")[0].strip().lower()
        return {"cuda": "gpu", "rocm": "gpu"}.get(first, first)
    if backend == "torch-xla" and env.get("PJRT_DEVICE"):
        return {"CUDA": "gpu", "GPU": "gpu"}.get(env["PJRT_DEVICE"].upper(), env["PJRT_DEVICE"].lower())
    kind = colab.detect().kind
    if backend == "torch-ddp" and kind == "tpu":
        return "cpu"  # torch without torch_xla does not compute on a TPU
    return kind


def check_run(cfg: RunConfig) -> None:
    """One run: ``--hardware`` is a catalog id of the platform the ranks run on, and emulated
    devices fit this host."""
    platform = ranks_platform(cfg.backend)
    if cfg.hardware is not None:
        hw = catalog.get(cfg.hardware, measure=False)  # unknown id: exit 2 with the closest ids
        if hw.family != platform:
            raise UsageError(
                f"--hardware {cfg.hardware}: the ranks of this {cfg.backend} run compute on this host's {platform.upper()}, "
                f"not on a {hw.family.upper()}; --hardware names what the run is on (omit it to detect; "
                f"what-ifs on other hardware: podscale predict --hardware {cfg.hardware})")
    if platform == "cpu":
        check_host_capacity([cfg.backend], [cfg.devices], None if cfg.script else cfg.model, cfg.model_opts,
                            lambda n: cfg.global_batch, cfg.sharding, cfg.optimizer)
