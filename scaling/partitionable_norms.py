"""Batch and layer norm that XLA's SPMD partitioner can keep split along the batch.

torch_xla lowers ``nn.BatchNorm*d`` and ``nn.LayerNorm`` to XLA's ``batch-norm-training`` op (layer
norm as a batch norm of a [1, rows, features] view). The SPMD partitioner has no batch-sharded
rule for that op: it all-gathers the activations onto every device, runs the norm (and, for
batch norm, the rest of the network) on the whole global batch, and slices the result. The run
is still correct, but it is not data parallel. Measured on 4 XLA-CPU devices (torch_xla 2.9, 2
cores): ResNet-18's compiled step gathered its stem's output and took 4.6x one device's step for
4x the samples (624 ms; 350 with this module); gpt-tiny's gathered 2 MB before each of its 10
layer norms, forward and backward (401 ms; 262 with this module).

Written with plain reductions instead, the partitioner keeps every activation sharded: a layer
norm needs no collective at all, a batch norm only the ones its statistics ask for. Batch norm
keeps podscale's meaning of batch norm under data parallelism (README): statistics per device
(``groups`` = devices: a contiguous N-th of the global batch, as each DDP rank and jax-sharded's
``groups`` see it), or over the global batch with ``--sync-bn`` (``groups`` = 1); running
statistics averaged over the groups in one all-reduce a layer.

The swap changes the class of a module in place (a subclass of its own class): its parameters,
buffers, state-dict keys and ``isinstance`` checks stay as they were, so an optimizer built
before and a checkpoint written by another backend keep working. Only modules of exactly the
torch classes are swapped; a user's own norm subclass keeps its forward (and the run's compiled
step then reports what it gathers: ``gathered_bytes_per_step``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from scaling.errors import UsageError

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class _GroupedBatchNorm:
    """Training-mode statistics over each of ``groups`` contiguous slices of the batch."""

    groups: int = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn: Any = self
        c = x.shape[1]
        view = (1, c) + (1,) * (x.dim() - 2)
        xf = x.float()
        if bn.training or not bn.track_running_stats:
            g = int(bn.groups)
            if x.shape[0] % g:
                raise UsageError(f"batch norm over {g} devices got a batch of {x.shape[0]} samples; "
                                 f"use a multiple of {g} (or --sync-bn for statistics over the whole batch)")
            xg = xf.reshape(g, x.shape[0] // g, *x.shape[1:])
            dims = (1,) + tuple(range(3, xg.dim()))
            n = xg.numel() // (g * c)
            mean = xg.mean(dim=dims, keepdim=True)
            xc = xg - mean
            var = (xc * xc).mean(dim=dims, keepdim=True)
            y = (xc * torch.rsqrt(var + bn.eps)).reshape(x.shape)
            if bn.training and bn.track_running_stats:
                with torch.no_grad():
                    bn.num_batches_tracked.add_(1)
                    m = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
                    # one reduction over the groups for both statistics: one all-reduce a layer
                    stats = torch.cat([mean.reshape(g, c), var.reshape(g, c) * (n / max(n - 1, 1))], dim=1).mean(0)
                    bn.running_mean.mul_(1 - m).add_(stats[:c], alpha=m)
                    bn.running_var.mul_(1 - m).add_(stats[c:], alpha=m)
        else:
            y = (xf - bn.running_mean.view(view)) * torch.rsqrt(bn.running_var.view(view) + bn.eps)
        if bn.affine:
            y = y * bn.weight.view(view) + bn.bias.view(view)
        return y.to(x.dtype)


class _PlainLayerNorm:
    """Layer norm from its reductions over the normalized dimensions (no collective under SPMD)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ln: Any = self
        dims = tuple(range(-len(ln.normalized_shape), 0))
        mean = x.mean(dim=dims, keepdim=True)
        xc = x - mean
        y = xc * torch.rsqrt((xc * xc).mean(dim=dims, keepdim=True) + ln.eps)
        if ln.weight is not None:
            y = y * ln.weight
        if ln.bias is not None:
            y = y + ln.bias
        return y


_SUBCLASSES: dict[type, type] = {}


def _partitionable(cls: type, mixin: type) -> type:
    if cls not in _SUBCLASSES:
        _SUBCLASSES[cls] = type(f"Partitionable{cls.__name__}", (mixin, cls), {"__module__": __name__})
    return _SUBCLASSES[cls]


def make_partitionable(model: nn.Module, groups: int) -> int:
    """Swap ``model``'s batch and layer norms in place for their plain-reduction forms; batch norm's
    statistics over ``groups`` contiguous slices of the batch (devices; 1: the whole batch).
    Returns how many norms the model now holds in that form (a second call sets ``groups`` again)."""
    if groups < 1:
        raise UsageError(f"groups {groups}: give the device count (>= 1)")
    swapped = 0
    for m in model.modules():
        if type(m) in _BATCH_NORMS or isinstance(m, _GroupedBatchNorm):
            if not isinstance(m, _GroupedBatchNorm):
                m.__class__ = _partitionable(type(m), _GroupedBatchNorm)
            m.groups = groups  # type: ignore[assignment]
            swapped += 1
        elif type(m) is nn.LayerNorm or isinstance(m, _PlainLayerNorm):
            m.__class__ = _partitionable(nn.LayerNorm, _PlainLayerNorm)
            swapped += 1
    return swapped
