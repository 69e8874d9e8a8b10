"""AlexNet, VGG-16, ResNet-18/50 in torch: an interpreter of the spec's op list (``models.cnn_spec``).

Interpreting the same op list as the Flax module and the FLOP/parameter counts keeps all three in
lock-step. Layouts: canonical conv weights are HWIO, torch wants OIHW; canonical linear (in, out),
torch (out, in): the builder transposes, ``cnn_to_canonical`` transposes back.

Batch norm under data parallelism (see docs/models.md):
- default: per-device statistics (plain ``nn.BatchNorm2d`` inside DDP, ``broadcast_buffers=False``);
  each replica's running statistics drift apart and ``average_running_stats`` averages them at the
  end (running statistics are linear in the batch statistics, so averaging once at the end equals
  averaging every step).
- ``sync_bn``: cross-replica statistics. CUDA: ``nn.SyncBatchNorm``. CPU (gloo), which
  ``nn.SyncBatchNorm`` refuses: ``SyncBatchNorm2d`` below, built on the differentiable
  all-reduce ``_AllReduceSum`` (three small collectives forward, two backward).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from models.cnn_spec import BN_EPS, BN_MOMENTUM, CNNSpec
from models.spec import ModelSpec


def _key(name: str) -> str:
    return name.replace(".", "_")


class CNN(nn.Module):
    def __init__(self, spec: CNNSpec):
        super().__init__()
        self.program = spec.ops()
        self.layers = nn.ModuleDict()
        for op in self.program:
            if op.kind == "conv":
                ci, co, k, s, p, bias = op.args
                self.layers[_key(op.name)] = nn.Conv2d(ci, co, k, stride=s, padding=p, bias=bias)
            elif op.kind == "bn":
                self.layers[_key(op.name)] = nn.BatchNorm2d(op.args[0], eps=BN_EPS, momentum=BN_MOMENTUM)
            elif op.kind == "linear":
                self.layers[_key(op.name)] = nn.Linear(op.args[0], op.args[1], bias=op.args[2])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        regs = {"h": x}
        for op in self.program:
            a = regs[op.src]
            if op.kind in ("conv", "bn", "linear"):
                a = self.layers[_key(op.name)](a)
            elif op.kind == "relu":
                a = F.relu(a)
            elif op.kind == "maxpool":
                a = F.max_pool2d(a, op.args[0], op.args[1], op.args[2])
            elif op.kind == "gap":
                a = a.mean(dim=(2, 3))
            elif op.kind == "flatten":
                a = a.flatten(1)
            elif op.kind == "add":
                a = a + regs[op.args[0]]
            regs[op.dst] = a
        return regs["h"]


def build_cnn(spec: ModelSpec, params: dict[str, np.ndarray]) -> nn.Module:
    assert isinstance(spec, CNNSpec)
    m = CNN(spec)
    state = {**spec.init_state(), **{k: v for k, v in params.items() if k in spec.state_shapes()}}
    t = torch.from_numpy
    with torch.no_grad():
        for op in m.program:
            if op.kind not in ("conv", "bn", "linear"):
                continue
            layer = m.layers[_key(op.name)]
            if op.kind == "conv":
                layer.weight.copy_(t(np.ascontiguousarray(params[f"{op.name}.w"].transpose(3, 2, 0, 1))))
                if layer.bias is not None:
                    layer.bias.copy_(t(params[f"{op.name}.b"]))
            elif op.kind == "linear":
                layer.weight.copy_(t(np.ascontiguousarray(params[f"{op.name}.w"].T)))
                if layer.bias is not None:
                    layer.bias.copy_(t(params[f"{op.name}.b"]))
            else:
                layer.weight.copy_(t(params[f"{op.name}.scale"]))
                layer.bias.copy_(t(params[f"{op.name}.bias"]))
                layer.running_mean.copy_(t(state[f"{op.name}.mean"]))
                layer.running_var.copy_(t(state[f"{op.name}.var"]))
    return m


def cnn_to_canonical(spec: ModelSpec, m: nn.Module) -> dict[str, np.ndarray]:
    """Parameters and batch-norm running statistics, by canonical name and layout."""
    assert isinstance(spec, CNNSpec) and isinstance(m, CNN)
    out: dict[str, np.ndarray] = {}

    def n(x: torch.Tensor) -> np.ndarray:
        return x.detach().cpu().float().numpy()

    for op in m.program:
        if op.kind not in ("conv", "bn", "linear"):
            continue
        layer = m.layers[_key(op.name)]
        if op.kind == "conv":
            out[f"{op.name}.w"] = n(layer.weight).transpose(2, 3, 1, 0).copy()
            if layer.bias is not None:
                out[f"{op.name}.b"] = n(layer.bias).copy()
        elif op.kind == "linear":
            out[f"{op.name}.w"] = n(layer.weight).T.copy()
            if layer.bias is not None:
                out[f"{op.name}.b"] = n(layer.bias).copy()
        else:
            out[f"{op.name}.scale"] = n(layer.weight).copy()
            out[f"{op.name}.bias"] = n(layer.bias).copy()
            out[f"{op.name}.mean"] = n(layer.running_mean).copy()
            out[f"{op.name}.var"] = n(layer.running_var).copy()
    return out


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; its gradient is the sum over ranks of the incoming gradients (each rank's
    loss depends on every rank's statistics). DDP then averages, which gives the global mean's
    gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        y = x.clone()
        dist.all_reduce(y)
        return y

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        g = g.contiguous().clone()
        dist.all_reduce(g)
        return g


class SyncBatchNorm2d(nn.BatchNorm2d):
    """Batch norm over the batch of every rank: global mean, then global biased variance (two passes,
    as ``F.batch_norm`` computes them), gradients flowing back through the all-reduces."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        all_reduce = _AllReduceSum.apply
        c = x.shape[1]
        xf = x.float()
        count = torch.tensor(float(x.numel() // c), device=x.device)
        n = all_reduce(count)  # sample counts (no gradient flows here)
        mean = all_reduce(xf.sum(dim=(0, 2, 3))) / n
        xc = xf - mean.view(1, c, 1, 1)
        var = all_reduce((xc * xc).sum(dim=(0, 2, 3))) / n
        with torch.no_grad():
            m = self.momentum if self.momentum is not None else 0.1
            self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
            self.running_var.mul_(1 - m).add_(var.detach() * (n / (n - 1)), alpha=m)
            self.num_batches_tracked.add_(1)
        y = xc * torch.rsqrt(var + self.eps).view(1, c, 1, 1)
        return (y * self.weight.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1)).to(x.dtype)


def convert_sync_bn(module: nn.Module) -> nn.Module:
    """Swap every BatchNorm2d for a cross-replica one (native on CUDA, ``SyncBatchNorm2d`` on CPU)."""
    if torch.cuda.is_available():
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in list(module.named_children()):
        if type(child) is nn.BatchNorm2d:
            new = SyncBatchNorm2d(child.num_features, eps=child.eps, momentum=child.momentum)
            new.load_state_dict(child.state_dict())
            new.weight, new.bias = child.weight, child.bias  # same Parameters: an optimizer built before keeps working
            setattr(module, name, new)
        else:
            convert_sync_bn(child)
    return module


def has_batch_norm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


@torch.no_grad()
def average_running_stats(module: nn.Module) -> None:
    """Average batch-norm running statistics over the ranks (identical already under sync BN)."""
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if world == 1:
        return
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            flat = torch.cat([m.running_mean, m.running_var])
            dist.all_reduce(flat)
            flat /= world
            c = m.running_mean.numel()
            m.running_mean.copy_(flat[:c])
            m.running_var.copy_(flat[c:])
