"""Sharded data parallelism on torch-ddp: PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``).

The same SGD step as DDP (each rank's local mean loss, gradients averaged over the ranks), with the
state split N ways: parameters, gradients and optimizer state live as DTensor shards (dim 0), and
FSDP all-gathers a block's parameters before its forward (and again before its backward) and
reduce-scatters its gradients. Modes (``RunConfig.sharding``):

- ``full``: ``reshard_after_forward=True``, ZeRO-3 style: nothing is held whole between uses;
- ``optimizer``: ``reshard_after_forward=False``: a block's parameters stay gathered from its
  forward to its backward (one all-gather per step, not two), gradients and optimizer state are
  sharded. Between steps the parameters are sharded too (FSDP2 has no replicated-parameter mode;
  ZeRO-2 proper keeps them whole), so its memory is ``full``'s at rest plus the gathered
  parameters during the step.

Sharding units follow ``models.spec.sharding_unit`` over the module paths (a numbered block such
as ``blocks.3`` or the zoo CNN's ``layers.layer2_1_*``, else one layer), each one FSDP2 group, then
the root for what is left (``pos_emb``): one all-gather per unit, prefetched by FSDP while the
previous unit computes, the same units the throughput model prices.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from scaling.errors import UsageError


def shard(model: nn.Module, optimizer: torch.optim.Optimizer, mode: str) -> nn.Module:
    """Shard ``model`` in place over the default process group and point ``optimizer`` at the
    shards; returns a parameter-less twin (on the meta device) that ``gathered`` fills later."""
    from torch.distributed.fsdp import fully_shard

    if optimizer.state:
        raise UsageError("--sharding needs an optimizer that has not stepped yet: its state would not match the shards")
    twin = copy.deepcopy(model).to("meta")
    before = list(model.parameters())
    reshard = mode == "full"
    for group in units(model):
        fully_shard(group if len(group) > 1 else group[0], reshard_after_forward=reshard)
    fully_shard(model, reshard_after_forward=reshard)
    after = list(model.parameters())
    if len(after) != len(before):
        raise UsageError(f"sharding changed the model's parameter count ({len(before)} -> {len(after)})")
    moved = {id(a): b for a, b in zip(before, after)}
    for group in optimizer.param_groups:
        group["params"] = [moved.get(id(p), p) for p in group["params"]]
    return twin


def units(model: nn.Module) -> list[list[nn.Module]]:
    """The modules that hold parameters of their own, grouped by ``sharding_unit`` of their path, in
    module order; a module inside another of the same unit is left to it (FSDP2 manages a module's
    whole subtree). The root's own parameters stay with the root."""
    from models.spec import sharding_unit

    groups: dict[str, list[tuple[str, nn.Module]]] = {}
    for name, mod in model.named_modules():
        if not name or not any(True for _ in mod.parameters(recurse=False)):
            continue
        members = groups.setdefault(sharding_unit(name), [])
        if not any(name.startswith(f"{m}.") for m, _ in members):
            members.append((name, mod))
    mods = dict(model.named_modules())
    # a unit that is a module of its own (``blocks.3``) is wrapped as that module, else as a group
    out = [[mods[key]] if key in mods else [m for _, m in g] for key, g in groups.items()]
    # a unit nested in another unit's module is wrapped first, so the outer one leaves its parameters alone
    depth = {id(m): n.count(".") for n, m in model.named_modules()}
    return sorted(out, key=lambda g: -min(depth[id(m)] for m in g))


def gathered(model: nn.Module, twin: nn.Module) -> nn.Module:
    """The whole model, on every rank (a collective): the twin filled with the full state."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    twin.to_empty(device="cpu")
    twin.load_state_dict({k: v.detach().cpu() for k, v in full.items()})
    return twin


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """Model and optimizer state as whole tensors keyed by parameter name (a collective; every
    rank gets them): what a checkpoint holds, so a resume may run on another N."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd, osd = get_state_dict(model, optimizer, options=opts)
    return ({k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in msd.items()}, osd)


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, msd: dict[str, Any], osd: dict[str, Any]) -> None:
    """``full_state``'s output into the sharded model and optimizer, resharded to this run's N."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(model, optimizer, model_state_dict=msd, optim_state_dict=osd,
                   options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes this rank holds of parameters, gradients and optimizer state (its local shards, or
    the whole tensors when not sharded), counted from the live tensors."""
    params = sum(_local(p).numel() * _local(p).element_size() for p in model.parameters())
    grads = sum(_local(p.grad).numel() * _local(p.grad).element_size() for p in model.parameters() if p.grad is not None)
    opt = 0
    for st in optimizer.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor) and v.dim() > 0:  # step counters are scalars
                opt += _local(v).numel() * _local(v).element_size()
    return {"params_bytes": int(params), "grads_bytes": int(grads), "optimizer_bytes": int(opt)}


def comm_bytes(model: nn.Module, mode: str) -> float:
    """Message bytes per step (the whole tensors each collective assembles or reduces, as DDP's
    bucket bytes count them): all-gathers of the parameters (forward, and again for backward in
    ``full``) plus the reduce-scatter of the gradients."""
    whole = sum(p.numel() * p.element_size() for p in model.parameters())  # DTensor: the global shape
    gathers = 2 if mode == "full" else 1
    return float(whole * (gathers + 1))


def largest_divisible_dim(shape: tuple[int, ...], n: int) -> int | None:
    """The dimension ``--sharding`` splits over N devices: the largest divisible by N (the first of
    equals); None when none divides (the tensor stays replicated)."""
    dims = [i for i, d in enumerate(shape) if d >= n and d % n == 0]
    return max(dims, key=lambda j: (shape[j], -j)) if dims and n > 1 else None


def mark_xla(tensors: Any, mesh: Any, n: int) -> int:
    """torch-xla SPMD: annotate each tensor sharded on its largest divisible dimension over the
    ``data`` axis (the FSDP-via-SPMD pattern: XLA inserts the gathers); returns how many it split."""
    import torch_xla.distributed.spmd as xs

    count = 0
    for t in tensors:
        d = largest_divisible_dim(tuple(t.shape), n)
        if d is None:
            continue
        xs.mark_sharding(t, mesh, tuple("data" if i == d else None for i in range(t.dim())))
        count += 1
    return count


def replicate_xla(tensors: Any, mesh: Any) -> None:
    """torch-xla SPMD, ``optimizer`` mode: keep the parameters whole on every device (XLA would
    otherwise propagate the optimizer state's sharding into the updated parameters)."""
    import torch_xla.distributed.spmd as xs

    for t in tensors:
        xs.mark_sharding(t, mesh, (None,) * t.dim())


def xla_device_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[dict[str, int]]:
    """torch-xla SPMD: bytes each device holds of parameters and optimizer state, from each tensor's
    local shards (a replicated tensor has a whole copy on every device)."""
    from torch_xla.distributed.spmd import XLAShardedTensor

    per: dict[str, dict[str, int]] = {}

    def add(t: torch.Tensor, key: str) -> None:
        for sh in XLAShardedTensor(t).local_shards:
            d = per.setdefault(str(sh.shard_device), {"params_bytes": 0, "optimizer_bytes": 0})
            d[key] += int(sh.data.numel() * sh.data.element_size())

    for p in model.parameters():
        add(p.data, "params_bytes")
    for st in optimizer.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                add(v, "optimizer_bytes")
    return [per[k] for k in sorted(per)]


class no_grad_sync:
    """The step without the gradient reduce-scatter (the breakdown's compute probe), as DDP's
    ``no_sync`` is for DDP."""

    def __init__(self, model: Any):
        self.model = model

    def __enter__(self) -> None:
        self.model.set_requires_gradient_sync(False)

    def __exit__(self, *exc: object) -> None:
        self.model.set_requires_gradient_sync(True)
