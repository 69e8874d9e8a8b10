"""Output paths, checked before any work starts.

A run that trains for an hour and then cannot write its JSON has lost the hour: every output a
command will write is probed here first (by creating and removing a file where it will go, which
is the only check that is true as root, on read-only mounts and in /proc alike). Nothing is left
behind: a folder that does not exist yet is not created by the check.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from scaling.errors import UsageError


def _probe(flag: str, path: str | os.PathLike[str], folder: Path) -> None:
    """Can a file be created in ``folder``, or in its nearest existing ancestor if it is missing?"""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{flag} {str(path)!r}: {str(existing)!r} is a file, not a folder; choose another path")
    try:
        fd, name = tempfile.mkstemp(dir=existing, prefix=".podscale-probe-")
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise UsageError(f"{flag} {str(path)!r}: cannot write in {str(existing)!r} ({e.strerror or e}); "
                         f"choose a writable path") from None


def writable_file(flag: str, path: str | os.PathLike[str]) -> None:
    """``path`` can be written as a file (it is not a folder and its folder is writable)."""
    p = Path(path)
    if str(path) == "" or p.is_dir():
        raise UsageError(f"{flag} {str(path)!r} is a folder; give a file path, e.g. {str(p / 'out.json')!r}")
    if p.exists() and not os.access(p, os.W_OK):
        raise UsageError(f"{flag} {str(path)!r}: the file exists and is not writable; choose another path")
    _probe(flag, path, p.parent)


def writable_dir(flag: str, path: str | os.PathLike[str]) -> None:
    """``path`` is, or can be created as, a writable folder."""
    p = Path(path)
    if str(path) == "":
        raise UsageError(f"{flag} '': give a folder, e.g. 'out'")
    if p.exists() and not p.is_dir():
        raise UsageError(f"{flag} {str(path)!r} is a file; give a folder")
    _probe(flag, path, p)
