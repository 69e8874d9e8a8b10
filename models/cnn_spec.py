"""AlexNet, VGG-16 and ResNet-18/50 as framework-free specs: one op list, read by both frameworks.

Each spec lowers to a flat list of ``Op`` records (conv, bn, relu, pools, linear, residual adds
between named registers). Shapes, parameter counts and FLOPs are computed from that list here, and
``models/torch/cnn.py`` and ``models/flax/cnn.py`` interpret the same list, so the three can never
drift apart: a spec change is a change of every implementation and of every count at once.

Conventions (see ``models.spec``):
- samples are (C, H, W) float32 (the torch layout); Flax transposes to NHWC inside the module and
  back before flattening, so the classifier's weight rows are in C, H, W order in both frameworks.
- canonical layouts: conv weight (kh, kw, c_in, c_out) (HWIO), linear weight (in, out), batch norm
  ``scale``/``bias`` are parameters, ``mean``/``var`` (running statistics) are *state*
  (``state_shapes``) — not counted in ``param_count`` nor all-reduced, but carried in checkpoints and
  in ``final_params.npz`` so runs can be compared.
- no dropout (runs are deterministic and comparable across frameworks) and no adaptive pooling:
  the classifier takes the feature map as it is, which at 224x224 is exactly torchvision's 6x6 / 7x7.
- a pool whose window does not fit the map (small inputs) is left out.
- FLOPs: 2 per multiply-add of convolutions and linear layers; backward = 2 x forward, except the
  first convolution (its input is data: weight gradient only). Batch norm, relu, pools and the adds
  are ``elementwise`` (not model FLOPs), as ``FlopCounterMode`` and peak figures count them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from models.spec import SPECS, LayerCost, ModelSpec, uniform_init
from models.errors import UsageError


@dataclass(frozen=True)
class Op:
    """One step of the network: read register ``src``, write register ``dst``.

    kind / args: conv (c_in, c_out, k, stride, pad, bias) · bn (c,) · relu () ·
    maxpool (k, stride, pad) · gap () (global average pool -> (C,)) · flatten () ·
    linear (d_in, d_out, bias) · add (other_register,) · copy ().
    """

    kind: str
    name: str = ""
    args: tuple[Any, ...] = ()
    src: str = "h"
    dst: str = "h"


BN_EPS = 1e-5
BN_MOMENTUM = 0.1
"""torch's convention: running = (1 - m) * running + m * batch (unbiased variance)."""


class CNNSpec(ModelSpec):
    """Shared machinery: shapes, costs and init from ``ops()``."""

    task: ClassVar[str] = "classification"
    image_size: int
    in_channels: int
    num_classes: int

    def _check_common(self) -> None:
        self.require_positive("image_size", "in_channels", "num_classes", "width")
        self.shapes()  # raises a one-line UsageError when the input is too small for the network

    def ops(self) -> list[Op]:
        raise NotImplementedError

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.in_channels, self.image_size, self.image_size)

    @property
    def output_dim(self) -> int:
        return self.num_classes

    # ---- shape inference -------------------------------------------------------------------
    def shapes(self) -> list[tuple[Op, tuple[int, ...], tuple[int, ...]]]:
        """(op, input shape, output shape) for every op, per sample."""
        regs: dict[str, tuple[int, ...]] = {"h": self.input_shape}
        out = []
        for op in self.ops():
            s = regs[op.src]
            if op.kind == "conv":
                ci, co, k, st, p, _ = op.args
                if s[0] != ci:
                    raise AssertionError(f"{op.name}: {s} into conv with {ci} input channels")
                h = (s[1] + 2 * p - k) // st + 1
                w = (s[2] + 2 * p - k) // st + 1
                if h < 1 or w < 1:
                    raise UsageError(
                        f"invalid --model-opt image_size={self.image_size} for model {self.name!r}: "
                        f"layer {op.name} gets a {s[1]}x{s[2]} map, too small (use a larger image_size or small=true)"
                    )
                t: tuple[int, ...] = (co, h, w)
            elif op.kind == "maxpool":
                k, st, p = op.args
                t = (s[0], (s[1] + 2 * p - k) // st + 1, (s[2] + 2 * p - k) // st + 1)
            elif op.kind == "gap":
                t = (s[0],)
            elif op.kind == "flatten":
                t = (math.prod(s),)
            elif op.kind == "linear":
                if s != (op.args[0],):
                    raise AssertionError(f"{op.name}: {s} into linear with {op.args[0]} inputs")
                t = (op.args[1],)
            elif op.kind == "add":
                if regs[op.args[0]] != s:
                    raise AssertionError(f"{op.name}: add of {s} and {regs[op.args[0]]}")
                t = s
            else:  # bn, relu, copy
                t = s
            regs[op.dst] = t
            out.append((op, s, t))
        return out

    # ---- parameters ----------------------------------------------------------------------------
    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes: dict[str, tuple[int, ...]] = {}
        for op in self.ops():
            if op.kind == "conv":
                ci, co, k, _, _, bias = op.args
                shapes[f"{op.name}.w"] = (k, k, ci, co)
                if bias:
                    shapes[f"{op.name}.b"] = (co,)
            elif op.kind == "bn":
                shapes[f"{op.name}.scale"] = (op.args[0],)
                shapes[f"{op.name}.bias"] = (op.args[0],)
            elif op.kind == "linear":
                shapes[f"{op.name}.w"] = (op.args[0], op.args[1])
                if op.args[2]:
                    shapes[f"{op.name}.b"] = (op.args[1],)
        return shapes

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        """Batch-norm running statistics: not trained, not all-reduced, averaged over replicas."""
        out: dict[str, tuple[int, ...]] = {}
        for op in self.ops():
            if op.kind == "bn":
                out[f"{op.name}.mean"] = (op.args[0],)
                out[f"{op.name}.var"] = (op.args[0],)
        return out

    def init_state(self) -> dict[str, np.ndarray]:
        return {k: (np.zeros if k.endswith(".mean") else np.ones)(s, dtype=np.float32) for k, s in self.state_shapes().items()}

    def init_params(self, seed: int) -> dict[str, np.ndarray]:
        """He-normal convolutions (fan-in, relu gain), torch-default uniform linear layers, BN 1/0."""
        rng = np.random.default_rng([seed, 0])
        p: dict[str, np.ndarray] = {}
        for op in self.ops():
            if op.kind == "conv":
                ci, co, k, _, _, bias = op.args
                fan_in = ci * k * k
                p[f"{op.name}.w"] = (rng.standard_normal((k, k, ci, co), dtype=np.float32) * np.float32(math.sqrt(2.0 / fan_in)))
                if bias:
                    p[f"{op.name}.b"] = np.zeros((co,), np.float32)
            elif op.kind == "bn":
                p[f"{op.name}.scale"] = np.ones((op.args[0],), np.float32)
                p[f"{op.name}.bias"] = np.zeros((op.args[0],), np.float32)
            elif op.kind == "linear":
                di, do, bias = op.args
                p[f"{op.name}.w"] = uniform_init(rng, (di, do), di)
                if bias:
                    p[f"{op.name}.b"] = uniform_init(rng, (do,), di)
        return p

    def check_params(self, params: dict[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
        """Parameters by canonical name; running statistics may ride along (else the init state)."""
        state = self.state_shapes()
        base = super().check_params({k: v for k, v in params.items() if k not in state}, source)
        for k, shape in state.items():
            if k in params:
                a = np.asarray(params[k])
                if tuple(a.shape) != shape:
                    raise UsageError(f"{source}: state {k!r} has shape {tuple(a.shape)}, expected {shape}")
                base[k] = a.astype(np.float32)
        return base

    # ---- costs ----------------------------------------------------------------------------------
    def layer_costs(self) -> list[LayerCost]:
        costs = []
        first = True
        for op, s, t in self.shapes():
            n_out = math.prod(t)
            if op.kind == "conv":
                ci, co, k, _, _, bias = op.args
                fwd = 2 * ci * k * k * n_out
                costs.append(LayerCost(op.name, "conv", ci * co * k * k + co * int(bias), fwd, fwd if first else 2 * fwd, n_out, elementwise=n_out * int(bias)))
                first = False
            elif op.kind == "linear":
                di, do, bias = op.args
                fwd = 2 * di * do
                costs.append(LayerCost(op.name, "dense", di * do + do * int(bias), fwd, fwd if first else 2 * fwd, do, elementwise=do * int(bias)))
                first = False
            elif op.kind == "bn":
                costs.append(LayerCost(op.name, "bn", 2 * s[0], 0, 0, n_out, elementwise=8 * n_out))
            elif op.kind in ("relu", "add"):
                costs.append(LayerCost(op.name or op.kind, op.kind, 0, 0, 0, n_out, elementwise=n_out))
            elif op.kind in ("maxpool", "gap"):
                costs.append(LayerCost(op.name or op.kind, op.kind, 0, 0, 0, n_out, elementwise=math.prod(s)))
            # flatten and copy are views: no work, nothing new kept
        return costs


def _valid_taps(size: int, k: int, stride: int, pad: int) -> int:
    """Kernel taps that land inside the input, summed over the output positions of one axis."""
    out = (size + 2 * pad - k) // stride + 1
    return sum(sum(1 for j in range(k) if 0 <= i * stride - pad + j < size) for i in range(out))


def train_flops_without_padding(spec: CNNSpec) -> int:
    """Train FLOPs per sample counting only taps on real (non-padding) inputs.

    XLA's cost analysis counts a convolution this way, ``FlopCounterMode`` and the spec count the
    full k x k window at every output; the ratio of the two is the padding share of the network.
    """
    total, first = 0, True
    for op, s, _t in spec.shapes():
        if op.kind == "conv":
            ci, co, k, st, p, _ = op.args
            fwd = 2 * ci * co * _valid_taps(s[1], k, st, p) * _valid_taps(s[2], k, st, p)
        elif op.kind == "linear":
            fwd = 2 * op.args[0] * op.args[1]
        else:
            continue
        total += fwd * (2 if first else 3)
        first = False
    return total


def _pool_ops(spec: CNNSpec, ops: list[Op], k: int, s: int, p: int, name: str) -> None:
    """Append a max-pool unless its window no longer fits the current map (small inputs)."""
    size = spec.image_size
    for op in ops:  # spatial size so far (square maps)
        if op.kind == "conv":
            size = (size + 2 * op.args[4] - op.args[2]) // op.args[3] + 1
        elif op.kind == "maxpool":
            size = (size + 2 * op.args[2] - op.args[0]) // op.args[1] + 1
    if size + 2 * p >= k:
        ops.append(Op("maxpool", name, (k, s, p)))


@dataclass(frozen=True)
class AlexNetSpec(CNNSpec):
    """torchvision's AlexNet (one-tower variant, 61.1 M params at 224) without dropout.

    ``width`` scales the conv channels (64, 192, 384, 256, 256 at width=64); ``small`` swaps the
    11x11/4 stem and the 3x3/2 pools for a 3x3/1 stem and 2x2/2 pools, for 8..32-pixel inputs.
    """

    name: ClassVar[str] = "alexnet"
    image_size: int = 224
    in_channels: int = 3
    num_classes: int = 1000
    width: int = 64
    hidden: int = 4096
    small: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.hidden, int) or self.hidden < 1:
            raise UsageError(f"invalid --model-opt hidden={self.hidden!r} for model 'alexnet': must be a positive integer")
        self._check_common()

    def ops(self) -> list[Op]:
        c = [max(1, round(x * self.width / 64)) for x in (64, 192, 384, 256, 256)]
        pk, ps = (2, 2) if self.small else (3, 2)
        stem = (self.in_channels, c[0], 3, 1, 1, True) if self.small else (self.in_channels, c[0], 11, 4, 2, True)
        ops: list[Op] = [Op("conv", "conv1", stem), Op("relu")]
        _pool_ops(self, ops, pk, ps, 0, "pool1")
        ops += [Op("conv", "conv2", (c[0], c[1], 5, 1, 2, True)), Op("relu")]
        _pool_ops(self, ops, pk, ps, 0, "pool2")
        ops += [Op("conv", "conv3", (c[1], c[2], 3, 1, 1, True)), Op("relu"),
                Op("conv", "conv4", (c[2], c[3], 3, 1, 1, True)), Op("relu"),
                Op("conv", "conv5", (c[3], c[4], 3, 1, 1, True)), Op("relu")]
        _pool_ops(self, ops, pk, ps, 0, "pool3")
        feat = _feature_size(self, ops)
        ops += [Op("flatten"),
                Op("linear", "fc1", (feat, self.hidden, True)), Op("relu"),
                Op("linear", "fc2", (self.hidden, self.hidden, True)), Op("relu"),
                Op("linear", "fc3", (self.hidden, self.num_classes, True))]
        return ops


def _feature_size(spec: CNNSpec, ops: list[Op]) -> int:
    c, h = spec.in_channels, spec.image_size
    for op in ops:
        if op.kind == "conv":
            c, h = op.args[1], (h + 2 * op.args[4] - op.args[2]) // op.args[3] + 1
        elif op.kind == "maxpool":
            h = (h + 2 * op.args[2] - op.args[0]) // op.args[1] + 1
    if h < 1:
        raise UsageError(f"invalid --model-opt image_size={spec.image_size} for model {spec.name!r}: the feature map vanishes (use a larger image_size or small=true)")
    return c * h * h


VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


@dataclass(frozen=True)
class VGG16Spec(CNNSpec):
    """VGG-16 (configuration D, 138.4 M params, 15.5 G multiply-adds at 224), no BN, no dropout.

    ``width`` scales the channels (64..512 at width=64); pools that no longer fit are left out, so
    small inputs work without a separate variant (``small`` is accepted for a uniform CLI).
    """

    name: ClassVar[str] = "vgg16"
    image_size: int = 224
    in_channels: int = 3
    num_classes: int = 1000
    width: int = 64
    hidden: int = 4096
    small: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.hidden, int) or self.hidden < 1:
            raise UsageError(f"invalid --model-opt hidden={self.hidden!r} for model 'vgg16': must be a positive integer")
        self._check_common()

    def ops(self) -> list[Op]:
        ops: list[Op] = []
        c_in, block, idx = self.in_channels, 1, 1
        for v in VGG16_CFG:
            if v == "M":
                _pool_ops(self, ops, 2, 2, 0, f"pool{block}")
                block, idx = block + 1, 1
                continue
            c = max(1, round(int(v) * self.width / 64))
            ops += [Op("conv", f"conv{block}_{idx}", (c_in, c, 3, 1, 1, True)), Op("relu")]
            c_in, idx = c, idx + 1
        feat = _feature_size(self, ops)
        ops += [Op("flatten"),
                Op("linear", "fc1", (feat, self.hidden, True)), Op("relu"),
                Op("linear", "fc2", (self.hidden, self.hidden, True)), Op("relu"),
                Op("linear", "fc3", (self.hidden, self.num_classes, True))]
        return ops


RESNET_BLOCKS = {18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)), 50: ("bottleneck", (3, 4, 6, 3)), 101: ("bottleneck", (3, 4, 23, 3))}


@dataclass(frozen=True)
class ResNetSpec(CNNSpec):
    """torchvision ResNet (v1.5: stride in the 3x3 conv of a bottleneck; v1 with ``stride_in_1x1``), batch norm after every conv.

    ``width`` = stem channels (64: 11.7 M params for depth 18, 25.6 M for 50); ``small`` = CIFAR
    stem (3x3/1 conv, no max-pool) for 8..32-pixel inputs.
    """

    name: ClassVar[str] = "resnet18"
    image_size: int = 224
    in_channels: int = 3
    num_classes: int = 1000
    width: int = 64
    small: bool = False
    depth: ClassVar[int] = 18
    stride_in_1x1: ClassVar[bool] = False
    """True: ResNet v1 (He et al. 2016: a bottleneck downsamples in its first 1x1 conv, 3.9 GMACs at
    depth 50); False: v1.5 (torchvision, NVIDIA's "ResNet-50 v1.5": in the 3x3 conv, 4.1 GMACs)."""

    def __post_init__(self) -> None:
        self._check_common()

    def ops(self) -> list[Op]:
        kind, counts = RESNET_BLOCKS[self.depth]
        w = self.width
        stem = (self.in_channels, w, 3, 1, 1, False) if self.small else (self.in_channels, w, 7, 2, 3, False)
        ops: list[Op] = [Op("conv", "stem.conv", stem), Op("bn", "stem.bn", (w,)), Op("relu")]
        if not self.small:
            _pool_ops(self, ops, 3, 2, 1, "stem.pool")
        expansion = 1 if kind == "basic" else 4
        c_in = w
        for li, n in enumerate(counts):
            planes = w * 2**li
            for bi in range(n):
                stride = 2 if (li > 0 and bi == 0) else 1
                pre = f"layer{li + 1}.{bi}"
                c_out = planes * expansion
                ops.append(Op("copy", dst="id"))
                if kind == "basic":
                    ops += [Op("conv", f"{pre}.conv1", (c_in, planes, 3, stride, 1, False)), Op("bn", f"{pre}.bn1", (planes,)), Op("relu"),
                            Op("conv", f"{pre}.conv2", (planes, planes, 3, 1, 1, False)), Op("bn", f"{pre}.bn2", (planes,))]
                else:
                    s1, s3 = (stride, 1) if self.stride_in_1x1 else (1, stride)  # v1 (He et al.) vs v1.5 (torchvision)
                    ops += [Op("conv", f"{pre}.conv1", (c_in, planes, 1, s1, 0, False)), Op("bn", f"{pre}.bn1", (planes,)), Op("relu"),
                            Op("conv", f"{pre}.conv2", (planes, planes, 3, s3, 1, False)), Op("bn", f"{pre}.bn2", (planes,)), Op("relu"),
                            Op("conv", f"{pre}.conv3", (planes, c_out, 1, 1, 0, False)), Op("bn", f"{pre}.bn3", (c_out,))]
                if stride != 1 or c_in != c_out:
                    ops += [Op("conv", f"{pre}.down.conv", (c_in, c_out, 1, stride, 0, False), src="id", dst="id"),
                            Op("bn", f"{pre}.down.bn", (c_out,), src="id", dst="id")]
                ops += [Op("add", f"{pre}.add", ("id",)), Op("relu")]
                c_in = c_out
        ops += [Op("gap"), Op("linear", "fc", (c_in, self.num_classes, True))]
        return ops


@dataclass(frozen=True)
class ResNet18Spec(ResNetSpec):
    name: ClassVar[str] = "resnet18"
    depth: ClassVar[int] = 18


@dataclass(frozen=True)
class ResNet50Spec(ResNetSpec):
    name: ClassVar[str] = "resnet50"
    depth: ClassVar[int] = 50


#: figures the specs are tested against (torchvision / the papers), at 224x224, 1000 classes
PUBLISHED = {
    "alexnet": {"params": 61_100_840},
    "vgg16": {"params": 138_357_544, "macs": 15.47e9},
    "resnet18": {"params": 11_689_512, "macs": 1.82e9},
    "resnet50": {"params": 25_557_032, "macs": 4.11e9},
}

SPECS.update({"alexnet": AlexNetSpec, "vgg16": VGG16Spec, "resnet18": ResNet18Spec, "resnet50": ResNet50Spec})
