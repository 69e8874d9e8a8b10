"""The hardware catalog: peak FLOPS, memory and links per chip, board, node and pod.

Figures live in ``hardware_catalog.toml`` beside this file, each with its source. ``host-cpu`` is
special: its peak is measured on this machine (best GEMM rate on all cores), because a catalog
figure for "whatever CPU runs the tests" would be a guess, and MFU against a guess is noise.
"""

from __future__ import annotations

import difflib
import json
import os
import platform
import time
import tomllib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from scaling.errors import UsageError

CATALOG_FILE = Path(__file__).with_name("hardware_catalog.toml")

#: RunConfig dtype -> the catalog's peak key that dtype's matmuls run at
PEAK_DTYPE = {"float32": "fp32", "bfloat16": "bf16"}


@dataclass(frozen=True)
class Hardware:
    id: str
    name: str
    kind: str
    device: str
    """What one framework-visible device is on this entry."""
    peak_flops: dict[str, float] = field(default_factory=dict)
    """Dense peak FLOPS per device, by dtype key (fp32, tf32, fp16, bf16)."""
    memory_bytes: float | None = None
    memory_bw: float | None = None
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def peak(self, dtype_key: str) -> float | None:
        return self.peak_flops.get(dtype_key)


@lru_cache(maxsize=1)
def _raw_catalog() -> dict[str, dict[str, Any]]:
    return tomllib.loads(CATALOG_FILE.read_text())


def ids() -> list[str]:
    return list(_raw_catalog())


def get(hw_id: str) -> Hardware:
    raw = _raw_catalog()
    if hw_id not in raw:
        close = difflib.get_close_matches(hw_id, list(raw), n=3, cutoff=0.3)
        hint = f"closest: {', '.join(close)}" if close else f"valid: {', '.join(raw)}"
        raise UsageError(f"unknown hardware {hw_id!r}; {hint} (podscale hardware lists all)")
    d = dict(raw[hw_id])
    known = {"name", "kind", "device", "peak_flops", "memory_bytes", "memory_bw", "source"}
    extra = {k: v for k, v in d.items() if k not in known}
    hw = Hardware(
        id=hw_id,
        name=d.get("name", hw_id),
        kind=d.get("kind", "?"),
        device=d.get("device", ""),
        peak_flops=dict(d.get("peak_flops", {})),
        memory_bytes=d.get("memory_bytes"),
        memory_bw=d.get("memory_bw"),
        source=d.get("source", ""),
        extra=extra,
    )
    if hw_id == "host-cpu":
        hw = Hardware(**{**hw.__dict__, "peak_flops": measured_host_peaks()})
    return hw


# ---- host-cpu: measured peak ----------------------------------------------------------------


def cache_dir() -> Path:
    """Where measurements are cached; PODSCALE_CACHE_DIR isolates tests and CI."""
    d = Path(os.environ.get("PODSCALE_CACHE_DIR") or Path.home() / ".cache" / "podscale")
    d.mkdir(parents=True, exist_ok=True)
    return d


def host_fingerprint() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu} x{os.cpu_count()}"


def host_cores() -> int:
    """Cores this process may use (affinity-aware: containers often restrict them)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def measure_gemm_flops(dtype_key: str, threads: int, n: int = 512, seconds: float = 0.3) -> float:
    """Best-of-repeats GEMM rate (FLOPS) with ``threads`` threads: the CPU's practical peak."""
    import torch

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_key]
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a = torch.randn(n, n, dtype=dt)
        b = torch.randn(n, n, dtype=dt)
        for _ in range(3):
            a @ b
        best = 0.0
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            t = time.perf_counter()
            for _ in range(4):
                a @ b
            dt_s = (time.perf_counter() - t) / 4
            best = max(best, 2 * n**3 / dt_s)
        return best
    finally:
        torch.set_num_threads(old)


def measured_host_peaks(measure: bool = True) -> dict[str, float]:
    """host-cpu's peak per dtype, from the cache or (if torch is importable) a short measurement."""
    path = cache_dir() / "host_peak.json"
    fp = host_fingerprint()
    try:
        cached = json.loads(path.read_text())
        if cached.get("host") == fp and cached.get("peaks"):
            return dict(cached["peaks"])
    except (OSError, ValueError):
        pass
    if not measure:
        return {}
    try:
        import torch  # noqa: F401
    except ImportError:
        return {}
    peaks = {k: measure_gemm_flops(k, host_cores()) for k in ("fp32", "bf16")}
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"host": fp, "peaks": peaks, "measured_at": time.time()}))
    os.replace(tmp, path)
    return peaks


def detect(backend: str) -> str:
    """The catalog id of the hardware a run on this machine uses (without importing jax)."""
    if backend.startswith("torch"):
        try:
            import torch

            if torch.cuda.is_available():
                name = torch.cuda.get_device_name(0).lower()
                if "h200" in name:
                    return "h200"
                if "h100" in name:
                    return "h100-sxm"
                return "unknown-gpu"
        except ImportError:
            pass
    return "host-cpu"
