"""The per-layer roofline of one device's training step, and the bucketed all-reduce behind it.

Each layer of a spec's op list (``layer_costs()``) becomes a forward and a backward piece; each
piece takes ``max(FLOPs / attainable compute, bytes / attainable memory bandwidth) + kernels x
launch cost``. Convolutions and matmuls are usually compute-bound; batch/layer norm, activations,
residual adds, pools and embeddings have no model FLOPs and are pure memory traffic.

Bytes moved, per sample (elements x bytes per activation element: 4 for float32/tf32, 2 for
float16/bfloat16), a stated rule rather than a measurement:

- conv / dense / attention matmul: forward reads its input and writes its output; backward reads
  the output gradient twice (data and weight gradients), reads the input and writes the input
  gradient: fwd ``n_in + n_out``, bwd ``2 (n_in + n_out)``; an unfused epilogue (bias, GELU,
  softmax: the spec's ``elementwise`` > 0) adds one pass over the output, fwd 2, bwd 3 x n_out.
  Weights: read forward and backward, gradient written: 3 x params x 4 bytes per step.
- batch / layer norm: fwd 3n (statistics pass, normalise pass), bwd 5n;
- relu / add / other elementwise: fwd 2n, bwd 3n; pools: fwd and bwd ``n_in + n_out`` each;
- embedding lookup: fwd 2n, bwd 2n (scatter-add).
- the optimizer update: 20 bytes per parameter (read param, grad, momentum; write param, momentum).

Overlap rule (one, for every framework): gradients of a layer are ready when its backward piece
ends (backward runs last layer first); they are packed into buckets of ``BUCKET_BYTES`` (PyTorch
DDP's default ``bucket_cap_mb=25``); each full bucket is all-reduced as soon as it is full and the
network is free, one bucket at a time; the remainder goes at the end of backward. The exposed
communication is the larger of what finishes after the last backward piece (the bucketed tail) and
``(1 - hidden) x`` the whole all-reduce: an all-reduce running beside backward is not free (it takes
SMs, memory bandwidth and PCIe/host copies from the same device), so at most ``hidden`` of it is
hidden (``compute.OVERLAP_HIDDEN``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from scaling.errors import UsageError

MATMUL_KINDS = ("conv", "dense", "attention", "bmm", "matmul")
BUCKET_BYTES = 25 * 2**20
"""PyTorch DDP's default bucket (bucket_cap_mb=25, torch.nn.parallel.DistributedDataParallel docs)."""
OPTIMIZER_BYTES_PER_PARAM = 20


@dataclass(frozen=True)
class LayerWork:
    """One layer's training work per sample (FLOPs and activation elements moved), split fwd/bwd."""

    name: str
    kind: str
    fwd_flops: float
    bwd_flops: float
    fwd_elems: float
    bwd_elems: float
    params: int
    fwd_kernels: int
    bwd_kernels: int
    out_elems: float = 0.0
    """Output elements per sample (the host step's layer table is keyed by them)."""
    elementwise: float = 0.0
    """The spec's elementwise FLOPs per sample (a bias alone is one per output)."""
    gemm: tuple[float, float] | None = None
    """(GEMM rows per sample, sqrt(K x N)) where a run recorded the call's shapes; None: recovered
    from the spec's FLOPs and parameters (``host_step``)."""
    activation: str = ""
    """The spec's costly nonlinearity (``gelu``) on ``activation_elems`` outputs per sample: the
    host's table has a curve for it; the roofline counts it in ``elementwise`` as any epilogue."""
    activation_elems: float = 0.0

    @property
    def matmul(self) -> bool:
        return self.kind in MATMUL_KINDS


def _stated_gemm(c: Any) -> tuple[float, float] | None:
    """(rows per sample, sqrt(K x N)) of a matmul whose spec states its shape; None: recovered later."""
    g = c.gemm
    return (float(g[0]), math.sqrt(float(g[1]) * float(g[2]))) if g else None


def layer_works(costs: Sequence[Any], input_elems: int) -> tuple[LayerWork, ...]:
    """LayerWork from a spec's ``layer_costs()`` by the traffic rule of this module."""
    out: list[LayerWork] = []
    n_in = float(input_elems)
    for c in costs:
        n_out = float(c.activations)
        if c.kind in MATMUL_KINDS or c.forward_flops:
            epi = n_out if c.elementwise else 0.0
            first = c.backward_flops < 2 * c.forward_flops  # the first layer: no input gradient
            out.append(LayerWork(c.name, c.kind if c.kind in MATMUL_KINDS else "matmul", float(c.forward_flops),
                                 float(c.backward_flops), n_in + n_out + 2 * epi,
                                 (n_in + 2 * n_out if first else 2 * (n_in + n_out)) + 3 * epi, int(c.params),
                                 1 + (1 if epi else 0), (1 if first else 2) + (1 if epi else 0), n_out,
                                 float(c.elementwise), _stated_gemm(c), c.activation, float(c.activation_elems)))
        elif c.kind in ("bn", "layernorm", "batchnorm"):
            out.append(LayerWork(c.name, c.kind, 0.0, 0.0, 3 * n_out, 5 * n_out, int(c.params), 1, 1, n_out))
        elif c.kind in ("maxpool", "avgpool", "gap"):
            out.append(LayerWork(c.name, c.kind, 0.0, 0.0, n_in + n_out, n_in + n_out, int(c.params), 1, 1, n_out))
        elif c.kind == "embedding":
            out.append(LayerWork(c.name, c.kind, 0.0, 0.0, 2 * n_out, 2 * n_out, int(c.params), 1, 1, n_out))
        else:  # relu, add, gelu, dropout, ...
            out.append(LayerWork(c.name, c.kind, 0.0, 0.0, 2 * n_out, 3 * n_out, int(c.params), 1, 1, n_out))
        n_in = n_out
    return tuple(out)


def flops_only_works(train_flops: float, params: int, pieces: int = 12) -> tuple[LayerWork, ...]:
    """A model known only by its FLOPs and parameters (a paper's figures): equal matmul pieces,
    no memory-bound layers (so compute is a lower bound), gradients spread evenly for bucketing."""
    f = train_flops / pieces / 3.0
    return tuple(LayerWork(f"part{i}", "matmul", f, 2 * f, 0.0, 0.0, params // pieces, 1, 2) for i in range(pieces))


@dataclass(frozen=True)
class Rates:
    """What one device attains: FLOP/s of the matmul unit, bytes/s of memory, s per kernel launch."""

    flops: float
    mem_bw: float
    launch_s: float
    act_bytes: int
    weight_bytes: int = 4


@dataclass(frozen=True)
class StepParts:
    forward_s: float
    backward_s: float
    optimizer_s: float
    memory_bound_s: float
    """Time of the pieces limited by memory bandwidth, forward + backward (part of the two above)."""
    launch_s: float
    allreduce_s: float
    exposed_comm_s: float

    @property
    def compute_s(self) -> float:
        return self.forward_s + self.backward_s + self.optimizer_s

    @property
    def step_s(self) -> float:
        return self.compute_s + self.exposed_comm_s


def _piece(flops: float, elems: float, weight_bytes: float, kernels: int, r: Rates) -> tuple[float, bool]:
    tc = flops / r.flops
    tm = (elems * r.act_bytes + weight_bytes) / r.mem_bw
    return max(tc, tm) + kernels * r.launch_s, tm > tc


def _layer_times(works: Sequence[LayerWork], batch: float, r: Rates) -> tuple[list[float], list[float], float, float]:
    """Each layer's forward and backward piece, the memory-bound time among them, and the launches."""
    fwd: list[float] = []
    bwd: list[float] = []
    mem = launches = 0.0
    for w in works:
        t, mb = _piece(batch * w.fwd_flops, batch * w.fwd_elems, w.params * r.weight_bytes if w.matmul else 0.0,
                       w.fwd_kernels, r)
        fwd.append(t)
        mem += t if mb else 0.0
        t, mb = _piece(batch * w.bwd_flops, batch * w.bwd_elems, 2 * w.params * r.weight_bytes if w.matmul else 0.0,
                       w.bwd_kernels, r)
        bwd.append(t)
        mem += t if mb else 0.0
        launches += (w.fwd_kernels + w.bwd_kernels) * r.launch_s
    return fwd, bwd, mem, launches


def _optimizer_s(works: Sequence[LayerWork], grad_bytes: float, r: Rates) -> float:
    params = sum(w.params for w in works) or grad_bytes / r.weight_bytes  # a measured workload may know only its gradient bytes
    return OPTIMIZER_BYTES_PER_PARAM * params / r.mem_bw + r.launch_s


def step_parts(works: Sequence[LayerWork], batch: float, r: Rates, grad_bytes: float,
               allreduce: Callable[[float], float], hidden: float, bucket_bytes: float = BUCKET_BYTES) -> StepParts:
    """One device's step for ``batch`` samples, with the all-reduce bucketed behind backward."""
    fwd_t, bwd_times, mem, launches = _layer_times(works, batch, r)
    fwd, bwd = sum(fwd_t), sum(bwd_times)
    layer_params = sum(w.params for w in works)
    opt = _optimizer_s(works, grad_bytes, r)
    # bucketed all-reduce behind backward (last layer first); no per-layer parameters: one bucket at the end
    per_param = grad_bytes / layer_params if layer_params else 0.0
    clock = link_free = bucket = 0.0
    total_ar = 0.0
    for w, t in zip(reversed(works), reversed(bwd_times)):
        clock += t
        bucket += w.params * per_param
        if bucket >= bucket_bytes:
            dt = allreduce(bucket)
            link_free = max(clock, link_free) + dt
            total_ar += dt
            bucket = 0.0
    if not layer_params:
        bucket = grad_bytes
    if bucket > 0:
        dt = allreduce(bucket)
        link_free = max(clock, link_free) + dt
        total_ar += dt
    exposed = max(link_free - clock, (1.0 - hidden) * total_ar, 0.0)
    return StepParts(fwd, bwd, opt, mem, launches + r.launch_s, total_ar, exposed)


@dataclass(frozen=True)
class Unit:
    """Consecutive layers sharded together (``models.spec.sharding_unit``): one all-gather of their
    parameters, one reduce-scatter of their gradients."""

    name: str
    forward_s: float
    backward_s: float
    grad_bytes: float


def units(works: Sequence[LayerWork], fwd: Sequence[float], bwd: Sequence[float], grad_bytes: float) -> list[Unit]:
    """Layers grouped into sharding units, in forward order; a layer without parameters joins the
    unit it runs in (by name), or the one before it."""
    from models.spec import sharding_unit

    layer_params = sum(w.params for w in works)
    per_param = grad_bytes / layer_params if layer_params else 0.0
    out: list[list[Any]] = []
    for w, f, b in zip(works, fwd, bwd):
        key = sharding_unit(w.name)
        if out and (out[-1][0] == key or not w.params):
            out[-1][1] += f
            out[-1][2] += b
            out[-1][3] += w.params * per_param
        else:
            out.append([key, f, b, w.params * per_param])
    if not layer_params and out:  # no per-layer parameters: the state spread evenly
        for u in out:
            u[3] = grad_bytes / len(out)
    return [Unit(*u) for u in out]


def sharded_parts(works: Sequence[LayerWork], batch: float, r: Rates, grad_bytes: float,
                  allreduce: Callable[[float], float], hidden: float, mode: str, n: int) -> StepParts:
    """One device's step with the state sharded N ways (``--sharding``), unit by unit, by one stated rule:

    - an all-gather or a reduce-scatter of B bytes costs half a ring all-reduce of B on the same
      topology (a ring all-reduce is exactly one reduce-scatter then one all-gather: (N-1) latency
      hops and (N-1)/N x B over the link);
    - ``full`` all-gathers each unit's parameters before its forward and again before its backward,
      and reduce-scatters its gradients after its backward; ``optimizer`` gathers once (kept through
      backward) and reduce-scatters;
    - prefetch, one unit ahead (FSDP2's default): a unit's gather is issued when the unit before it
      starts computing (the first unit's at the step's start, so nothing hides it); the link runs
      one collective at a time in the order they are issued (in backward: the next unit's gather,
      then this unit's reduce-scatter once its backward ends); a unit computes once its gather is done;
    - the same contention cap as the replicated step: at most ``hidden`` of the collectives' time
      hides behind compute;
    - the optimizer updates 1/N of the state on each device."""
    if mode not in ("optimizer", "full"):
        raise UsageError(f"invalid sharding mode {mode!r} for a sharded step; valid: optimizer, full "
                         "(--sharding none is the replicated step: step_parts)")
    fwd_t, bwd_t, mem, launches = _layer_times(works, batch, r)
    us = units(works, fwd_t, bwd_t, grad_bytes)
    half = [allreduce(u.grad_bytes) / 2.0 for u in us]
    link = clock = 0.0
    total = 0.0

    def collective(ready: float, k: int) -> float:
        nonlocal link, total
        link = max(link, ready) + half[k]
        total += half[k]
        return link

    # forward, first unit first: gather k is issued when unit k-1 starts
    gathered = collective(0.0, 0)
    for k, u in enumerate(us):
        start = max(clock, gathered)
        if k + 1 < len(us):
            gathered = collective(start, k + 1)
        clock = start + u.forward_s
    forward_end = clock
    # backward, last unit first
    order = list(reversed(range(len(us))))
    gathered = collective(forward_end, order[0]) if mode == "full" else forward_end
    scattered = forward_end
    for i, k in enumerate(order):
        start = max(clock, gathered)
        if mode == "full" and i + 1 < len(order):
            gathered = collective(start, order[i + 1])
        clock = start + us[k].backward_s
        scattered = collective(clock, k)
    end = max(clock, scattered)
    compute_fwd, compute_bwd = sum(fwd_t), sum(bwd_t)
    exposed = max(end - compute_fwd - compute_bwd, (1.0 - hidden) * total, 0.0)
    return StepParts(compute_fwd, compute_bwd, _optimizer_s(works, grad_bytes, r) / n, mem, launches + r.launch_s,
                     total, exposed)
