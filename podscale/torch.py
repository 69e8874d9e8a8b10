"""The torch training API (see ``scaling.train_torch`` for what each part does and why)."""

from scaling.train_torch import Loader, Session, fit, init, log, report, session

__all__ = ["Loader", "Session", "fit", "init", "log", "report", "session"]
