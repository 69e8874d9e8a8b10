"""Collectives: alpha-beta closed forms of the all-reduce by topology.

- ring: ``2(N-1)·alpha + 2(N-1)/N · bytes / bw`` (reduce-scatter + all-gather);
- hierarchical (GPU nodes): a ring inside each node over NVLink/NVSwitch, then a ring across the
  M nodes through the NICs (each GPU's shard over its own rail, so the node's whole NIC bandwidth
  carries the node's whole buffer); one node = exactly the ring;
- torus (TPU slices): per chip, not per core (the cores of a chip reduce on chip first); one
  bidirectional ring per torus dimension, all dimensions busy at once on their share of the buffer
  (so every ICI link of a chip carries traffic): ``sum_d 2(k_d - 1)·alpha + 2(1 - 1/C)·bytes /
  (2·D·link_bw)`` for a k_1 x ... x k_D slice of C chips and per-direction link bandwidth link_bw;
- multislice: the torus inside each slice, then a ring over the K slices through each chip's DCN
  share of its 1/C shard.
"""

from __future__ import annotations

import math

from scaling.errors import UsageError
from scaling.throughput import catalog
from scaling.throughput.compute import LINK_FRACTION


def ring_allreduce_bytes(nbytes: float, n: int) -> float:
    """Bytes each device sends in a ring all-reduce (reduce-scatter + all-gather): 2(N-1)/N x bytes."""
    return 2.0 * (n - 1) / n * nbytes if n > 1 else 0.0


def ring_allreduce_time(nbytes: float, n: int, alpha: float, bw: float) -> float:
    """2(N-1) latency hops + 2(N-1)/N x bytes / bandwidth."""
    if n <= 1:
        return 0.0
    return 2 * (n - 1) * alpha + ring_allreduce_bytes(nbytes, n) / bw


def tree_allreduce_time(nbytes: float, n: int, alpha: float, bw: float) -> float:
    """Pipelined (double binary) tree: 2 ceil(log2 N) latency hops, ~2 x bytes / bandwidth."""
    if n <= 1:
        return 0.0
    return 2 * math.ceil(math.log2(n)) * alpha + 2.0 * nbytes / bw


def hierarchical_allreduce_time(nbytes: float, n: int, per_node: int, intra: tuple[float, float],
                                inter: tuple[float, float]) -> float:
    """Reduce-scatter + all-gather inside each node (ring of g = min(N, per_node)), and a ring over
    the M = ceil(N/g) nodes through each node's NIC, which carries the node's whole buffer.
    With one node this is exactly the ring."""
    g = max(1, min(n, per_node))
    m = math.ceil(n / g)
    t = ring_allreduce_time(nbytes, g, *intra)
    if m > 1:
        t += ring_allreduce_time(nbytes, m, *inter)
    return t


def torus_shape(chips: int, dims: int) -> tuple[int, ...]:
    """The slice shape for ``chips`` chips on a ``dims``-D torus: prime factors, largest first, each
    onto the currently smallest dimension (256 on 2-D: 16 x 16; 4096 on 3-D: 16 x 16 x 16)."""
    if chips < 1 or dims < 1:
        raise ValueError(f"torus_shape({chips}, {dims})")
    factors, c, p = [], chips, 2
    while c > 1:
        while c % p == 0:
            factors.append(p)
            c //= p
        p += 1
    shape = [1] * dims
    for f in sorted(factors, reverse=True):
        shape[shape.index(min(shape))] *= f
    return tuple(sorted(shape, reverse=True))


def torus_allreduce_time(nbytes: float, shape: tuple[int, ...], alpha: float, link_bw: float) -> float:
    """One bidirectional ring per dimension, all D dimensions at once: sum_d 2(k_d-1) alpha +
    2(1 - 1/C) bytes / (2 D link_bw), C = prod(shape), D = dimensions longer than 1."""
    c = math.prod(shape)
    if c <= 1:
        return 0.0
    d = sum(1 for k in shape if k > 1)
    return sum(2 * (k - 1) * alpha for k in shape) + 2.0 * (1 - 1 / c) * nbytes / (2 * d * link_bw)


def allreduce_time(nbytes: float, n: int, hw: catalog.Hardware, algorithm: str = "auto", slices: int = 1) -> float:
    """The catalog's all-reduce time for N devices of ``hw`` (over ``slices`` ICI slices on TPUs)."""
    if n <= 1:
        return 0.0
    if algorithm not in ("auto", "ring", "tree", "hierarchical", "torus"):
        raise UsageError(f"unknown all-reduce algorithm {algorithm!r}; valid: auto, ring, tree, hierarchical, torus")
    if hw.ici_link_bw and algorithm in ("auto", "torus"):
        return tpu_allreduce_time(nbytes, n, hw, slices)
    if algorithm == "torus":
        raise UsageError(f"--algorithm torus: {hw.id} has no ICI torus; valid there: auto, ring, tree, hierarchical")
    if hw.ici_link_bw:  # ring or tree asked for on a TPU: one flat ring over single ICI links (the first release's view)
        link = (hw.intra_latency or 5e-6, hw.ici_link_bw * LINK_FRACTION["ici"].value)
        return (ring_allreduce_time if algorithm != "tree" else tree_allreduce_time)(nbytes, n, *link)
    fr = LINK_FRACTION["nvlink" if hw.intra_link == "nvlink" else "network"].value
    intra = (hw.intra_latency or 10e-6, (hw.intra_bw or hw.inter_bw or 10e9) * fr)
    inter = (hw.inter_latency or intra[0], (hw.inter_bw or hw.intra_bw or 10e9) * LINK_FRACTION["network"].value)
    per_node = hw.devices_per_node or n
    if algorithm == "ring":
        return ring_allreduce_time(nbytes, n, *(intra if n <= per_node else inter))
    if algorithm == "tree":
        return tree_allreduce_time(nbytes, n, *(intra if n <= per_node else inter))
    return hierarchical_allreduce_time(nbytes, n, per_node, intra, inter)


def tpu_allreduce_time(nbytes: float, n: int, hw: catalog.Hardware, slices: int = 1) -> float:
    """Cores of a chip reduce on chip (a 2-ring at memory bandwidth), then the torus of each slice's
    chips, then (K > 1) a ring over the K slices carrying each chip's 1/C shard over its DCN share."""
    per_chip = hw.devices_per_chip
    chips = max(1, n // per_chip)
    t = ring_allreduce_time(nbytes, min(n, per_chip), 0.0, hw.memory_bw or 1e12) if per_chip > 1 else 0.0
    c = max(1, chips // slices)
    alpha = hw.intra_latency or 5e-6
    t += torus_allreduce_time(nbytes, torus_shape(c, hw.torus_dims or 2), alpha, hw.ici_link_bw * LINK_FRACTION["ici"].value)
    if slices > 1:
        if not hw.dcn_bw:
            raise UsageError(f"--slices {slices}: {hw.id} has no data-center network figure in the catalog; valid: --slices 1")
        t += ring_allreduce_time(nbytes / c, slices, hw.inter_latency or 20e-6, hw.dcn_bw * LINK_FRACTION["network"].value)
    return t
