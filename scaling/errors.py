"""The two ways a run ends badly, each with its own exit code.

Users script around podscale (sweeps, CI), so the failure class must be visible in the exit code:
2 = the request was wrong (nothing ran), 3 = the run started and died or hung.
"""

from __future__ import annotations


class UsageError(ValueError):
    """Bad input: one line naming the bad value and what would be valid. Exit code 2."""

    exit_code = 2


class RunFailed(RuntimeError):
    """A started run died, hung or timed out. Exit code 3."""

    exit_code = 3
