"""Backend registry: each backend is one module with the same small ``Backend`` protocol.

Modules are imported lazily by name, so that choosing ``torch-ddp`` never imports jax and the
catalog commands import no framework at all.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any, Protocol

from scaling.errors import UsageError, did_you_mean

if TYPE_CHECKING:
    from scaling.config import RunConfig

#: backend name -> (module, the Python package it needs, how a user installs it)
BACKENDS: dict[str, tuple[str, str, str]] = {
    "torch-ddp": ("scaling.backends.torch_ddp", "torch", "make venv (or pip install 'podscale[torch]')"),
    "jax-pmap": ("scaling.backends.jax_dp", "jax", "make venv (or pip install 'podscale[jax]')"),
    "jax-sharded": ("scaling.backends.jax_dp", "jax", "make venv (or pip install 'podscale[jax]')"),
    "torch-xla": ("scaling.backends.torch_xla", "torch_xla", "make venv-xla (or pip install 'podscale[xla]')"),
}


class Backend(Protocol):
    """What every backend module provides.

    ``launch`` starts the world for one run on this host (processes or emulated devices), trains,
    and returns the raw per-step record that ``scaling.run.finish`` turns into a RunResult.
    """

    def validate(self, cfg: RunConfig) -> None: ...

    def launch(self, cfg: RunConfig) -> dict[str, Any]: ...


def check_name(name: str) -> None:
    if name not in BACKENDS:
        raise UsageError(f"unknown backend {name!r}{did_you_mean(name, BACKENDS)}; valid: {', '.join(BACKENDS)}")


def is_installed(name: str) -> bool:
    check_name(name)
    return importlib.util.find_spec(BACKENDS[name][1]) is not None


def get_backend(name: str) -> Backend:
    check_name(name)
    module, package, how = BACKENDS[name]
    if importlib.util.find_spec(package) is None:
        raise UsageError(f"backend {name!r} needs the Python package {package!r}, not installed here; install it with: {how}")
    return importlib.import_module(module)  # type: ignore[return-value]
