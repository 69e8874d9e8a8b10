"""The hardware catalog: peak FLOPS, memory and links per chip, board, node and pod.

Figures live in ``hardware_catalog.toml`` beside this file, each with its source. ``host-cpu`` is
special: its peak is measured on this machine (best GEMM rate on all cores), because a catalog
figure for "whatever CPU runs the tests" would be a guess, and MFU against a guess is noise.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
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

#: fields a catalog entry may have (anything else is a typo: the catalog test rejects it)
FIELDS = {
    "name", "kind", "family", "year", "device", "devices", "chips", "peak_flops", "peak_note", "memory_bytes",
    "memory_bw", "source", "quoted", "derive", "of", "count", "price_usd", "price_year", "price_usd_per_hour",
    "price_source", "intra_bw", "intra_latency", "inter_bw", "inter_latency", "devices_per_node", "max_devices",
}
#: per-device or per-link figures a composite (node, pod) inherits from the entry it is made `of`
_INHERITED = ("family", "peak_flops", "peak_note", "memory_bytes", "memory_bw", "intra_bw", "intra_latency",
              "inter_bw", "inter_latency", "year")


@dataclass(frozen=True)
class Derivation:
    """A peak that follows from first principles: the product of ``factors`` (units x FLOPs/clock x clock)."""

    value: float
    text: str


@dataclass(frozen=True)
class Hardware:
    id: str
    name: str
    kind: str
    device: str
    """What one framework-visible device is on this entry."""
    peak_flops: dict[str, float] = field(default_factory=dict)
    """Dense peak FLOPS per device, by dtype key (fp32, tf32, fp16, bf16): the MFU basis."""
    memory_bytes: float | None = None
    memory_bw: float | None = None
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    family: str = "?"
    devices: int = 1
    """Framework-visible devices in this entry (a v3-8 board: 8; a GPU: 1)."""
    chips: int = 1
    year: int | None = None
    peak_note: str = ""
    quoted: dict[str, float] = field(default_factory=dict)
    """The whole entry's peak as a source quotes it (the lecture, a press release)."""
    quoted_source: str = ""
    derived: dict[str, Derivation] = field(default_factory=dict)
    """The whole entry's peak from first principles (or count x part for nodes and pods)."""
    price_usd: float | None = None
    price_usd_per_hour: float | None = None
    price_year: int | None = None
    price_source: str = ""
    intra_bw: float | None = None
    """Per-device one-direction ring bandwidth inside a node (B/s)."""
    intra_latency: float | None = None
    inter_bw: float | None = None
    """Per-node one-direction bandwidth between nodes (B/s)."""
    inter_latency: float | None = None
    devices_per_node: int | None = None
    max_devices: int | None = None
    """The cap on --devices (a pod's size); None = any count (nodes of devices_per_node)."""
    part_of: str | None = None

    def peak(self, dtype_key: str) -> float | None:
        return self.peak_flops.get(dtype_key)

    def peak_for(self, dtype: str) -> tuple[str, float | None]:
        """(peak key, per-device peak) that MFU for a run in ``dtype`` divides by.

        TPUs publish no fp32 matmul peak (fp32 matmuls run as bf16 passes), so an fp32 run on a TPU is
        measured against the bf16 peak, and the key says so."""
        key = PEAK_DTYPE.get(dtype, dtype)
        if key not in self.peak_flops and self.family == "tpu" and "bf16" in self.peak_flops:
            key = "bf16"
        return key, self.peak_flops.get(key)

    def total_peak(self, dtype_key: str) -> float | None:
        p = self.peak(dtype_key)
        return None if p is None else p * self.devices

    def headline(self, dtype_key: str) -> float | None:
        """The entry's whole peak as usually quoted: the quoted figure, else derived, else datasheet."""
        if dtype_key in self.quoted:
            return self.quoted[dtype_key]
        if dtype_key in self.derived:
            return self.derived[dtype_key].value
        return self.total_peak(dtype_key)

    def gflops_per_dollar(self) -> float | None:
        """fp32 GFLOPS per purchase dollar (the lecture's cost trend); None without a purchase price."""
        p = self.total_peak("fp32")
        return p / 1e9 / self.price_usd if p and self.price_usd else None

    def check_devices(self, n: int) -> None:
        if n < 1:
            raise UsageError(f"invalid --devices {n}: must be a positive integer")
        if self.max_devices is not None and n > self.max_devices:
            raise UsageError(f"--devices {n} exceeds {self.id}'s size of {self.max_devices} device(s) ({self.device})")


@lru_cache(maxsize=1)
def _raw_catalog() -> dict[str, dict[str, Any]]:
    return tomllib.loads(CATALOG_FILE.read_text())


def ids() -> list[str]:
    return list(_raw_catalog())


def closest(hw_id: str, n: int = 3) -> list[str]:
    """Catalog ids nearest to a mistyped one: ids containing it first (h100 -> h100-sxm), then by spelling."""
    raw = list(_raw_catalog())
    q = hw_id.lower()
    close = sorted((k for k in raw if q and (q in k or k in q)), key=len)
    close += [k for k in difflib.get_close_matches(q, raw, n=n, cutoff=0.3) if k not in close]
    return close[:n]


def get(hw_id: str) -> Hardware:
    raw = _raw_catalog()
    if hw_id not in raw:
        close = closest(hw_id)
        hint = f"closest: {', '.join(close)}" if close else f"valid: {', '.join(raw)}"
        raise UsageError(f"unknown hardware {hw_id!r}; {hint} (podscale hardware lists all)")
    hw = _build(hw_id, raw)
    if hw_id == "host-cpu":
        hw = dataclasses.replace(hw, peak_flops=measured_host_peaks(), devices_per_node=None)
    return hw


def all_hardware() -> list[Hardware]:
    """Every entry; host-cpu only from the cache (listing the catalog must not start a measurement)."""
    out = []
    for k in ids():
        if k == "host-cpu":
            hw = _build(k, _raw_catalog())
            out.append(dataclasses.replace(hw, peak_flops=measured_host_peaks(measure=False)))
        else:
            out.append(_build(k, _raw_catalog()))
    return out


def _build(hw_id: str, raw: dict[str, dict[str, Any]]) -> Hardware:
    d = dict(raw[hw_id])
    part: Hardware | None = None
    count = int(d.get("count", 1))
    if "of" in d:
        if d["of"] not in raw:
            raise ValueError(f"hardware catalog: {hw_id}.of = {d['of']!r} is not an entry")
        part = _build(d["of"], raw)
        for k in _INHERITED:
            if k not in d:
                v = getattr(part, k)
                if v is not None and v != {} and v != "":
                    d[k] = v
    devices = part.devices * count if part else int(d.get("devices", 1))
    chips = part.chips * count if part else int(d.get("chips", 1))
    quoted = {k: float(v) for k, v in d.get("quoted", {}).items() if k != "source"}
    derived: dict[str, Derivation] = {}
    for key, spec in d.get("derive", {}).items():
        derived[key] = Derivation(float(math.prod(spec["factors"])), spec["text"])
    if part is not None:
        for key in set(part.quoted) | set(part.derived) | set(part.peak_flops):
            v = part.headline(key)
            if v is not None and key not in derived:
                basis = "quoted" if key in part.quoted else "derived" if key in part.derived else "datasheet"
                derived[key] = Derivation(count * v, f"{count} x {part.id} ({basis} {v / 1e12:.4g} TFLOPS)")
    kind = d.get("kind", "?")
    dpn = d.get("devices_per_node")
    if dpn is None and kind in ("node", "tpu-board"):
        dpn = devices
    elif dpn is None and part is not None:
        dpn = part.devices_per_node if part.kind not in ("gpu", "tpu-chip") else part.devices * count
    max_dev = d.get("max_devices")
    if max_dev is None and part is not None:
        max_dev = devices
    known = FIELDS
    return Hardware(
        id=hw_id,
        name=d.get("name", hw_id),
        kind=kind,
        device=d.get("device", ""),
        peak_flops={k: float(v) for k, v in d.get("peak_flops", {}).items()},
        memory_bytes=d.get("memory_bytes"),
        memory_bw=d.get("memory_bw"),
        source=d.get("source", ""),
        extra={k: v for k, v in d.items() if k not in known},
        family=d.get("family", "?"),
        devices=devices,
        chips=chips,
        year=d.get("year"),
        peak_note=d.get("peak_note", ""),
        quoted=quoted,
        quoted_source=d.get("quoted", {}).get("source", ""),
        derived=derived,
        price_usd=d.get("price_usd"),
        price_usd_per_hour=d.get("price_usd_per_hour"),
        price_year=d.get("price_year"),
        price_source=d.get("price_source", ""),
        intra_bw=d.get("intra_bw"),
        intra_latency=d.get("intra_latency"),
        inter_bw=d.get("inter_bw"),
        inter_latency=d.get("inter_latency"),
        devices_per_node=dpn,
        max_devices=max_dev,
        part_of=d.get("of"),
    )


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


def measured_host_peaks(measure: bool = True, refresh: bool = False) -> dict[str, float]:
    """host-cpu's peak per dtype, from the cache or (if torch is importable) a short measurement.

    ``refresh`` re-measures: a peak measured while the machine was busy is too low, which shows up
    as a run achieving more than "peak" (``scaling.run.finish`` then asks for a fresh one)."""
    path = cache_dir() / "host_peak.json"
    fp = host_fingerprint()
    try:
        cached = json.loads(path.read_text())
        if cached.get("host") == fp and cached.get("peaks") and not refresh:
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
