"""podscale's engine: run configs, backends, the throughput meter and model, reporting.

Framework imports (torch, jax, torch_xla) stay inside the backend modules that need them, so that
``import scaling`` and the catalog commands start without loading any framework.
"""

__version__ = "0.1.0"
