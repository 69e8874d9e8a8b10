"""The JAX training API (see ``scaling.train_jax`` for what each part does and why)."""

from scaling.train_jax import Loader, Session, fit, init, log, report, session

__all__ = ["Loader", "Session", "fit", "init", "log", "report", "session"]
