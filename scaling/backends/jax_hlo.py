"""Reading a compiled XLA step: all-reduce bytes from the HLO text, FLOPs from cost analysis.

Pure text and dict handling, no JAX import, so the numbers can be checked (and the parser tested)
anywhere. The all-reduce bytes of one data-parallel step are deterministic: the gradient bytes of
the spec plus the few bytes of the all-reduced scalar loss. That is how a test proves the
backend communicates exactly the gradients, once, without timing anything.
"""

from __future__ import annotations

import math
import re
from typing import Any

#: bytes per element of the HLO element types that can appear in a collective
DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
    "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
    "s32": 4, "u32": 4, "f32": 4,
    "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
}

# "%name = <result shape(s)> all-reduce(" or the async "all-reduce-start(" form (GPU/TPU)
_OP = re.compile(r"=\s*(?P<shape>.*?)\s+all-reduce(?:-start)?\(")
_ARRAY = re.compile(r"\b(?P<dtype>[a-z]+[0-9]*(?:e[0-9]m[0-9]fn)?)\[(?P<dims>[0-9,]*)\]")


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO result shape: ``f32[100,10]{1,0}`` or a tuple ``(f32[10], f32[])``."""
    total = 0
    for m in _ARRAY.finditer(shape):
        dtype = m.group("dtype")
        if dtype not in DTYPE_BYTES:
            raise ValueError(f"unknown HLO element type {dtype!r} in {shape!r}")
        dims = [int(d) for d in m.group("dims").split(",") if d]
        total += DTYPE_BYTES[dtype] * math.prod(dims)
    return total


def allreduce_operands(hlo_text: str) -> int:
    """Arrays all-reduced by one execution of the module: a tuple all-reduce counts each of its
    operands (XLA-CPU reduces them one after another, each at the collective's latency)."""
    return sum(len(_ARRAY.findall(m.group("shape"))) for m in _OP.finditer(hlo_text))


def allreduce_ops(hlo_text: str) -> list[int]:
    """Bytes of each all-reduce in the module (the combiner may have merged several into one)."""
    return [shape_bytes(m.group("shape")) for m in _OP.finditer(hlo_text)]


def allreduce_bytes(hlo_text: str) -> int:
    """Total bytes all-reduced by one execution of the compiled module (per device)."""
    return sum(allreduce_ops(hlo_text))


_ANY = re.compile(r"=\s*(?P<shape>.*?)\s+(?P<op>all-reduce|all-gather|reduce-scatter)(?:-start)?\(")


def collective_bytes(hlo_text: str) -> dict[str, int]:
    """Bytes of each kind of collective in the module, by its result shape (per device: an
    all-gather's result is the gathered tensor, a reduce-scatter's the local shard)."""
    out = {"all-reduce": 0, "all-gather": 0, "reduce-scatter": 0}
    for m in _ANY.finditer(hlo_text):
        out[m.group("op")] += shape_bytes(m.group("shape"))
    return out


def cost_flops(cost: Any) -> float | None:
    """``compiled.cost_analysis()`` is a dict on current JAX, a one-element list on older ones."""
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"])
