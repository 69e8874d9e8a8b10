"""The one error a model description raises: a bad model name or option (exit code 2).

It lives here, not in ``scaling``, because ``models`` imports nothing of the engine; ``scaling.errors``
re-exports it, so the CLI's ``except UsageError`` catches a bad ``--model-opt`` like any bad flag.
"""

from __future__ import annotations

import difflib
from typing import Iterable


class UsageError(ValueError):
    """Bad input: one line naming the bad value and what would be valid. Exit code 2."""

    exit_code = 2


def did_you_mean(value: str, choices: Iterable[str]) -> str:
    """" (did you mean 'x'?)" for the nearest valid name, or "": the one helper every bad name uses
    (flags, subcommands, backends, models, hardware ids). Spelling alone decides, case and the
    ``-``/``_`` difference ignored."""
    def norm(s: str) -> str:
        return s.lower().replace("_", "-")

    pool = {norm(c): c for c in choices}
    close = difflib.get_close_matches(norm(value), list(pool), n=1, cutoff=0.6)
    return f" (did you mean {pool[close[0]]!r}?)" if close else ""
