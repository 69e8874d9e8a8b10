"""jax-pmap and jax-sharded: data parallel over JAX devices, one process per host.

``--devices N`` counts JAX devices over the whole job and ``--processes P`` spreads them over P
processes joined by ``jax.distributed`` on 127.0.0.1: the shape of a multi-host TPU pod slice,
reproduced on one machine. On a CPU host each process gets N/P emulated XLA devices (fixed before
JAX starts, hence one fresh process per layout), one compute thread each; on GPU/TPU hosts the
real local devices are used.

This module stays light (no JAX import) because the launcher and ``podscale`` front ends import
it; the training code lives in ``jax_train``.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re
from typing import Any

from models import flax as mflax
from scaling.config import RunConfig
from scaling.backends.jax_env import cpu_malloc_env, step_kind
from scaling.errors import UsageError

NAMES = ("jax-pmap", "jax-sharded")

#: one compute thread per emulated device: N devices share the host's cores without oversubscribing
#: them. Accepted by the XLA of jax 0.7.2 and 0.10.2 (an unknown XLA flag aborts the process).
CPU_THREAD_FLAGS = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"

_COUNT_FLAG = re.compile(r"--xla_force_host_platform_device_count=\S+")


def accelerator() -> str | None:
    """'tpu', 'gpu' or None (CPU only), found without importing JAX (the launcher must stay light)."""
    if os.environ.get("JAX_PLATFORMS", "").strip().lower() == "cpu":
        return None
    if glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"):
        if importlib.util.find_spec("libtpu") is not None:
            return "tpu"
    if glob.glob("/dev/nvidia[0-9]*") and any(
        importlib.util.find_spec(p) is not None for p in ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_plugins.xla_cuda12")
    ):
        return "gpu"
    return None


def _gpu_count() -> int:
    return len(glob.glob("/dev/nvidia[0-9]*"))


def validate(cfg: RunConfig) -> None:
    if cfg.backend not in NAMES:
        raise UsageError(f"backend {cfg.backend!r} is not a JAX backend; valid: {', '.join(NAMES)}")
    if step_kind() != "jit" and cfg.backend != "jax-sharded":
        raise UsageError(f"PODSCALE_JAX_STEP={step_kind()} applies to --backend jax-sharded, not {cfg.backend}")
    if not mflax.has_model(cfg.model):
        raise UsageError(f"--model {cfg.model!r} has no flax module yet; models on {cfg.backend}: {', '.join(mflax.MODULES)}")
    procs = cfg.processes or 1
    acc = accelerator()
    if acc == "gpu" and cfg.devices > _gpu_count():
        raise UsageError(f"--devices {cfg.devices}: this host has {_gpu_count()} GPU(s); use at most that many")
    if acc == "tpu" and procs > 1:
        raise UsageError(f"--processes {procs}: on a TPU host JAX runs one process per host; use --processes 1 (pod slices: podscale launch)")


def layout(cfg: RunConfig) -> list[dict[str, str]]:
    """One env per process. CPU: N/P emulated devices each, one thread per device, and glibc's
    malloc set so that XLA's per-step temporaries do not fault in afresh (``jax_env.MALLOC_TUNABLES``)."""
    procs = cfg.processes or 1
    per = cfg.devices // procs
    acc = accelerator()
    if acc == "gpu":
        return [{"CUDA_VISIBLE_DEVICES": ",".join(str(p * per + i) for i in range(per))} if procs > 1 else {} for p in range(procs)]
    if acc == "tpu":
        return [{}]
    flags = _COUNT_FLAG.sub("", os.environ.get("XLA_FLAGS", ""))
    flags = " ".join(f"{flags} --xla_force_host_platform_device_count={per} {CPU_THREAD_FLAGS}".split())
    env = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags, "OMP_NUM_THREADS": "1", **cpu_malloc_env()}
    return [dict(env) for _ in range(procs)]


def worker(cfg: RunConfig, ctx: Any) -> dict[str, Any] | None:
    from scaling.backends import jax_train

    return jax_train.worker(cfg, ctx)


def compiled_stats(cfg: RunConfig) -> dict[str, float | int | None]:
    """Per-step communication and FLOPs of ``cfg``'s compiled step, without training.

    Runs in the calling process on its first ``cfg.devices`` JAX devices (on CPU start it with
    ``XLA_FLAGS=--xla_force_host_platform_device_count>=N``). Keys: ``comm_bytes_per_step`` (all-
    reduce bytes per device from the HLO), ``xla_flops_per_device``, ``xla_flops_per_step``.
    """
    from scaling.backends import jax_train

    return jax_train.compiled_stats(cfg)


def allreduce_bytes(cfg: RunConfig) -> int:
    """All-reduce bytes of one data-parallel step of ``cfg`` (see ``compiled_stats``)."""
    return int(compiled_stats(cfg)["comm_bytes_per_step"] or 0)
