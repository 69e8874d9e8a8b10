"""Pieces every torch backend shares (torch-ddp, torch-xla, Ray Train): model, optimizer, loss.

Kept in one place so "the same config" builds the same optimizer and the same loss on every
torch path; the reference loops in the tests are written independently on purpose.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from models.spec import ModelSpec, get_spec
from scaling.config import RunConfig


def make_optimizer(cfg: RunConfig, params: Any) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)
    return torch.optim.SGD(params, lr=cfg.lr)


def local_loss(spec: ModelSpec, out: torch.Tensor, y: torch.Tensor, reduction: str) -> torch.Tensor:
    """The loss on one shard, with the reduction of the config (squared error or cross-entropy)."""
    out = out.float()
    if spec.task == "classification":
        # sequence models (gpt-tiny) classify every position: the leading axes are flattened
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction=reduction)
    return F.mse_loss(out, y, reduction=reduction)


def backward_scale(reduction: str, world: int) -> float:
    """DDP averages gradients over ranks. For ``mean`` the local-mean losses average to the global
    mean, so no scaling; for ``sum`` the global loss is the sum of local sums, so each rank's loss
    is scaled by ``world`` before the average (exact: world is a power of two or small integer)."""
    return float(world) if reduction == "sum" else 1.0


def zoo_loss(spec: ModelSpec, cfg: RunConfig, world: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The zoo's ``loss_fn(outputs, targets)`` for ``fit`` on a rank of ``world``: the config's loss on
    the local batch, scaled so that the ranks' gradient average is the global loss's gradient."""
    scale = backward_scale(cfg.loss_reduction, world)

    def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = local_loss(spec, out, y, cfg.loss_reduction)
        return loss * scale if scale != 1.0 else loss

    return loss_fn


def zoo_batches(data: Any, global_batch: int) -> Callable[[int], tuple[np.ndarray, np.ndarray]]:
    """step -> the zoo's global batch, by ``scaling.data``'s rule: samples (step * B + i) mod n."""

    def batch(step: int) -> tuple[np.ndarray, np.ndarray]:
        idx = data.indices(step, global_batch)
        return data.x[idx], data.y[idx]

    return batch


def spec_of(cfg: RunConfig) -> ModelSpec:
    return get_spec(cfg.model, **cfg.model_opts)
