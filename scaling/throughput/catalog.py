"""The hardware catalog: peak FLOPS, memory and links per chip, board, node and pod.

Figures live in ``hardware_catalog.toml`` beside this file, each with its source. ``host-cpu`` is
special: its peak is measured on this machine (best GEMM rate on all cores), because a catalog
figure for "whatever CPU runs the tests" would be a guess, and MFU against a guess is noise.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from scaling.errors import UsageError
from scaling.throughput.host import measured_host_peaks

CATALOG_FILE = Path(__file__).with_name("hardware_catalog.toml")

#: RunConfig dtype -> the catalog's peak key that dtype's matmuls run at
PEAK_DTYPE = {"float32": "fp32", "tf32": "tf32", "float16": "fp16", "bfloat16": "bf16"}
"""float16 = AMP (fp16 matmuls with fp32 master weights and loss scaling) on GPUs; tf32 = fp32 storage
with TF32 tensor-core matmuls (Ampere and later)."""

#: fields a catalog entry may have (anything else is a typo: the catalog test rejects it)
FIELDS = {
    "name", "kind", "family", "year", "device", "devices", "chips", "peak_flops", "peak_note", "memory_bytes",
    "memory_bw", "source", "quoted", "derive", "of", "count", "price_usd", "price_year", "price_usd_per_hour",
    "price_source", "intra_bw", "intra_latency", "inter_bw", "inter_latency", "devices_per_node", "max_devices",
    "link_source", "latency_source", "memory_source", "intra_link", "ici_link_bw", "ici_links", "torus_dims",
    "max_slice_chips", "slice_source", "dcn_bw", "dcn_source", "arch",
}
#: per-device or per-link figures a composite (node, pod) inherits from the entry it is made `of`
_INHERITED = ("family", "peak_flops", "peak_note", "memory_bytes", "memory_bw", "intra_bw", "intra_latency",
              "inter_bw", "inter_latency", "year", "link_source", "latency_source", "memory_source", "intra_link",
              "ici_link_bw", "ici_links", "torus_dims", "max_slice_chips", "slice_source", "dcn_bw", "dcn_source",
              "arch")


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
    link_source: str = ""
    latency_source: str = ""
    memory_source: str = ""
    intra_link: str = "nvlink"
    """What carries intra_bw: nvlink (NVLink/NVSwitch), pcie, or ici."""
    ici_link_bw: float | None = None
    """TPU: one ICI link's bandwidth in one direction (B/s); the torus all-reduce uses 2 per dimension."""
    ici_links: int | None = None
    torus_dims: int | None = None
    """TPU: dimensions of the ICI torus (2: v2, v3, v5e, v6e; 3: v4, v5p, TPU7x)."""
    max_slice_chips: int | None = None
    """TPU: the largest single ICI slice in chips; beyond it only multislice (--slices) over DCN."""
    slice_source: str = ""
    dcn_bw: float | None = None
    """TPU: data-center network bandwidth per chip, one direction (B/s), for multislice."""
    dcn_source: str = ""
    arch: str = ""
    """GPU architecture (pascal, volta, ampere, ...): which execution units the chip has."""

    @property
    def devices_per_chip(self) -> int:
        return max(1, self.devices // max(1, self.chips))

    @property
    def max_slice_devices(self) -> int | None:
        return None if self.max_slice_chips is None else self.max_slice_chips * self.devices_per_chip

    def dtypes(self) -> list[str]:
        """The run dtypes this hardware has a unit for (float32 on a TPU runs as bf16 passes)."""
        return [d for d in PEAK_DTYPE if self.peak_for(d)[1] is not None]

    def peak(self, dtype_key: str) -> float | None:
        return self.peak_flops.get(dtype_key)

    def peak_for(self, dtype: str) -> tuple[str, float | None]:
        """(peak key, per-device peak) that MFU for a run in ``dtype`` divides by.

        TPUs publish no fp32 matmul peak (fp32 matmuls run as bf16 passes), so an fp32 run on a TPU is
        measured against the bf16 peak, and the key says so."""
        key = PEAK_DTYPE.get(dtype, dtype)
        if dtype == "float32" and key not in self.peak_flops and self.family == "tpu" and "bf16" in self.peak_flops:
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

    def check_devices(self, n: int, slices: int = 1) -> None:
        """A count this entry can hold: a node is multiplied over its fabric (nodes x count); a TPU
        slice ends at the largest ICI slice unless ``slices`` > 1 (multislice over DCN)."""
        if n < 1:
            raise UsageError(f"invalid --devices {n}: must be a positive integer")
        if not isinstance(slices, int) or slices < 1:
            raise UsageError(f"invalid --slices {slices!r}: must be a positive integer")
        if slices > 1 and self.dcn_bw is None:
            raise UsageError(f"--slices {slices}: {self.id} has no data-center network figure in the catalog (no multislice); "
                             f"valid: --slices 1")
        if n % slices:
            raise UsageError(f"--devices {n} does not split into --slices {slices}; use a multiple of {slices}")
        cap = self.max_devices
        if self.max_slice_devices is not None:
            cap = self.max_slice_devices if cap is None else min(cap, self.max_slice_devices)
        if cap is not None and n // slices > cap:
            hint = f"; beyond it use --slices K (multislice over DCN), K >= {-(-n // cap)}" if self.dcn_bw else ""
            raise UsageError(f"--devices {n} exceeds {self.id}'s largest slice of {cap} device(s) ({self.device}){hint}")


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


def get(hw_id: str, measure: bool = True) -> Hardware:
    """The catalog entry ``hw_id``; ``measure=False``: host-cpu's peaks only from the cache (a check
    of the id must not start a measurement)."""
    raw = _raw_catalog()
    if hw_id not in raw:
        close = closest(hw_id)
        hint = f"closest: {', '.join(close)}" if close else f"valid: {', '.join(raw)}"
        raise UsageError(f"unknown hardware {hw_id!r}; {hint} (podscale hardware lists all)")
    hw = _build(hw_id, raw)
    if hw_id == "host-cpu":
        hw = dataclasses.replace(hw, peak_flops=measured_host_peaks(measure=measure), devices_per_node=None)
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
    if max_dev is None and part is not None and kind != "node":
        max_dev = devices  # a pod or a board is its own size; a node is multiplied (nodes x count)
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
        link_source=d.get("link_source", ""),
        latency_source=d.get("latency_source", ""),
        memory_source=d.get("memory_source", ""),
        intra_link=d.get("intra_link", "nvlink"),
        ici_link_bw=d.get("ici_link_bw"),
        ici_links=d.get("ici_links"),
        torus_dims=d.get("torus_dims"),
        max_slice_chips=d.get("max_slice_chips"),
        slice_source=d.get("slice_source", ""),
        dcn_bw=d.get("dcn_bw"),
        dcn_source=d.get("dcn_source", ""),
        arch=d.get("arch", ""),
    )



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
