"""Measuring one device's training cost of layers by kind and shape: the primitives a host step is composed of.

A square-GEMM table prices a model's matmuls far too low on this kind of host: a dense layer's
forward + backward in eager torch at 16 samples runs at ~20-25 GFLOP/s where its forward GEMM alone
runs at ~90 (the weight gradient is written and accumulated, three kernels are dispatched, the
weights do not stay in cache), a 3x3 convolution's at ~25, and the optimizer update (torch Adam:
~3-7 ns per parameter past the caches) and the memory-bound layers (norms, activations) are not
GEMMs at all. So ``podscale calibrate`` times each kind of layer's forward + backward on one device
alone, on a small grid of shapes, and the optimizer update on a few sizes; ``host_step`` composes
any model's step from these by its op list. Each entry is (shape..., seconds).

Torch is timed eagerly on one thread (as a torch-ddp rank runs). JAX is timed as the marginal cost
of one more copy of the layer inside one compiled program: a jax step is one XLA program, so a layer
in it pays no dispatch of its own.

``METHOD`` names how the tables are measured: a calibration holding tables of another method has
them measured again (``calibration.load`` drops them), so a changed measurement reaches every host.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

#: per table: jax 2 = its optimizer update as one update's own program less an empty one (1: the
#: marginal cost of a chain of updates, which XLA fuses into one pass); 3 and torch 2: a GELU curve;
#: 4 and torch 3: batched matmuls (``bmm``) and attention's score epilogue (``softmax``) as curves of
#: their own, and torch's GELU in the tanh form the zoo's transformers (and GPT-2) run; torch_xla 1:
#: its own table (``layer_rates_xla``), where it had read jax's
METHOD = {"torch": 3, "jax": 4, "torch_xla": 1}
#: (rows M = samples x positions, S = sqrt(K x N)) of the dense grid: square K = N = S
DENSE_M = (16, 128, 1024)
DENSE_S = (64, 256, 1024)
#: channels C (3x3, C -> C, padding 1) and square spatial sides of the conv grid, at CONV_BATCH samples
CONV_C = (8, 32, 128)
CONV_HW = (2, 8, 16)
CONV_BATCH = 16
#: (rows M = matrices x S, S) of the batched-matmul grid: M/S products of S x S by S x S, as
#: attention's score and value products are (one per sample and head, each a few dozen wide)
BMM_M = (1024, 8192)
BMM_S = (16, 64, 256)
#: the width of attention's rows on the softmax grid (a sequence length)
SOFTMAX_T = 64
#: elements of the memory-bound layers' grid, and parameter counts of the optimizer grid
ELEMS = (1 << 10, 1 << 14, 1 << 18, 1 << 21)
PARAMS = (300, 1 << 14, 1 << 17, 1 << 20, 1 << 22)
#: tensors the same TENSORS_PARAMS parameters are split into, to measure what each tensor adds to
#: an optimizer update; the first count is the one the update curve was measured with
TENSORS = {"torch": (4, 32), "jax": (1, 32), "torch_xla": (4, 32)}
TENSORS_PARAMS = 1 << 16
#: the tests' grids: seconds, not minutes
TINY = {"dense_m": (16, 128), "dense_s": (64, 256), "conv_c": (8, 32), "conv_hw": (2, 8),
        "elems": (1 << 10, 1 << 16), "params": (300, 1 << 16), "bmm_m": (256,), "bmm_s": (16, 128)}


def grids(tiny: bool) -> dict[str, tuple[int, ...]]:
    if tiny:
        return dict(TINY)
    return {"dense_m": DENSE_M, "dense_s": DENSE_S, "conv_c": CONV_C, "conv_hw": CONV_HW, "elems": ELEMS, "params": PARAMS,
            "bmm_m": BMM_M, "bmm_s": BMM_S}


def softmax_shape(n: int) -> tuple[int, int, int]:
    """(matrices, rows, row width) of ``n`` attention scores: rows of SOFTMAX_T (fewer below it)."""
    t = SOFTMAX_T if n >= SOFTMAX_T * SOFTMAX_T else max(1, int(n**0.5))
    return max(1, n // (t * t)), t, t


def time_calls(fn: Callable[[], Any], reps: int, inner: int, drain: Callable[[], Any] = lambda: None) -> float:
    """Median over ``reps`` of the mean time of ``inner`` back-to-back calls, ``drain`` (waiting
    for an asynchronous device) once after each repeat's calls."""
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(inner):
            fn()
        drain()
        out.append((time.perf_counter() - t) / inner)
    return statistics.median(out)


def timed(fn: Callable[[], Any], budget_s: float = 0.08, reps: int = 5, drain: Callable[[], Any] = lambda: None) -> float:
    """Median seconds of one call, each repeat long enough (~budget_s) that a VM's jitter averages out."""
    for _ in range(2):
        fn()
    drain()
    t = time.perf_counter()
    fn()
    drain()
    one = max(time.perf_counter() - t, 1e-7)
    return time_calls(fn, reps, max(1, min(200, int(budget_s / one))), drain)


def optimizer_curves(out: dict[str, Any], updates: Callable[[list[int]], dict[str, float]], params: tuple[int, ...],
                     tensors: tuple[int, ...], arrays: int) -> None:
    """Fill ``out``'s optimizer curves from ``updates(sizes) -> {optimizer: seconds}``: each of
    ``params`` parameters split into ``arrays`` equal arrays, then TENSORS_PARAMS parameters split
    into each of ``tensors`` counts of arrays (what one more array adds to an update)."""
    for p in params:
        each = max(1, p // arrays)
        for name, t in updates([each] * arrays).items():
            out[name].append((arrays * each, t))
    for c in tensors:
        for name, t in updates([TENSORS_PARAMS // c] * c).items():
            out[f"{name}_tensors"].append((c, t))


# ---- torch (eager, one thread) --------------------------------------------------------------------


def torch_table(tiny: bool = False) -> dict[str, Any]:
    import torch

    g = grids(tiny)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out: dict[str, Any] = {"dense": [], "conv": [], "bmm": [], "eltwise": [], "gelu": [], "softmax": [],
                               "layernorm": [], "batchnorm": [], "adam": [], "sgd": [], "adam_tensors": [], "sgd_tensors": []}
        for m in g["dense_m"]:
            for s in g["dense_s"]:
                lin = torch.nn.Linear(s, s)
                x = torch.randn(m, s, requires_grad=True)

                def dense() -> None:
                    lin(x).sum().backward()

                out["dense"].append((m, s, s, timed(dense)))
        for c in g["conv_c"]:
            for hw in g["conv_hw"]:
                conv = torch.nn.Conv2d(c, c, 3, padding=1, bias=False)
                x = torch.randn(CONV_BATCH, c, hw, hw, requires_grad=True)

                def cv() -> None:
                    conv(x).sum().backward()

                out["conv"].append((CONV_BATCH * hw * hw, 9 * c, c, timed(cv)))
        # attention's products: many small matrices, both operands activations (two input gradients,
        # no weight gradient). Priced as one GEMM of all their rows they came out 2.5x too cheap here
        for m in g["bmm_m"]:
            for s in g["bmm_s"]:
                q, k = (torch.randn(max(1, m // s), s, s, requires_grad=True) for _ in range(2))

                def bmm() -> None:
                    (q @ k.transpose(-2, -1)).sum().backward()

                out["bmm"].append((max(1, m // s) * s, s, s, timed(bmm)))
        for n in g["elems"]:
            x = torch.randn(n, requires_grad=True)
            out["eltwise"].append((n, timed(lambda: torch.relu(x).sum().backward())))
            out["gelu"].append((n, timed(lambda: torch.nn.functional.gelu(x, approximate="tanh").sum().backward())))
            g_, t, _ = softmax_shape(n)
            sc = torch.randn(g_, t, t, requires_grad=True)
            causal = torch.ones(t, t, dtype=torch.bool).tril()
            # the score epilogue as attention writes it: scale, causal mask, softmax (3.3x a ReLU here)
            out["softmax"].append((g_ * t * t, timed(
                lambda: (sc * 0.125).masked_fill(~causal, float("-inf")).softmax(-1).sum().backward())))
            d = 128 if n >= 128 else n
            xl = torch.randn(n // d, d, requires_grad=True)
            ln = torch.nn.LayerNorm(d)
            out["layernorm"].append((n, timed(lambda: ln(xl).sum().backward())))
            c = 16
            side = max(1, int((n // (c * 4)) ** 0.5))
            xb = torch.randn(4, c, side, side, requires_grad=True)
            bn = torch.nn.BatchNorm2d(c)
            out["batchnorm"].append((4 * c * side * side, timed(lambda: bn(xb).sum().backward())))

        def updates(sizes: list[int]) -> dict[str, float]:
            """Seconds of each optimizer's step over tensors of ``sizes``."""
            ps = [torch.nn.Parameter(torch.randn(n)) for n in sizes]
            for q in ps:
                q.grad = torch.randn_like(q)
            return {name: timed(opt.step) for name, opt in (("adam", torch.optim.Adam(ps, lr=1e-6)),
                                                             ("sgd", torch.optim.SGD(ps, lr=1e-6)))}

        # what each tensor adds: torch's CPU optimizers step tensor by tensor (Adam ~10 kernels
        # each: ~22 us a tensor here, so ResNet-18's 62 tensors cost 1.3 ms more than 4 of the
        # same parameters)
        optimizer_curves(out, updates, g["params"], TENSORS["torch"], 4)
        return out
    finally:
        torch.set_num_threads(old)


# ---- jax (one XLA-CPU device, inside one program) -------------------------------------------------


def jax_table(tiny: bool = False) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    import optax

    g = grids(tiny)
    # a layer's marginal cost inside one program: the forward + backward of five copies in a row less
    # that of one, over four (a jax step is one XLA program, so its layers pay no dispatch, no transfer and no
    # program set-up of their own). Not a fori_loop over copies: XLA-CPU runs a convolution's
    # backward inside a loop 10-20x slower than the same convolution outside one.
    def chained(layer: Callable[[Any, Any], Any], w: Any, x: Any, copies: int) -> float:
        def loss(w_: Any, x_: Any) -> Any:
            for _ in range(copies):
                x_ = layer(w_, x_)
            return jnp.sum(x_)

        f = jax.jit(jax.grad(loss, argnums=(0, 1)))
        jax.block_until_ready(f(w, x))
        return timed(lambda: jax.block_until_ready(f(w, x)))

    def marginal(layer: Callable[[Any, Any], Any], carry: Any) -> float:
        w, x = carry
        return max((chained(layer, w, x, 5) - chained(layer, w, x, 1)) / 4, 1e-7)

    def gelu_epilogue(n: int) -> tuple[int, float]:
        """A GELU where transformers have it, on a dense layer's outputs over positions ([B, T, F]):
        the marginal dense + GELU less the marginal dense (here 9 ms for 16 x 64 x 512 outputs in
        that layout, 2.5 in a 2-D one, where a chain of GELUs alone costs 0.5), never below that chain."""
        f = min(512, max(1, n // 16))
        t = max(1, n // (16 * f))
        c = (jnp.ones((f, f), jnp.float32) * 1e-3, jnp.ones((16, t, f), jnp.float32))
        alone = marginal(lambda w, x_: jax.nn.gelu(x_ * w[0, 0]), c)
        extra = marginal(lambda w, x_: jax.nn.gelu(x_ @ w), c) - marginal(lambda w, x_: x_ @ w, c)
        return 16 * t * f, max(extra, alone)

    out: dict[str, Any] = {"dense": [], "conv": [], "bmm": [], "eltwise": [], "gelu": [], "softmax": [],
                           "layernorm": [], "batchnorm": [], "adam": [], "sgd": [], "adam_tensors": [], "sgd_tensors": []}
    for m in g["dense_m"]:
        for s in g["dense_s"]:
            c = (jnp.ones((s, s), jnp.float32) * 1e-3, jnp.ones((m, s), jnp.float32))
            out["dense"].append((m, s, s, marginal(lambda w, x: x @ w, c)))
    for ch in g["conv_c"]:
        for hw in g["conv_hw"]:
            def conv(w: Any, x: Any) -> Any:
                return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
            c = (jnp.ones((3, 3, ch, ch), jnp.float32) * 1e-3, jnp.ones((CONV_BATCH, hw, hw, ch), jnp.float32))
            out["conv"].append((CONV_BATCH * hw * hw, 9 * ch, ch, marginal(conv, c)))
    for m in g["bmm_m"]:  # attention's products: both operands activations, as q k^T is
        for s in g["bmm_s"]:
            c = (jnp.ones((), jnp.float32) * 1e-3, jnp.ones((max(1, m // s), s, s), jnp.float32))
            out["bmm"].append((max(1, m // s) * s, s, s, marginal(lambda w, x: (x @ jnp.swapaxes(x, -1, -2)) * w, c)))
    for n in g["elems"]:
        d = 128 if n >= 128 else n
        x = jnp.ones((n // d, d), jnp.float32)
        out["eltwise"].append((n, marginal(lambda w, x_: jax.nn.relu(x_ * w), (jnp.ones((), jnp.float32), x))))
        out["gelu"].append(gelu_epilogue(n))
        g_, t, _ = softmax_shape(n)
        causal = jnp.tril(jnp.ones((t, t), bool))
        out["softmax"].append((g_ * t * t, marginal(lambda w, x_: jax.nn.softmax(jnp.where(causal, x_ * w, -jnp.inf), axis=-1),
                                                    (jnp.ones((), jnp.float32) * 0.125, jnp.ones((g_, t, t), jnp.float32)))))

        def ln(w: Any, x_: Any) -> Any:
            mu = x_.mean(-1, keepdims=True)
            return (x_ - mu) * jax.lax.rsqrt(((x_ - mu) ** 2).mean(-1, keepdims=True) + 1e-5) * w

        out["layernorm"].append((n, marginal(ln, (jnp.ones((d,), jnp.float32), x))))
        xb = x.reshape(-1, 16) if n >= 16 else x

        def bn(w: Any, x_: Any) -> Any:
            mu = x_.mean(0)
            return (x_ - mu) * jax.lax.rsqrt(((x_ - mu) ** 2).mean(0) + 1e-5) * w

        out["batchnorm"].append((int(xb.size), marginal(bn, (jnp.ones((xb.shape[-1],), jnp.float32), xb))))
    # the update of P parameters: a program that does just that, less an empty program's dispatch.
    # Not a marginal cost: five updates of one array in a row fuse into one pass over the memory
    # (SGD's came out at 0.1 us a size, Adam's at 1/9 of an mlp's real one), and five distinct
    # arrays less one varied 2-4x between runs here (82-204 us at 100000 parameters) where one
    # update's own program held within 15% (200-270 us). One array of P, not four of P/4: a model's
    # update is its largest tensors', and four quarters stay in cache
    x0 = jnp.ones((), jnp.float32)
    empty = jax.jit(lambda v: v + 1.0)
    jax.block_until_ready(empty(x0))
    t0 = timed(lambda: jax.block_until_ready(empty(x0)))

    def updates(sizes: list[int]) -> dict[str, float]:
        """Seconds of each optimizer's update of arrays of ``sizes``, less the empty program's."""
        params = [jnp.full((n,), 1.0, jnp.float32) for n in sizes]
        grads = [jnp.full((n,), 1e-3, jnp.float32) for n in sizes]
        got = {}
        for name, tx in (("adam", optax.adam(1e-6)), ("sgd", optax.sgd(1e-6))):
            state = tx.init(params)

            def upd(ps: Any, st: Any, gs: Any, tx: Any = tx) -> Any:
                u, st = tx.update(gs, st, ps)
                return optax.apply_updates(ps, u), st

            f1 = jax.jit(upd)
            jax.block_until_ready(f1(params, state, grads))
            got[name] = max(timed(lambda: jax.block_until_ready(f1(params, state, grads))) - t0, 1e-7)
        return got

    optimizer_curves(out, updates, g["params"], TENSORS["jax"], 1)
    return out
