"""``podscale cluster validate FILE``: check a Ray cluster-launcher YAML offline, then say what it
holds (chips per node, nodes, peak PFLOPS from the hardware catalog).

Ray's own ``prepare_config`` + ``validate_config`` check the schema (a misspelled top-level key
fails there) but not what is inside a provider's ``node_config``: an unknown instance type, TPU
accelerator type or topology would only fail minutes into ``ray up``, on a bill. Those are
checked here against tables of the instance types podscale knows.
"""

from __future__ import annotations

import copy
import difflib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scaling.errors import UsageError

#: cloud instance / machine type -> (catalog id, accelerators per node). A100 40GB and 80GB SXM4
#: have the same compute peaks, so both map to the catalog's a100-sxm4.
INSTANCE_TYPES: dict[str, tuple[str, int]] = {
    # AWS
    "p4d.24xlarge": ("a100-sxm4", 8),
    "p4de.24xlarge": ("a100-sxm4", 8),
    "p5.48xlarge": ("h100-sxm", 8),
    "p5e.48xlarge": ("h200", 8),
    "p5en.48xlarge": ("h200", 8),
    "p3.16xlarge": ("v100-sxm2", 8),
    "p3dn.24xlarge": ("v100-sxm2", 8),
    # GCP
    "a2-highgpu-1g": ("a100-sxm4", 1),
    "a2-highgpu-2g": ("a100-sxm4", 2),
    "a2-highgpu-4g": ("a100-sxm4", 4),
    "a2-highgpu-8g": ("a100-sxm4", 8),
    "a2-megagpu-16g": ("a100-sxm4", 16),
    "a2-ultragpu-8g": ("a100-sxm4", 8),
    "a3-highgpu-8g": ("h100-sxm", 8),
    "a3-megagpu-8g": ("h100-sxm", 8),
    "a3-ultragpu-8g": ("h200", 8),
}

#: TPU generation (as in acceleratorType "v4-32" / acceleratorConfig type "V4") -> (catalog id,
#: TensorCores the type's number counts per chip: v2-v4 and v5p count cores, 2 per chip)
TPU_TYPES: dict[str, tuple[str, int]] = {
    "v2": ("tpu-v2-chip", 2),
    "v3": ("tpu-v3-chip", 2),
    "v4": ("tpu-v4", 2),
    "v5litepod": ("tpu-v5e", 1),
    "v5e": ("tpu-v5e", 1),
    "v5p": ("tpu-v5p", 2),
    "v6e": ("tpu-v6e", 1),
}

#: Ray's ``accelerator_type:<X>`` resource names -> catalog id (on-prem files declare these)
RAY_ACCELERATOR_TYPES: dict[str, str] = {
    "A100": "a100-sxm4", "H100": "h100-sxm", "H200": "h200", "V100": "v100-sxm2", "P100": "p100-sxm2",
    "TPU-V4": "tpu-v4", "TPU-V5LITEPOD": "tpu-v5e", "TPU-V5P": "tpu-v5p", "TPU-V6E": "tpu-v6e",
}

GCP_GPU_TYPES: dict[str, str] = {
    "nvidia-tesla-a100": "a100-sxm4", "nvidia-a100-80gb": "a100-sxm4", "nvidia-h100-80gb": "h100-sxm",
    "nvidia-h100-mega-80gb": "h100-sxm", "nvidia-tesla-v100": "v100-sxm2", "nvidia-tesla-p100": "p100-pcie",
}


@dataclass
class NodeType:
    name: str
    hardware: str | None
    accelerators: int
    min_nodes: int
    max_nodes: int
    where: str
    """The YAML path the hardware was read from (error messages name it)."""


@dataclass
class ClusterReport:
    path: Path
    provider: str
    node_types: list[NodeType] = field(default_factory=list)

    def peak_flops(self, dtype_key: str, at: str = "max") -> float | None:
        """Sum over node types of nodes x accelerators x the catalog's dense peak per device."""
        from scaling.throughput import catalog

        total, known = 0.0, False
        for nt in self.node_types:
            if nt.hardware is None or not nt.accelerators:
                continue
            peak = catalog.get(nt.hardware).peak(dtype_key)
            if peak is None:
                continue
            known = True
            total += (nt.max_nodes if at == "max" else nt.min_nodes) * nt.accelerators * peak
        return total if known else None

    def summary(self) -> str:
        lines = [f"{self.path}: valid Ray cluster config (provider {self.provider})"]
        for nt in self.node_types:
            hw = f"{nt.accelerators} x {nt.hardware}" if nt.hardware else "no accelerator podscale knows"
            lines.append(f"  {nt.name}: {nt.min_nodes}..{nt.max_nodes} node(s), {hw}")
        peaks = []
        for key in ("bf16", "fp32"):
            lo, hi = self.peak_flops(key, "min"), self.peak_flops(key, "max")
            if hi is not None:
                peaks.append(f"{key} {lo / 1e15:.3g}..{hi / 1e15:.3g} PFLOPS" if lo != hi else f"{key} {hi / 1e15:.3g} PFLOPS")
        lines.append("  peak (dense, catalog, min..max nodes): " + ("; ".join(peaks) if peaks else "unknown (no catalog accelerator)"))
        return "\n".join(lines)


def _fail(path: Path, msg: str) -> UsageError:
    return UsageError(f"{path}: {msg}")


def _schema_error(path: Path, e: Exception) -> UsageError:
    """jsonschema's message, reduced to the field that is wrong and what would be valid."""
    import json

    import ray.autoscaler

    msg = str(getattr(e, "message", e)).splitlines()[0]
    where = ".".join(str(p) for p in getattr(e, "absolute_path", [])) or "top level"
    m = re.search(r"\('([^']+)' (?:was|were) unexpected\)", msg)
    if m:
        schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
        node = schema
        for part in getattr(e, "absolute_schema_path", []):
            if part == "additionalProperties":
                break
            node = node.get(part, {}) if isinstance(node, dict) else {}
        valid = sorted(node.get("properties", {})) if isinstance(node, dict) else []
        close = difflib.get_close_matches(m.group(1), valid, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else (f"; valid: {', '.join(valid)}" if valid else "")
        return _fail(path, f"unknown key {m.group(1)!r} at {where}{hint}")
    return _fail(path, f"invalid {where}: {msg}")


def load(path: Path) -> dict[str, Any]:
    import yaml

    if not path.is_file():
        raise UsageError(f"cluster validate {str(path)!r}: no such file")
    try:
        cfg = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise _fail(path, f"not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(cfg, dict):
        raise _fail(path, "must hold a mapping (a Ray cluster config)")
    return cfg


def validate_file(path: Path) -> ClusterReport:
    import logging

    from ray.autoscaler._private.util import prepare_config, validate_config

    logging.getLogger("ray.autoscaler").setLevel(logging.WARNING)
    raw = load(path)
    try:
        cfg = prepare_config(copy.deepcopy(raw))
        validate_config(cfg)
    except UsageError:
        raise
    except Exception as e:  # noqa: BLE001 - jsonschema / Ray's ValueError become one line
        if type(e).__name__ == "ValidationError":
            raise _schema_error(path, e) from None
        raise _fail(path, str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    provider = cfg["provider"]["type"]
    report = ClusterReport(path=path, provider=provider)
    head = cfg.get("head_node_type")
    for name, nt in cfg.get("available_node_types", {}).items():
        hw, n, where = _node_hardware(path, provider, name, nt)
        lo, hi = int(nt.get("min_workers", 0)), int(nt.get("max_workers", 0))
        if name == head:
            lo, hi = lo + 1, hi + 1
        report.node_types.append(NodeType(name, hw, n, lo, hi, where))
    return report


def _node_hardware(path: Path, provider: str, name: str, nt: dict[str, Any]) -> tuple[str | None, int, str]:
    base = f"available_node_types.{name}"
    nc = nt.get("node_config") or {}
    res = nt.get("resources") or {}
    if provider == "aws" and "InstanceType" in nc:
        return (*_instance(path, nc["InstanceType"], f"{base}.node_config.InstanceType"), f"{base}.node_config.InstanceType")
    if provider == "gcp":
        if "acceleratorType" in nc or "acceleratorConfig" in nc:
            return (*_tpu(path, nc, f"{base}.node_config"), f"{base}.node_config")
        if "machineType" in nc:
            mt = nc["machineType"].rsplit("/", 1)[-1]
            gpus = nc.get("guestAccelerators") or []
            if gpus:
                g = gpus[0]
                t = str(g.get("acceleratorType", "")).rsplit("/", 1)[-1]
                if t not in GCP_GPU_TYPES:
                    raise _fail(path, f"unknown GPU type {t!r} in {base}.node_config.guestAccelerators; valid: {', '.join(GCP_GPU_TYPES)}")
                return GCP_GPU_TYPES[t], int(g.get("acceleratorCount", 1)), f"{base}.node_config.guestAccelerators"
            if mt in INSTANCE_TYPES:
                return (*INSTANCE_TYPES[mt], f"{base}.node_config.machineType")
            if re.match(r"^(a2|a3|g2)-", mt):  # a GPU family we do not know: say so rather than count it as CPU
                raise _fail(path, f"unknown GPU machine type {mt!r} in {base}.node_config.machineType; known: "
                            + ", ".join(k for k in INSTANCE_TYPES if not k.startswith("p")))
            return None, 0, f"{base}.node_config.machineType"
    for k in res:
        if k.startswith("accelerator_type:"):
            t = k.split(":", 1)[1]
            if t.upper() not in RAY_ACCELERATOR_TYPES:
                raise _fail(path, f"unknown accelerator type {t!r} in {base}.resources ({k!r}); valid: "
                            + ", ".join(f"accelerator_type:{x}" for x in RAY_ACCELERATOR_TYPES))
            count = int(res.get("TPU", res.get("GPU", 0)))
            return RAY_ACCELERATOR_TYPES[t.upper()], count, f"{base}.resources"
    return None, int(res.get("GPU", 0)), f"{base}.resources"


def _instance(path: Path, itype: str, where: str) -> tuple[str | None, int]:
    if itype in INSTANCE_TYPES:
        return INSTANCE_TYPES[itype]
    family = itype.split(".", 1)[0]
    if family[:1] in ("p", "g") or family.startswith(("trn", "inf")):
        close = difflib.get_close_matches(itype, list(INSTANCE_TYPES), n=2)
        raise UsageError(f"{path}: unknown accelerator instance type {itype!r} in {where}; "
                         + (f"closest: {', '.join(close)}" if close else f"known: {', '.join(INSTANCE_TYPES)}"))
    return None, 0  # a CPU instance (m5, c6i, ...): fine as a head, no accelerator


def _tpu(path: Path, nc: dict[str, Any], base: str) -> tuple[str, int]:
    """TPU chips of one slice from ``acceleratorType: v4-32`` or ``acceleratorConfig: {type: V4,
    topology: 2x2x4}``; the type must be a generation in the catalog and the shape must be whole."""
    valid = ", ".join(sorted(TPU_TYPES))
    if "acceleratorType" in nc and "acceleratorConfig" in nc:
        raise _fail(path, f"{base} sets both acceleratorType and acceleratorConfig; keep one")
    if "acceleratorType" in nc:
        at = str(nc["acceleratorType"])
        m = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", at.lower())
        if not m or m.group(1) not in TPU_TYPES:
            raise _fail(path, f"unknown TPU accelerator type {at!r} in {base}.acceleratorType; valid: <generation>-<size> with generation in {valid} (e.g. v4-32, v5litepod-16)")
        hw, per_chip = TPU_TYPES[m.group(1)]
        n = int(m.group(2))
        if n % per_chip:
            raise _fail(path, f"{base}.acceleratorType {at!r}: {m.group(1)} counts {per_chip} cores per chip, so the size must be a multiple of {per_chip}")
        return hw, n // per_chip
    ac = nc["acceleratorConfig"]
    if not isinstance(ac, dict):
        raise _fail(path, f"{base}.acceleratorConfig must be a mapping with type and topology")
    t = str(ac.get("type", "")).lower()
    if t not in TPU_TYPES:
        raise _fail(path, f"unknown TPU type {ac.get('type')!r} in {base}.acceleratorConfig.type; valid: {', '.join(x.upper() for x in sorted(TPU_TYPES))}")
    topo = str(ac.get("topology", ""))
    if not re.fullmatch(r"\d+(x\d+){1,2}", topo):
        raise _fail(path, f"invalid TPU topology {topo!r} in {base}.acceleratorConfig.topology; expected AxB or AxBxC (e.g. 2x2x4)")
    dims = [int(x) for x in topo.split("x")]
    if t in ("v4", "v5p") and len(dims) != 3:
        raise _fail(path, f"TPU {t} topology {topo!r} in {base}.acceleratorConfig.topology must be 3-D (AxBxC)")
    if t in ("v5e", "v5litepod", "v6e") and len(dims) != 2:
        raise _fail(path, f"TPU {t} topology {topo!r} in {base}.acceleratorConfig.topology must be 2-D (AxB)")
    return TPU_TYPES[t][0], math.prod(dims)
