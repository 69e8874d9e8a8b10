"""PyTorch modules built from the framework-free specs (``models.spec``).

``build(spec, params)`` returns a module whose parameters equal the canonical numpy arrays;
``to_canonical(spec, module)`` goes back, so runs can be compared across frameworks.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn

from models.spec import ModelSpec
from models.torch.mlp import Sigmoid, TwoLayerNet, build_mlp, mlp_to_canonical
from models.torch.cnn import build_cnn, cnn_to_canonical
from models.torch.gpt import build_gpt, gpt_to_canonical

#: model name -> (builder(spec, params) -> module, module -> canonical numpy params)
BUILDERS: dict[str, tuple[Callable[[ModelSpec, dict[str, np.ndarray]], nn.Module], Callable[[ModelSpec, nn.Module], dict[str, np.ndarray]]]] = {
    "mlp": (build_mlp, mlp_to_canonical),
    **{name: (build_cnn, cnn_to_canonical) for name in ("alexnet", "vgg16", "resnet18", "resnet50")},
    "gpt-tiny": (build_gpt, gpt_to_canonical),
}


def build(spec: ModelSpec, params: dict[str, np.ndarray] | None = None, seed: int = 0) -> nn.Module:
    params = spec.init_params(seed) if params is None else params
    return BUILDERS[spec.name][0](spec, params)


def to_canonical(spec: ModelSpec, module: nn.Module) -> dict[str, np.ndarray]:
    module = getattr(module, "module", module)  # unwrap DDP
    module = getattr(module, "_orig_mod", module)  # unwrap torch.compile
    return BUILDERS[spec.name][1](spec, module)


__all__ = ["BUILDERS", "Sigmoid", "TwoLayerNet", "build", "to_canonical"]
_ = torch  # re-exported for builders that need the framework handle
