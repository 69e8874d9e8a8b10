"""The machine podscale runs on: its cores, its fingerprint, the cache of what was measured on it.

``host-cpu`` has no catalog peak: the best GEMM rate on all cores is measured here, because a
catalog figure for "whatever CPU runs the tests" would be a guess, and MFU against a guess is noise.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

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


#: GEMM repeats per dtype, and how close the best 3 must agree for the peak to be cached
PEAK_REPEATS = 7
PEAK_AGREE = 0.05
#: seconds one repeat lasts: a few-millisecond repeat on a VM wobbles by 10-20% on an idle machine
REPEAT_S = 0.1


def measure_gemm_flops(dtype_key: str, threads: int, n: int | None = None, repeats: int = PEAK_REPEATS) -> tuple[float, float]:
    """(best GEMM rate in FLOPS, spread of the best 3 repeats) with ``threads`` threads.

    The best rate is the CPU's practical peak; the spread says whether it can be trusted: on a busy
    machine the repeats disagree, and a peak measured then is too low (MFU above 100% later)."""
    import torch

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_key]
    n = n or (512 if dtype_key == "fp32" else 256)  # bf16 without native support is ~100x slower here
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a = torch.randn(n, n, dtype=dt)
        b = torch.randn(n, n, dtype=dt)
        for _ in range(2):
            a @ b
        t = time.perf_counter()
        a @ b
        per = max(1, int(REPEAT_S / max(time.perf_counter() - t, 1e-6)))  # GEMMs per repeat: ~REPEAT_S each
        rates = []
        for _ in range(repeats):
            t = time.perf_counter()
            for _ in range(per):
                a @ b
            rates.append(2 * n**3 * per / (time.perf_counter() - t))
        top = sorted(rates, reverse=True)[:3]
        return top[0], top[0] / top[-1] - 1
    finally:
        torch.set_num_threads(old)


def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16, AMX, Arm BF16); without it torch
    emulates bf16 matmuls far below the fp32 rate, and MFU is held against that emulated rate."""
    try:
        flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith(("flags", "Features"))), "")
    except OSError:
        return False
    words = set(flags.split(":", 1)[-1].split())
    return bool(words & {"avx512_bf16", "amx_bf16", "bf16"})


class BusyMachine(RuntimeError):
    """The GEMM repeats disagreed: the peak would be wrong, so it is not cached."""


def measure_host_peaks() -> dict[str, float]:
    """fp32 and bf16 peaks on all cores; raises BusyMachine when the best 3 of the repeats disagree
    by more than PEAK_AGREE (another process was using the cores)."""
    peaks = {}
    for k in ("fp32", "bf16"):
        best, spread = measure_gemm_flops(k, host_cores())
        if spread > PEAK_AGREE:
            raise BusyMachine(f"the machine is busy: the best 3 of {PEAK_REPEATS} {k} GEMM repeats differ by "
                              f"{spread:.0%} (> {PEAK_AGREE:.0%}); the host peak was not cached: calibrate again when idle")
        peaks[k] = best
    return peaks


def measured_host_peaks(measure: bool = True, write: bool = False) -> dict[str, float]:
    """host-cpu's peak per dtype, from the cache, else (``measure``, torch importable) measured now.

    Only ``write`` (``podscale calibrate``) writes the cache, and only a steady measurement: a run
    never rewrites it, so MFU is always against the same, trusted peak. Without a cache a run
    measures for itself (best of the repeats, steady or not) and leaves no file behind."""
    path = cache_dir() / "host_peak.json"
    fp = host_fingerprint()
    if not write:
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
    if not write:
        return {k: measure_gemm_flops(k, host_cores())[0] for k in ("fp32", "bf16")}
    peaks = measure_host_peaks()
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"host": fp, "peaks": peaks, "measured_at": time.time(), "repeats": PEAK_REPEATS}))
    os.replace(tmp, path)
    return peaks
