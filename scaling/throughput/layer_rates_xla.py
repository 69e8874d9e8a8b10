"""torch_xla's own layer table: what a layer of a torch model costs when torch_xla runs it on one
XLA-CPU device.

torch-xla's programs run on the same XLA-CPU runtime as jax's, but they are not the same programs:
torch_xla traces the model's torch ops every step and lowers them its own way (a convolution in
NCHW, its own softmax, layer norm and Adam). Priced from jax's table, every model but the reference
mlp came out 28-96% low, and ResNet-18 took 8.1 s a step at N = 16 where jax-sharded took 0.62 s.
So the same grid (``layer_rates.grids``) is timed through torch_xla, each layer as jax's is: the
marginal cost of one more copy in one traced step (five copies less one, over four). Steps are
dispatched back to back and the device drained once per repeat, as a training loop's steps
overlap the host's tracing of one with the device running the last: a copy costs what the slower
of the two adds.
"""

from __future__ import annotations

from typing import Any, Callable

from scaling.throughput.layer_rates import CONV_BATCH, TENSORS, grids, optimizer_curves, softmax_shape, timed


def torch_xla_table(tiny: bool = False) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F
    import torch_xla
    import torch_xla.core.xla_model as xm

    dev = torch_xla.device()
    g = grids(tiny)

    def leaf(shape: tuple[int, ...], scale: float = 1.0) -> Any:
        return (torch.ones(shape) * scale).to(dev).requires_grad_(True)

    def chained(layer: Callable[[Any, Any], Any], w: Any, x: Any, copies: int) -> float:
        def step() -> None:
            w.grad = x.grad = None
            y = x
            for _ in range(copies):
                y = layer(w, y)
            y.sum().backward()
            torch_xla.sync()

        return timed(step, drain=xm.wait_device_ops)

    def marginal(layer: Callable[[Any, Any], Any], w: Any, x: Any) -> float:
        return max((chained(layer, w, x, 5) - chained(layer, w, x, 1)) / 4, 1e-7)

    out: dict[str, Any] = {"dense": [], "conv": [], "bmm": [], "eltwise": [], "gelu": [], "softmax": [],
                           "layernorm": [], "batchnorm": [], "adam": [], "sgd": [], "adam_tensors": [], "sgd_tensors": []}
    for m in g["dense_m"]:
        for s in g["dense_s"]:
            out["dense"].append((m, s, s, marginal(lambda w, x: x @ w, leaf((s, s), 1e-3), leaf((m, s)))))
    for ch in g["conv_c"]:
        for hw in g["conv_hw"]:
            out["conv"].append((CONV_BATCH * hw * hw, 9 * ch, ch, marginal(
                lambda w, x: F.conv2d(x, w, padding=1), leaf((ch, ch, 3, 3), 1e-3), leaf((CONV_BATCH, ch, hw, hw)))))
    for m in g["bmm_m"]:
        for s in g["bmm_s"]:
            out["bmm"].append((max(1, m // s) * s, s, s, marginal(
                lambda w, x: (x @ x.transpose(-2, -1)) * w, leaf((), 1e-3), leaf((max(1, m // s), s, s)))))
    for n in g["elems"]:
        d = 128 if n >= 128 else n
        out["eltwise"].append((n, marginal(lambda w, x: torch.relu(x * w), leaf(()), leaf((n // d, d)))))
        # a GELU where transformers have it, on a dense layer's outputs over positions (as jax's)
        f = min(512, max(1, n // 16))
        t = max(1, n // (16 * f))
        wf, xf = leaf((f, f), 1e-3), leaf((16, t, f))
        extra = (marginal(lambda w, x: F.gelu(x @ w, approximate="tanh"), wf, xf)
                 - marginal(lambda w, x: x @ w, wf, xf))
        out["gelu"].append((16 * t * f, max(extra, marginal(lambda w, x: F.gelu(x * w, approximate="tanh"), leaf(()), xf))))
        g_, t, _ = softmax_shape(n)
        causal = torch.ones(t, t, dtype=torch.bool).tril().to(dev)
        out["softmax"].append((g_ * t * t, marginal(lambda w, x: (x * w).masked_fill(~causal, float("-inf")).softmax(-1),
                                                    leaf((), 0.125), leaf((g_, t, t)))))
        out["layernorm"].append((n, marginal(lambda w, x: F.layer_norm(x, (x.shape[-1],), weight=w), leaf((d,)), leaf((n // d, d)))))
        side = max(1, int((n // (16 * 4)) ** 0.5))
        out["batchnorm"].append((4 * 16 * side * side, marginal(lambda w, x: F.batch_norm(x, None, None, weight=w, training=True),
                                                                leaf((16,)), leaf((4, 16, side, side)))))

    # the update: one update's own step less an empty step's (a chain of updates is not what a
    # training step runs), over the optimizer's real per-tensor code as torch_xla traces it
    z = torch.zeros((), device=dev)

    def empty() -> None:
        z.add_(1.0)
        torch_xla.sync()

    t0 = timed(empty, drain=xm.wait_device_ops)

    def updates(sizes: list[int]) -> dict[str, float]:
        ps = [torch.nn.Parameter(torch.ones(n).to(dev)) for n in sizes]
        for q in ps:
            q.grad = torch.full_like(q, 1e-3)
        got = {}
        for name, opt in (("adam", torch.optim.Adam(ps, lr=1e-6)), ("sgd", torch.optim.SGD(ps, lr=1e-6))):
            def step(opt: Any = opt) -> None:
                opt.step()
                torch_xla.sync()

            got[name] = max(timed(step, drain=xm.wait_device_ops) - t0, 1e-7)
        return got

    optimizer_curves(out, updates, g["params"], TENSORS["torch_xla"], 4)
    return out


#: the SPMD probe's two one-weight models (S x S, no bias) and samples per device
SPMD_SIDES = (16, 512)
SPMD_BATCH = 32


def spmd_probe(reps: int = 5) -> dict[str, Any]:
    """torch-xla's SPMD step of a one-weight linear model on all of this process's devices, at two
    weight sizes, per optimizer: how its step grows with the gradient's bytes at this N. At N = 2
    the mlp of width 1024 took 17.8 ms a step where one device took 5.1 and the reference mlp 3.9
    at both: the growth with N is the partitioned program's, not the layers' (at N = 1 the layer
    table prices it within 2-19%). ``calibration.host_terms`` compares it with N = 1's growth."""
    import numpy as np
    import torch
    import torch_xla
    import torch_xla.core.xla_model as xm
    import torch_xla.distributed.spmd as xs
    import torch_xla.runtime as xr

    xr.use_spmd()
    n = xr.global_runtime_device_count()
    mesh = xs.Mesh(np.arange(n), (n,), ("data",))
    dev = torch_xla.device()
    out: dict[str, Any] = {"bytes": 4 * (SPMD_SIDES[1] ** 2 - SPMD_SIDES[0] ** 2)}
    for name in ("adam", "sgd"):
        got = []
        for side in SPMD_SIDES:
            lin = torch.nn.Linear(side, side, bias=False).to(dev)
            opt = torch.optim.Adam(lin.parameters(), lr=1e-6) if name == "adam" else torch.optim.SGD(lin.parameters(), lr=1e-6)
            x = torch.ones(SPMD_BATCH * n, side).to(dev)
            xs.mark_sharding(x, mesh, ("data", None))

            def step(lin: Any = lin, opt: Any = opt, x: Any = x) -> None:
                (lin(x) ** 2).mean().backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                torch_xla.sync()

            got.append(timed(step, drain=xm.wait_device_ops, reps=reps))
        out[name] = got[1] - got[0]
    return out
