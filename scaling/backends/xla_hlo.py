"""Read what XLA actually compiled: all-reduce and all-gather bytes and matmul FLOPs of an optimized HLO module.

Under torch_xla SPMD the gradient all-reduce does not exist in the traced graph: the partitioner
inserts it while compiling. The only public window on the compiled module is the text dump that
``XLA_FLAGS=--xla_dump_to=DIR`` writes (``*after_optimizations.txt``). XLA's own cost analysis
(``HloCostAnalysis``) is reachable from Python only through private bindings (``torch_xla._XLAC``,
jaxlib's ``_xla``) that change between releases, so FLOPs here are counted from that same text:
2 x output elements x contracted size for every ``dot`` and ``convolution`` (the ops model FLOPs
count, DESIGN.md). Elementwise work is left out on purpose, as in the spec's count.

Pure text parsing, no framework import: the tests and the jax backends can use it too.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

#: bytes per element of the HLO primitive types a data-parallel step can move
DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "s32": 4, "u32": 4, "s64": 8, "u64": 8,
    "f16": 2, "bf16": 2, "f32": 4, "f64": 8, "c64": 8, "c128": 16,
}
_ARRAY = re.compile(r"\b(" + "|".join(DTYPE_BYTES) + r")\[([0-9,]*)\]")
# "%name = SHAPE opcode(operands), attrs"; SHAPE may be a tuple "(f32[2]{0}, f32[])"
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([a-z][\w\-]*)\((.*)$")


@dataclass(frozen=True)
class StepCost:
    """One compiled step, per device: what it all-reduces and the matmul FLOPs it runs."""

    all_reduce_bytes: list[int]
    """Bytes of each all-reduce (``all-reduce`` or async ``all-reduce-start``) in the module."""
    dot_flops: int
    """2 x MACs of every dot and convolution, on one device's shard."""
    module: str
    """The dump file the numbers came from."""
    all_gather_bytes: tuple[int, ...] = ()
    """Bytes each ``all-gather`` (or ``all-gather-start``) delivers. A data-parallel step gathers
    nothing (its parameters are replicated): a gather is the partitioner moving the batch onto every
    device for an op it cannot split, which then runs replicated (``scaling.partitionable_norms``)."""

    @property
    def comm_bytes(self) -> int:
        return sum(self.all_reduce_bytes)


def _shape_dims(shape: str) -> list[tuple[str, tuple[int, ...]]]:
    return [(m.group(1), tuple(int(d) for d in m.group(2).split(",") if d)) for m in _ARRAY.finditer(shape)]


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape string; a tuple shape counts every element array."""
    return sum(DTYPE_BYTES[t] * math.prod(dims) for t, dims in _shape_dims(shape))


def _operands(rest: str) -> list[str]:
    depth, cur, out = 0, "", []
    for ch in rest:
        if ch == "(":
            depth += 1
        elif ch == ")":
            if depth == 0:
                out.append(cur)
                break
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return [o.strip().split()[-1].lstrip("%") for o in out if o.strip()]


def _attr(rest: str, name: str) -> str | None:
    m = re.search(name + r"=\{?([^},\s]*(?:,[0-9]+)*)\}?", rest)
    return m.group(1) if m else None


def analyse(text: str, module: str = "") -> StepCost:
    """All-reduce bytes and dot/convolution FLOPs of one HLO module's text."""
    shapes: dict[str, tuple[int, ...]] = {}
    reduces: list[int] = []
    gathers: list[int] = []
    flops = 0
    for line in text.splitlines():
        m = _INSTR.match(line)
        if not m:
            continue
        name, shape, op, rest = m.groups()
        dims = _shape_dims(shape)
        if len(dims) == 1:
            shapes[name] = dims[0][1]
        if op in ("all-reduce", "all-reduce-start"):
            reduces.append(shape_bytes(shape))
        elif op == "all-gather":
            gathers.append(shape_bytes(shape))
        elif op == "all-gather-start" and dims:  # (operand, result): what it delivers is the last array
            gathers.append(DTYPE_BYTES[dims[-1][0]] * math.prod(dims[-1][1]))
        elif op == "dot" and dims:
            ops = _operands(rest)
            contract = _attr(rest, "lhs_contracting_dims")
            lhs = shapes.get(ops[0]) if ops else None
            if lhs is not None and contract is not None:
                k = math.prod(lhs[int(i)] for i in contract.split(",") if i)
                flops += 2 * math.prod(dims[0][1]) * k
        elif op == "convolution" and dims:
            ops = _operands(rest)
            labels = re.search(r"dim_labels=\w+_(\w+)->\w+", rest)
            kernel = shapes.get(ops[1]) if len(ops) > 1 else None
            if kernel is not None and labels:
                # every output element takes (kernel spatial x input features per group) MACs
                per_out = math.prod(n for n, c in zip(kernel, labels.group(1)) if c != "o")
                flops += 2 * math.prod(dims[0][1]) * per_out
    return StepCost(reduces, flops, module, tuple(gathers))


def dump_modules(directory: str | Path) -> list[Path]:
    """The optimized modules XLA dumped, oldest first (buffer/memory reports left out)."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = [p for p in d.glob("*after_optimizations.txt") if "-" not in p.name.rsplit("after_optimizations", 1)[1]]
    return sorted(found)


def train_step_cost(directory: str | Path) -> StepCost | None:
    """The compiled training step among the dumped modules: the one with the most matmul FLOPs
    (other modules are data transfers and small glue graphs); the newest of equals wins."""
    best: StepCost | None = None
    for p in dump_modules(directory):
        c = analyse(p.read_text(errors="replace"), p.name)
        if best is None or c.dot_flops >= best.dot_flops:
            best = c
    return best if best is not None and best.dot_flops > 0 else None


def dump_dir(xla_flags: str) -> Path | None:
    """Where XLA_FLAGS send the compiled-module dump, if anywhere."""
    m = re.search(r"--xla_dump_to=(\S+)", xla_flags)
    return Path(m.group(1)) if m else None


def flags_with_dump(xla_flags: str, default_dir: str | Path) -> tuple[str, Path]:
    """XLA_FLAGS with a text dump of the compiled modules; a user's own ``--xla_dump_to`` wins."""
    mine = dump_dir(xla_flags)
    if mine is not None:
        return xla_flags, mine
    extra = f"--xla_dump_to={default_dir} --xla_dump_hlo_as_text --xla_dump_hlo_module_re=SyncTensorsGraph"
    return (xla_flags + " " + extra).strip(), Path(default_dir)
