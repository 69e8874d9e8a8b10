"""What a JAX process needs to know about where it runs, without importing JAX: the chip's catalog
id and the kind of step jax-sharded builds. Shared by the light launcher side (``jax_dp``) and the
training side (``jax_train``), which therefore need not import each other.
"""

from __future__ import annotations

import os
import re
from typing import Any

from scaling.errors import UsageError


#: glibc malloc for a JAX process on CPU: allocations from the heap (no mmap), the heap never
#: trimmed. XLA-CPU allocates a program's temporaries afresh for each execution; past glibc's mmap
#: ceiling (32 MiB) that is an mmap per step, and every page of it faults anew: gpt-tiny (2 layers,
#: 16 samples a device: 35 MiB of temporaries) took 9,300 minor faults a step here.
#: ``bench/allocator.py``, podscale's step / glibc's defaults', median of 4 ABBA pairs: jax-sharded
#: N = 4 0.75, jax-pmap N = 4 0.78, N = 1 0.80; the mlp at N = 8 1.01 (pmap), 0.92 (sharded). A device
#: thread's arena holds at most 64 MiB in one piece, so pmap's threads still fault some; one arena
#: for all threads (``arena_max=1``) made jax-pmap N = 1 1.2x faster again but N = 16 17% slower
#: and the mlp at N = 8 8% slower, so it is left out. torch's CPU runs and torch_xla's gained
#: nothing: they keep glibc's defaults.
MALLOC_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967296"


def cpu_malloc_env() -> dict[str, str]:
    """``GLIBC_TUNABLES`` for a fresh JAX CPU process (glibc reads it when the process starts, so
    it cannot be set from inside one); a user's own ``GLIBC_TUNABLES`` wins, whole."""
    return {} if "GLIBC_TUNABLES" in os.environ else {"GLIBC_TUNABLES": MALLOC_TUNABLES}


def step_kind() -> str:
    """jax-sharded's step: ``jit`` (XLA partitions the global step; default) or ``shard_map``
    (the per-device step with explicit collectives), chosen by ``PODSCALE_JAX_STEP``."""
    kind = os.environ.get("PODSCALE_JAX_STEP", "jit")
    if kind not in ("jit", "shard_map"):
        raise UsageError(f"PODSCALE_JAX_STEP={kind!r}; valid: jit, shard_map (jax-sharded only)")
    return kind


def hardware_id(device: Any) -> str:
    """Catalog id of a JAX device's chip: ``host-cpu``, ``h100-sxm``, ``tpu-v5e``, ...

    TPU ids follow the catalog (``tpu-v3-chip``, ``tpu-v4``, ``tpu-v5e``, ``tpu-v5p``, ``tpu-v6e``;
    "lite" chips are the ``e`` parts). A chip
    the catalog lacks keeps its own name, so MFU stays empty rather than borrowing another peak.
    """
    if device.platform == "cpu":
        return "host-cpu"
    kind = str(getattr(device, "device_kind", "")).lower()
    if device.platform in ("gpu", "cuda") or "nvidia" in kind:
        return "h200" if "h200" in kind else "h100-sxm" if "h100" in kind else "unknown-gpu"
    m = re.search(r"tpu\s*v?(\d+)\s*(lite|e|p)?", kind)
    if m:
        gen, variant = m.group(1), m.group(2)
        if gen in ("2", "3"):
            return f"tpu-v{gen}-chip"  # the catalog's v2/v3 entries are per chip (2 JAX devices each)
        suffix = "e" if variant in ("lite", "e") else "p" if variant == "p" or gen == "5" else ""
        return f"tpu-v{gen}{suffix}"
    return f"unknown-{device.platform}"
