"""The ways a run ends badly, each with its own exit code (one table for every entry point).

Users script around podscale (sweeps, CI), so the failure class must be visible in the exit code:
1 = an exception in the user's own code (their traceback and the rank that raised it),
2 = the request was wrong (nothing ran, or the user's model and loss do not fit together),
3 = the run started and a rank died or hung, 4 = the loss became non-finite.
"""

from __future__ import annotations

from models.errors import UsageError, did_you_mean

__all__ = ["Diverged", "RunFailed", "UsageError", "UserCodeFailed", "EXIT_CODES", "did_you_mean"]


class RunFailed(RuntimeError):
    """A started run died, hung or timed out. Exit code 3."""

    exit_code = 3


class UserCodeFailed(RuntimeError):
    """The user's script raised: its traceback (their frames) and the rank. Exit code 1."""

    exit_code = 1


class Diverged(RuntimeError):
    """A non-finite loss: the step and rank are named. Exit code 4.

    ``step`` and the ``losses`` up to it travel with it, so the run's JSON can still say what
    happened (non-finite numbers there as null).
    """

    exit_code = 4

    def __init__(self, message: str, step: int | None = None, losses: list[float] | None = None) -> None:
        super().__init__(message)
        self.step = step
        self.losses = list(losses or [])


#: the exit codes of every podscale entry point (``--help`` and the README print this table)
EXIT_CODES = {0: "done", 1: "an exception in your code (its traceback and rank are shown)",
              2: "bad input (one line naming the bad value and what is valid)", 3: "a rank died or hung",
              4: "non-finite loss (the step is named)"}
