"""One device's training step on this host composed from its layers, priced by the measured layer table.

The table (``layer_rates``, written by ``podscale calibrate``) holds one device's forward + backward
of each kind of layer on a grid of shapes, and the optimizer update on a grid of sizes. A model's
step is then the sum over its op list (``roofline.LayerWork``) of each layer at its own shape:

- a matmul layer (dense, conv, attention) is a GEMM of M = samples x positions rows, K inputs and N
  outputs, recovered from the spec: K = forward FLOPs / (2 x outputs), N = parameters / K (outputs
  per position), positions = outputs / N (a layer without parameters, attention's score and value
  products, is taken as square: N = sqrt(outputs)). Its time is the table's seconds per FLOP at
  (M, sqrt(K N)), bilinear in log-log over the grid and extrapolated from the nearest two points
  above it (below it: the smallest shape's time, a fixed cost), times the layer's FLOPs (a first
  layer, without an input gradient, does 2/3 of the work of the table's layer).
  Convolutions read the conv table, attention's products (and a run's recorded batched matmuls)
  the batched-matmul one, the rest the dense one: attention's score and value products are one
  small product per sample and head (64 x 32 x 64 in gpt-tiny), and priced as one GEMM of all their
  rows they came out at a third of their time in eager torch here;
- a layer whose epilogue does more than add a bias (an activation) adds one elementwise layer on its
  outputs; a GELU and attention's score epilogue (scale, causal mask, softmax) read curves of their
  own instead, by the outputs they compute (a GELU after a dense layer over positions cost 10-17x a
  ReLU's in XLA here, 1.6x in eager torch; the score epilogue 13x a ReLU in eager torch);
- a norm reads its own curve (batch or layer norm); activations, adds, pools and embeddings the
  elementwise curve, by the elements they write;
- the optimizer update by the model's parameter count (log-log between the measured sizes), and
  by its tensors where the spec knows them (torch steps its CPU optimizers tensor by tensor).

N devices at once: each piece takes its one-device time times the GEMM slowdown at N, but never
less than N devices moving its bytes at once take (the calibration's memory probe at N). XLA-CPU's
memory-bound work slows far more with N than its GEMMs: an Adam update of 1M parameters here 3.3x
at N = 2, 38x at N = 16, where a 256 GEMM slows 1.95x and ~12x; a slowdown from GEMMs alone priced
the mlp of width 1024 at N = 16 at half its step.

The reference model's share (its own layers and update, which its measured overhead already holds)
is what ``_predict_host`` subtracts, so nothing is counted twice.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

from scaling.throughput.calibration import loglog
from scaling.throughput.roofline import LayerWork

#: the table's own curve of a memory-bound kind (norms, and a run's recorded GELU op); others: eltwise
CURVE_OF_KIND = {"bn": "batchnorm", "batchnorm": "batchnorm", "layernorm": "layernorm", "gelu": "gelu"}
#: the table a matmul kind reads (a table without it: the dense one)
TABLE_OF_MATMUL = {"conv": "conv", "attention": "bmm", "bmm": "bmm"}


def _grid_time(points: Sequence[Sequence[float]], m: float, s: float) -> float:
    """Seconds per FLOP at (rows m, size s) from (M, K, N, seconds) points on a grid of M x S."""
    per: dict[float, list[tuple[float, float]]] = {}
    for mm, k, n, t in points:
        per.setdefault(float(mm), []).append((math.sqrt(k * n), t / (6.0 * mm * k * n)))
    rows = sorted(per)
    at_m = [loglog([p[0] for p in per[r]], [p[1] for p in per[r]], s) for r in rows]
    return loglog(rows, at_m, m)


def _gemm_shape(w: LayerWork, batch: float) -> tuple[float, float]:
    """(M rows, sqrt(K N)) of a matmul layer's GEMM at ``batch`` samples."""
    if w.gemm is not None:
        return batch * w.gemm[0], w.gemm[1]
    outs = max(w.out_elems, 1.0)
    k = max(w.fwd_flops / (2.0 * outs), 1.0)
    n = w.params / k if w.params >= k else math.sqrt(outs)
    n = max(min(n, outs), 1.0)
    positions = max(outs / n, 1.0)
    return batch * positions, math.sqrt(k * n)


def layer_seconds(w: LayerWork, batch: float, table: dict[str, Any]) -> float:
    """One layer's forward + backward at ``batch`` samples on one device alone."""
    if w.matmul:
        m, s = _gemm_shape(w, batch)
        points = table.get(TABLE_OF_MATMUL.get(w.kind, "dense")) or table["dense"]
        # below the grid's smallest shape a layer costs what that shape costs (dispatch and the
        # backward's fixed work): extrapolating seconds per FLOP down from the nearest two points
        # gave the reference's 16 -> 1 layer at 1 sample more time than its 16 -> 16 one, and a
        # 64 -> 10 layer at 32 samples half the smallest measured layer's time
        mc, sc = max(m, min(p[0] for p in points)), max(s, min(math.sqrt(p[1] * p[2]) for p in points))
        t = (w.fwd_flops + w.bwd_flops) * batch * (mc / m) * (sc / s) ** 2 * _grid_time(points, mc, sc)
        if w.activation and table.get(w.activation):  # a GELU, a softmax: its own curve, by the outputs it computes
            t += _curve(table[w.activation], batch * w.activation_elems)
        elif w.elementwise > w.out_elems:  # an epilogue beyond the bias (the table's layer has one): activation, softmax
            t += _curve(table["eltwise"], batch * w.out_elems)
        return t
    curve = table.get(CURVE_OF_KIND.get(w.kind, "eltwise")) or table["eltwise"]
    return _curve(curve, batch * max(w.out_elems, 1.0))


def _curve(points: Sequence[Sequence[float]], x: float) -> float:
    """Seconds at size x; below the smallest size measured, that size's seconds (a fixed cost)."""
    xs = [p[0] for p in points]
    return loglog(xs, [p[1] for p in points], max(x, min(xs)))


def update_seconds(params: float, table: dict[str, Any], optimizer: str | None, tensors: int = 0) -> float:
    """The optimizer's update of ``params`` parameters in ``tensors`` tensors (0: unknown, as many as
    the curve was measured with); None (an optimizer without a curve): 0. Each tensor beyond the
    curve's own count adds what the table's two splits of the same parameters differ by per tensor."""
    if optimizer is None:
        return 0.0
    name = optimizer if table.get(optimizer) else "adam"
    pts = table.get(name) or []
    if not pts:
        return 0.0
    t = _curve(pts, max(params, 1.0))
    split = table.get(f"{name}_tensors") or []
    if tensors and len(split) >= 2:
        (c0, t0), (c1, t1) = split[0], split[-1]
        t += max(0.0, (t1 - t0) / (c1 - c0)) * max(0, tensors - c0)
    return t


#: bytes a float32 update moves per parameter: SGD reads p and g and writes p; Adam reads and writes
#: m and v too
UPDATE_BYTES = {"sgd": 12.0, "adam": 28.0}


def layer_bytes(w: LayerWork, batch: float) -> float:
    """Bytes one device's forward + backward of a layer moves at ``batch`` samples, float32: its
    activations by the roofline's traffic rule, and a matmul's weights read twice and their gradient
    written (a recorded call knows K x N, not which tensor was a parameter)."""
    weights = float(w.params) or (w.gemm[1] ** 2 if w.gemm else 0.0)
    return 4.0 * (batch * (w.fwd_elems + w.bwd_elems) + (3.0 * weights if w.matmul else 0.0))


def contended_seconds(works: Sequence[LayerWork], batch: float, table: dict[str, Any], optimizer: str | None,
                      slowdown: float, memory_floor: Callable[[float], float], params: float | None = None,
                      tensors: int = 0) -> float:
    """``step_seconds`` on each of N devices at once: every layer and the update slowed by the GEMM
    contention, or as long as N devices moving its bytes take (``memory_floor``), whichever is more."""
    params = sum(w.params for w in works) if params is None else params
    total = sum(max(layer_seconds(w, batch, table) * slowdown, memory_floor(layer_bytes(w, batch))) for w in works)
    upd = update_seconds(params, table, optimizer, tensors)
    if upd:
        total += max(upd * slowdown, memory_floor(UPDATE_BYTES.get(optimizer or "", UPDATE_BYTES["adam"]) * params))
    return total


def step_seconds(works: Sequence[LayerWork], batch: float, table: dict[str, Any], optimizer: str | None,
                 params: float | None = None, tensors: int = 0) -> float:
    """Forward + backward of every layer, and the optimizer update of ``params`` parameters (default:
    the layers' own; a recorded step's layers do not know which tensors were parameters), of one
    device alone."""
    params = sum(w.params for w in works) if params is None else params
    return sum(layer_seconds(w, batch, table) for w in works) + update_seconds(params, table, optimizer, tensors)


def recorded_works(layers: Sequence[dict[str, Any]], batch: float, backward_gemm_flops: float) -> tuple[LayerWork, ...]:
    """A run's recorded forward ops (``train_torch.OpRecorder``: kind, GEMM m/k/n, FLOPs, output
    elements and how many calls had them, at ``batch`` samples) as per-sample layers. Each matmul's
    backward is two GEMMs of its size, except the input layer's, which computes no input gradient:
    the first matmul recorded takes what the recorded backward FLOPs leave for it (one to two
    GEMMs' worth), so a first layer is not priced at the work it never did."""
    b = max(float(batch), 1.0)
    mats = [(i, float(x["fwd_flops"]) * int(x.get("count", 1))) for i, x in enumerate(layers) if x.get("fwd_flops")]
    bwd = {i: 2.0 * f for i, f in mats}
    if mats:
        i0, f0 = mats[0]
        rest = sum(bwd.values()) - bwd[i0]
        bwd[i0] = min(2.0 * f0, max(f0, float(backward_gemm_flops) - rest))
    out: list[LayerWork] = []
    for i, x in enumerate(layers):
        count = int(x.get("count", 1))
        elems = float(x.get("elems", 0)) / b
        if x.get("fwd_flops"):
            fwd = float(x["fwd_flops"]) / b
            kind = x["kind"] if x["kind"] in TABLE_OF_MATMUL else "dense"
            gemm = (float(x["m"]) / b, math.sqrt(float(x["k"]) * float(x["n"])))
            ins = float(x["m"]) * float(x["k"]) / b
            w = LayerWork(f"rec{i}", kind, fwd, bwd[i] / count / b, ins + elems, 2 * (ins + elems), 0, 1, 2, elems, 0.0, gemm)
        else:
            w = LayerWork(f"rec{i}", x["kind"], 0.0, 0.0, 2 * elems, 3 * elems, 0, 1, 1, elems)
        out.extend([w] * count)
    return tuple(out)


def has_table(table: Any) -> bool:
    return bool(table) and all(table.get(k) for k in ("dense", "eltwise"))
