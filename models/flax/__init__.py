"""Flax ``nnx`` modules built from the framework-free specs (``models.spec``).

Same contract as ``models.torch``: ``build(spec, params)`` returns a module whose parameters
equal the canonical numpy arrays, ``to_canonical(spec, module)`` goes back, so a JAX run and a
torch run of the same spec start from, and can be compared on, the same numbers.

The registry names modules rather than importing them, so that ``has_model`` (the JAX backends'
up-front check) answers without importing jax or flax.
"""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np

from models.spec import ModelSpec

#: model name -> module exposing ``build(spec, params, dtype)`` and ``to_canonical(spec, module)``
MODULES: dict[str, str] = {
    "mlp": "models.flax.mlp",
    **{name: "models.flax.cnn" for name in ("alexnet", "vgg16", "resnet18", "resnet50")},
    "gpt-tiny": "models.flax.gpt",
}


def has_model(name: str) -> bool:
    return name in MODULES


def _module(spec: ModelSpec) -> Any:
    if spec.name not in MODULES:
        raise KeyError(f"no flax module for model {spec.name!r}; flax models: {', '.join(MODULES)}")
    return importlib.import_module(MODULES[spec.name])


def build(spec: ModelSpec, params: dict[str, np.ndarray] | None = None, seed: int = 0, dtype: Any = None) -> Any:
    """An ``nnx.Module``; ``dtype`` is the compute dtype (bfloat16 = mixed precision, params float32)."""
    params = spec.init_params(seed) if params is None else params
    mod = _module(spec)
    return mod.build(spec, params) if dtype is None else mod.build(spec, params, dtype)


def to_canonical(spec: ModelSpec, module: Any) -> dict[str, np.ndarray]:
    return _module(spec).to_canonical(spec, module)


__all__ = ["MODULES", "build", "has_model", "to_canonical"]
