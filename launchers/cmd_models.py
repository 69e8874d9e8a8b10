"""``podscale models``: the zoo as numbers — what each model costs and how hard it is to scale.

Every figure comes from the framework-free spec (no framework import, full-size models counted
without building them). ``--check torch`` / ``--check jax`` adds the frameworks' own counts:
``FlopCounterMode`` over a forward + backward on the meta device, and XLA's ``cost_analysis()`` of
the jitted gradient computation lowered from abstract shapes (``nnx.eval_shape``), so neither
allocates a full-size model.

comm/compute = gradient bytes all-reduced per step ÷ model FLOPs per step on one device, at the
stated per-device batch: the bytes each FLOP has to hide. VGG-16's large dense layers give it far
more bytes per FLOP than ResNet-50, which is why it scales worst under data parallelism.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from models.spec import SPECS, ModelSpec, get_spec
from scaling.errors import UsageError

ZOO = ("mlp", "alexnet", "vgg16", "resnet18", "resnet50", "gpt-tiny")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="the model zoo: params, FLOPs, memory, gradient bytes, comm/compute")
    p.add_argument("names", nargs="*", help=f"models to list (default: all: {', '.join(SPECS)})")
    p.add_argument("--batch", type=int, default=32, help="per-device batch for the comm/compute ratio (default 32)")
    p.add_argument("--model-opt", action="append", default=[], dest="model_opt", metavar="KEY=VALUE",
                   help="hyper-parameter applied to every listed model that has it (e.g. image_size=32)")
    p.add_argument("--check", choices=("torch", "jax"), action="append", default=[],
                   help="also count train FLOPs per sample with the framework (repeatable)")
    p.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    p.add_argument("--wide", action="store_true", help="every column (forward FLOPs, activations, bytes per FLOP)")
    p.set_defaults(func=main)


def row(spec: ModelSpec, batch: int) -> dict[str, Any]:
    train = spec.train_flops_per_sample
    return {
        "model": spec.name,
        "params": spec.param_count,
        "forward_flops_per_sample": spec.forward_flops_per_sample,
        "train_flops_per_sample": train,
        "activation_bytes_per_sample": 4 * spec.activations_per_sample,
        "grad_bytes": spec.grad_bytes(),
        "batch": batch,
        "comm_to_compute_bytes_per_flop": spec.grad_bytes() / (train * batch),
    }


def torch_train_flops(spec: ModelSpec, batch: int = 2) -> int:
    """Forward + backward FLOPs per sample from ``FlopCounterMode``, on the meta device."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        module = _torch_module(spec)
        x = torch.zeros((batch, *spec.input_shape), dtype=torch.long if spec.name == "gpt-tiny" else torch.float32)
    counter = FlopCounterMode(display=False)
    with counter:
        module(x).float().sum().backward()
    return counter.get_total_flops() // batch


def _torch_module(spec: ModelSpec) -> Any:
    """The torch module with uninitialised (meta) parameters: the builders' copies are skipped."""
    from models.torch import cnn, gpt

    if spec.name == "gpt-tiny":
        return gpt.GPT(spec)  # type: ignore[arg-type]
    if spec.name == "mlp":
        from models.torch.mlp import TwoLayerNet

        return TwoLayerNet(spec.d_in, spec.hidden, spec.d_out, spec.bias, spec.activation)  # type: ignore[attr-defined]
    return cnn.CNN(spec)  # type: ignore[arg-type]


def jax_train_flops(spec: ModelSpec, batch: int = 2) -> int:
    """XLA's FLOPs per sample for the jitted gradient of the summed loss, from abstract shapes.

    XLA also counts elementwise work (batch norm, activations, softmax, the loss), which the spec
    keeps out of model FLOPs: expect XLA >= spec by the spec's ``elementwise`` share.
    """
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from models import flax as mflax

    def make() -> Any:
        zeros = {k: jnp.zeros(s, jnp.float32) for k, s in spec.param_shapes().items()}
        return mflax.build(spec, zeros)

    graphdef, state = nnx.split(nnx.eval_shape(make))
    int_in = spec.name == "gpt-tiny"
    xs = jax.ShapeDtypeStruct((batch, *spec.input_shape), jnp.int32 if int_in else jnp.float32)
    cls = spec.task == "classification"
    ys = jax.ShapeDtypeStruct((batch, *spec.input_shape) if int_in else (batch,) if cls else (batch, spec.output_dim),
                              jnp.int32 if cls else jnp.float32)

    def loss(st: Any, x: Any, y: Any) -> Any:
        out = nnx.merge(graphdef, st)(x)
        return optax.softmax_cross_entropy_with_integer_labels(out, y).sum() if cls else jnp.sum((out - y) ** 2)

    cost = jax.jit(jax.grad(loss)).lower(state, xs, ys).cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    return int(cost["flops"]) // batch


def _fmt(n: float, unit: str = "") -> str:
    for div, suf in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g} {suf}{unit}"
    return f"{n:.3g} {unit}".strip()


def main(args: argparse.Namespace) -> int:
    from launchers.flags import parse_model_opts

    if args.batch < 1:
        raise UsageError(f"invalid --batch {args.batch}: must be a positive integer")
    names = args.names or [n for n in ZOO if n in SPECS] + [n for n in SPECS if n not in ZOO]
    opts = parse_model_opts(args.model_opt)
    rows = []
    for name in names:
        cls = SPECS.get(name)
        if cls is None:
            raise UsageError(f"unknown model {name!r}; valid: {', '.join(SPECS)}")
        fields = {f for f in getattr(cls, "__dataclass_fields__", {})}
        spec = get_spec(name, **{k: v for k, v in opts.items() if k.replace("-", "_") in fields})
        r = row(spec, args.batch)
        if "torch" in args.check:
            r["torch_train_flops_per_sample"] = torch_train_flops(spec)
        if "jax" in args.check:
            r["xla_train_flops_per_sample"] = jax_train_flops(spec)
        rows.append(r)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"model zoo (fp32; comm/compute at per-device batch {args.batch})")
    cols = ["model", "params", "fwd FLOPs/sample", "train FLOPs/sample", "activations/sample", "grad bytes", "bytes/FLOP"]
    cols += [f"{c} train FLOPs" for c in args.check]
    narrow = {"fwd FLOPs/sample", "activations/sample", "bytes/FLOP"}  # --wide only: the rest fits 80 columns
    for c in cols:
        t.add_column(c, justify="left" if c == "model" else "right", no_wrap=c == "model")
    for r in rows:
        cells = [r["model"], _fmt(r["params"]), _fmt(r["forward_flops_per_sample"]), _fmt(r["train_flops_per_sample"]),
                 _fmt(r["activation_bytes_per_sample"], "B"), _fmt(r["grad_bytes"], "B"), f"{r['comm_to_compute_bytes_per_flop']:.2e}"]
        for c in args.check:
            v = r["torch_train_flops_per_sample" if c == "torch" else "xla_train_flops_per_sample"]
            cells.append(f"{_fmt(v)} ({v / r['train_flops_per_sample'] - 1:+.1%})")
        t.add_row(*cells)
    if not args.wide:
        for i in sorted((i for i, c in enumerate(cols) if c in narrow), reverse=True):
            t.columns.pop(i)
    Console().print(t)
    return 0
