"""Framework-free model descriptions: shapes, parameter counts, FLOPs, gradient bytes, init.

Both frameworks build their modules from the same spec and the same numpy initialisation, so a
torch run and a JAX run of "the same model" start from bit-identical parameters, and the
throughput model can count FLOPs of full-size networks without building them.

Conventions (used by ``scaling/throughput/flops.py`` and the MFU numbers):
- FLOPs count multiply-adds as 2 and cover matmuls and convolutions (what FLOP counters and peak
  figures count); elementwise work (bias adds, activations, the loss) is listed separately as
  ``elementwise`` and is not part of model FLOPs.
- backward of a dense layer = 2 x forward (input gradient + weight gradient), except that the first
  layer has no input gradient because the data does not require one.
"""

from __future__ import annotations

import dataclasses
import math
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from models.errors import UsageError, did_you_mean


@dataclass(frozen=True)
class LayerCost:
    """One layer's share of the work, per sample."""

    name: str
    kind: str
    params: int
    forward_flops: int
    backward_flops: int
    activations: int
    """Output elements kept for backward (activation memory per sample, in elements)."""
    elementwise: int = 0
    """Elementwise FLOPs (bias, activation), not part of model FLOPs."""
    activation: str = ""
    """A matmul's nonlinearity where it costs far more than a bias or a ReLU (``gelu``, attention's
    ``softmax`` with its scale and causal mask): the host's
    layer table prices it by its own curve, on ``activation_elems`` outputs per sample."""
    activation_elems: int = 0
    gemm: tuple[int, int, int] = ()
    """(rows per sample, K, N) of a matmul whose shape the spec states: attention's products are one
    small product per head, which its FLOPs, outputs and (no) parameters cannot tell apart from one
    square GEMM; empty: recovered from those (``host_step``)."""


class ModelSpec(ABC):
    """A model described without any framework."""

    name: ClassVar[str]
    task: ClassVar[str] = "regression"
    """regression: squared-error loss on float targets; classification: cross-entropy on labels."""

    @property
    @abstractmethod
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample (no batch dimension)."""

    @property
    @abstractmethod
    def output_dim(self) -> int: ...

    @abstractmethod
    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Canonical parameter names -> canonical layouts, in a fixed order."""

    @abstractmethod
    def layer_costs(self) -> list[LayerCost]: ...

    @abstractmethod
    def init_params(self, seed: int) -> dict[str, np.ndarray]:
        """Deterministic float32 initialisation shared by every framework."""

    # ---- derived figures ---------------------------------------------------------------
    @property
    def param_count(self) -> int:
        return sum(math.prod(s) for s in self.param_shapes().values())

    def grad_bytes(self, bytes_per_elem: int = 4) -> int:
        """Bytes all-reduced per step: gradients stay fp32 whatever the compute dtype."""
        return self.param_count * bytes_per_elem

    @property
    def forward_flops_per_sample(self) -> int:
        return sum(layer.forward_flops for layer in self.layer_costs())

    @property
    def backward_flops_per_sample(self) -> int:
        return sum(layer.backward_flops for layer in self.layer_costs())

    @property
    def train_flops_per_sample(self) -> int:
        return self.forward_flops_per_sample + self.backward_flops_per_sample

    @property
    def activations_per_sample(self) -> int:
        return sum(layer.activations for layer in self.layer_costs())

    def options(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def check_params(self, params: dict[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
        """Validate user-supplied parameters by canonical name and shape (one-line errors)."""
        want = self.param_shapes()
        missing = [k for k in want if k not in params]
        extra = [k for k in params if k not in want]
        if missing or extra:
            raise UsageError(
                f"{source}: parameter names {sorted(params)} do not match model {self.name!r}; "
                f"expected {list(want)}" + (f" (missing {missing})" if missing else "") + (f" (unexpected {extra})" if extra else "")
            )
        out = {}
        for k, shape in want.items():
            a = np.asarray(params[k])
            if tuple(a.shape) != tuple(shape):
                raise UsageError(f"{source}: parameter {k!r} has shape {tuple(a.shape)}, expected {tuple(shape)}")
            out[k] = a.astype(np.float32)
        return out

    def require_positive(self, *keys: str) -> None:
        """Each named option is a positive integer, else the one-line error every spec gives."""
        for k in keys:
            v = getattr(self, k, 1)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise UsageError(f"invalid --model-opt {k}={v!r} for model {self.name!r}: must be a positive integer")

    def synthetic_data(self, n: int, seed: int, teacher: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Deterministic inputs and targets for n samples.

        ``teacher``: targets come from a fixed random teacher network plus small noise, so that
        training on them shows a falling loss (a benchmark that learns nothing hides broken
        training). ``teacher=False``: pure-noise targets, whose loss cannot fall (``--data noise``).
        """
        rng = np.random.default_rng([seed, 1])
        x = rng.standard_normal((n, *self.input_shape), dtype=np.float32)
        if not teacher:
            if self.task == "classification":
                return x, rng.integers(0, self.output_dim, size=(n,)).astype(np.int64)
            return x, rng.standard_normal((n, self.output_dim), dtype=np.float32)
        out = teacher_outputs(x, self.output_dim, seed)
        noise = np.random.default_rng([seed, 3]).standard_normal(out.shape).astype(np.float32)
        if self.task == "classification":
            return x, np.argmax(out + 0.1 * noise, axis=1).astype(np.int64)
        return x, (out + 0.1 * noise).astype(np.float32)


#: hidden width of the synthetic data's teacher network
TEACHER_HIDDEN = 64


def sharding_unit(name: str) -> str:
    """The sharding unit a layer belongs to: the longest proper prefix of its name (split at '.'
    and '_') that ends in a digit (a numbered block: ``layer1.0``, ``h3``, ``blocks.0``, VGG's
    ``conv2``), else the layer itself (``stem.conv``, ``fc``).

    One rule for both sides of sharded data parallelism, so they agree on what one all-gather
    moves: ``scaling.sharding_torch`` wraps each unit in one FSDP2 group (torch module paths) and
    the throughput model prices one all-gather / reduce-scatter per unit (spec layer names). Blocks,
    not single layers, are what FSDP users wrap (torchtitan: one per transformer block)."""
    parts = re.split(r"([._])", name)  # keep the separators so a prefix is a real prefix of the name
    best = ""
    for i in range(0, len(parts) - 2, 2):  # prefixes ending before the last component
        prefix = "".join(parts[: i + 1])
        if prefix[-1:].isdigit():
            best = prefix
    return best or name


def teacher_outputs(x: np.ndarray, d_out: int, seed: int) -> np.ndarray:
    """A fixed random two-layer tanh network of the flattened input, scaled to unit variance."""
    rng = np.random.default_rng([seed, 2])
    flat = x.reshape(len(x), -1)
    w1 = rng.standard_normal((flat.shape[1], TEACHER_HIDDEN), dtype=np.float32) / np.float32(np.sqrt(flat.shape[1]))
    w2 = rng.standard_normal((TEACHER_HIDDEN, d_out), dtype=np.float32) / np.float32(np.sqrt(TEACHER_HIDDEN))
    out = np.tanh(flat @ w1) @ w2
    return out / max(float(out.std()), 1e-12)


def uniform_init(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int) -> np.ndarray:
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): torch's nn.Linear default, reproduced in numpy."""
    bound = 1.0 / math.sqrt(fan_in)
    return rng.uniform(-bound, bound, size=shape).astype(np.float32)


@dataclass(frozen=True)
class MLPSpec(ModelSpec):
    """The lecture's TwoLayerNet: x -> Linear(D_in, H) -> relu|sigmoid -> Linear(H, D_out)."""

    name: ClassVar[str] = "mlp"
    d_in: int = 1000
    hidden: int = 100
    d_out: int = 10
    bias: bool = True
    activation: str = "relu"

    def __post_init__(self) -> None:
        self.require_positive("d_in", "hidden", "d_out")
        if self.activation not in ("relu", "sigmoid"):
            raise UsageError(f"invalid --model-opt activation={self.activation!r}; valid: relu, sigmoid")

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.d_in,)

    @property
    def output_dim(self) -> int:
        return self.d_out

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes: dict[str, tuple[int, ...]] = {"w1": (self.d_in, self.hidden)}
        if self.bias:
            shapes["b1"] = (self.hidden,)
        shapes["w2"] = (self.hidden, self.d_out)
        if self.bias:
            shapes["b2"] = (self.d_out,)
        return shapes

    def layer_costs(self) -> list[LayerCost]:
        d, h, o, b = self.d_in, self.hidden, self.d_out, int(self.bias)
        fc1 = 2 * d * h
        fc2 = 2 * h * o
        act = h if self.activation == "relu" else 4 * h
        return [
            # first layer: weight gradient only (the data needs no gradient)
            LayerCost("fc1", "dense", d * h + b * h, fc1, fc1, h, elementwise=b * h + act),
            LayerCost("fc2", "dense", h * o + b * o, fc2, 2 * fc2, o, elementwise=b * o),
        ]

    def init_params(self, seed: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([seed, 0])
        p = {"w1": uniform_init(rng, (self.d_in, self.hidden), self.d_in)}
        if self.bias:
            p["b1"] = uniform_init(rng, (self.hidden,), self.d_in)
        p["w2"] = uniform_init(rng, (self.hidden, self.d_out), self.hidden)
        if self.bias:
            p["b2"] = uniform_init(rng, (self.d_out,), self.hidden)
        return {k: p[k] for k in self.param_shapes()}


#: model name -> spec class. The model-zoo issue adds CNNs and a transformer here.
SPECS: dict[str, type[ModelSpec]] = {"mlp": MLPSpec}


def _coerce(value: Any, typ: Any, key: str, model: str) -> Any:
    if not isinstance(value, str):
        return value
    t = str(typ)
    try:
        if t in ("bool", "<class 'bool'>"):
            if value.lower() in ("true", "1", "yes"):
                return True
            if value.lower() in ("false", "0", "no"):
                return False
            raise ValueError
        if t in ("int", "<class 'int'>"):
            return int(value)
        if t in ("float", "<class 'float'>"):
            return float(value)
        if "tuple" in t:
            return tuple(int(v) for v in value.replace("x", ",").split(",") if v)
    except ValueError:
        raise UsageError(f"invalid --model-opt {key}={value!r} for model {model!r}: expected {t}") from None
    return value


def canonical_model_name(name: str) -> str:
    """The zoo's spelling of a model name: ``resnet-50``, ``ResNet50`` and ``resnet_50`` are the zoo's
    ``resnet50`` (papers and torchvision spell them differently); an unknown name comes back as given."""
    if name in SPECS:
        return name
    key = name.lower().replace("-", "").replace("_", "")
    return next((k for k in SPECS if k.replace("-", "").replace("_", "") == key), name)


def get_spec(name: str, **opts: Any) -> ModelSpec:
    """Build a spec by model name; opts may be strings from the command line."""
    name = canonical_model_name(name)
    if name not in SPECS:
        raise UsageError(f"unknown model {name!r}{did_you_mean(name, SPECS)}; valid: {', '.join(SPECS)}")
    cls = SPECS[name]
    flds = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    aliases = {"h": "hidden", "d_hidden": "hidden"}
    kwargs = {}
    for k, v in opts.items():
        key = aliases.get(k.replace("-", "_"), k.replace("-", "_"))
        if key not in flds:
            raise UsageError(f"unknown --model-opt {k!r} for model {name!r}{did_you_mean(k, flds)}; valid: {', '.join(flds)}")
        kwargs[key] = _coerce(v, flds[key].type, key, name)
    return cls(**kwargs)
