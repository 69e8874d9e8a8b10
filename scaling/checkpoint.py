"""Atomic checkpoints: a crash at any instant leaves either the old or the new file, never half.

Written to a temp file in the same directory, fsynced, then ``os.replace``d into its final name
(atomic on POSIX), and the directory fsynced so the rename itself survives a power cut. The
payload is whatever the framework's own serializer writes (``torch.save``; numpy ``.npz`` for JAX
pytrees); loading torch files always uses ``weights_only=True``.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable

PATTERN = re.compile(r"^ckpt-(\d{8})\.(pt|npz)$")


def path_for(directory: str | Path, step: int, ext: str) -> Path:
    return Path(directory) / f"ckpt-{step:08d}.{ext}"


def write_atomic(path: str | Path, write: Callable[[Any], None]) -> Path:
    """Call ``write(fileobj)`` into a temp file, then atomically move it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return path


def latest(directory: str | Path, ext: str) -> tuple[int, Path] | None:
    """The newest complete checkpoint (temp files never match the pattern)."""
    d = Path(directory)
    if not d.is_dir():
        return None
    found = []
    for p in d.iterdir():
        m = PATTERN.match(p.name)
        if m and m.group(2) == ext:
            found.append((int(m.group(1)), p))
    return max(found) if found else None


def prune(directory: str | Path, ext: str, keep: int = 2) -> None:
    d = Path(directory)
    found = sorted((int(m.group(1)), p) for p in d.iterdir() if (m := PATTERN.match(p.name)) and m.group(2) == ext)
    for _, p in found[:-keep]:
        p.unlink(missing_ok=True)


def save_torch(directory: str | Path, step: int, state: dict[str, Any]) -> Path:
    import torch

    p = write_atomic(path_for(directory, step, "pt"), lambda f: torch.save(state, f))
    prune(directory, "pt")
    return p


def load_torch(path: str | Path) -> dict[str, Any]:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)
