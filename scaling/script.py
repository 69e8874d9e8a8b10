"""Run a user's training script as ``__main__`` in one rank: ``podscale run train.py``.

The world is started exactly as for the zoo (``scaling.world``); each rank runs the script as
``torchrun`` would (``sys.argv`` = the script and its arguments, its directory first on
``sys.path``), and the training API inside it (``podscale.torch`` / ``podscale.jax``) reads the
rank, world and config that podscale set. Two things make a user's code safe to run here:

- **No shadowing.** podscale's packages have plain names (``models``, ``scaling``, ``launchers``). A
  user's own ``models.py`` beside the script must be *their* ``models``, and podscale must keep
  working: podscale's modules are imported before the script runs, and only the top-level entries
  the user's directory provides are taken out of ``sys.modules`` (podscale's own modules keep the
  references they already hold, and ``import scaling.x`` of a loaded submodule still resolves).
- **Failures by kind.** What a rank raises is written to ``error-<rank>.json`` in the run
  directory, so the launcher reports the root cause once, with the right exit code: the user's
  exception (their frames only, exit 1), bad input (exit 2), a non-finite loss (exit 4).
"""

from __future__ import annotations

import json
import math
import os
import runpy
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from scaling.config import RunConfig
from scaling.context import WorkerContext
from scaling.errors import Diverged, UsageError

ROOT = Path(__file__).resolve().parent.parent
#: podscale's top-level packages (models, scaling, launchers, podscale): names a user may also use
OWN_PACKAGES = tuple(sorted(p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()))


def run(cfg: RunConfig, ctx: WorkerContext) -> dict[str, Any] | None:
    """Run ``cfg.script`` in this rank; rank 0 returns the raw record of the script's ``fit``."""
    script = Path(cfg.script or "").resolve()
    if cfg.backend.startswith("jax"):
        from scaling import train_jax as api
    else:
        from scaling import train_torch as api  # type: ignore[no-redef]
    sys.argv = [str(script), *cfg.script_args]
    sys.path.insert(0, str(script.parent))
    unshadow(script.parent)
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as e:
        if e.code not in (None, 0):
            raise UserScriptExit(f"{script.name} called sys.exit({e.code!r})") from None
    api.shutdown()  # leave the process group together: a rank that exits first takes the others down
    s = api._SESSION
    if s is None or (s.rank == 0 and s.result is None):
        raise UsageError(f"{script.name} finished without calling {api.__name__.replace('scaling.train_', 'podscale.')}.fit: "
                         "nothing was trained or measured")
    if s.rank != 0:
        return None
    raw = dict(s.result or {})
    raw.update(s.extras)
    raw["scalars"] = {k: [[a, b] for a, b in v] for k, v in s.scalars.items()}  # logged after fit too
    raw["script"] = str(cfg.script)
    return raw


class UserScriptExit(Exception):
    """The script exited with a non-zero status of its own."""


def unshadow(user_dir: Path) -> list[str]:
    """Let the user's ``models``/``scaling``/``launchers`` beside their script be theirs."""
    freed = []
    for name in OWN_PACKAGES:
        if name == "podscale":
            continue  # the API the script imports: never the user's
        pkg = user_dir / name
        if not ((user_dir / f"{name}.py").is_file() or pkg.is_dir()):
            continue
        if pkg.resolve() == (ROOT / name).resolve():
            continue  # the script lives in podscale's own checkout: these are podscale's packages
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            rel = key.split(".")[1:]
            if not rel or (pkg.joinpath(*rel).with_suffix(".py").is_file() or pkg.joinpath(*rel).is_dir()):
                del sys.modules[key]
                freed.append(key)
    return freed


def user_traceback(exc: BaseException) -> str:
    """The traceback without podscale's and runpy's frames: what the user needs to see."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not _ours(f.filename)]
    lines = ["Traceback (most recent call last):\n", *traceback.format_list(frames), *traceback.format_exception_only(type(exc), exc)]
    return "".join(lines)


def _ours(filename: str) -> bool:
    p = Path(filename)
    if p.name == "runpy.py" or "<frozen" in filename:
        return True
    try:
        rel = p.resolve().relative_to(ROOT)
    except ValueError:
        return False
    return rel.parts[0] in OWN_PACKAGES


def write_error(run_dir: Path | None, rank: int, exc: BaseException, user_code: bool) -> int:
    """Record what rank ``rank`` raised for the launcher; returns the rank's exit code."""
    if isinstance(exc, UsageError):
        kind, code, message, tb = "usage", 2, str(exc), ""
    elif isinstance(exc, Diverged):
        kind, code, message, tb = "diverged", 4, str(exc), ""
    elif user_code:
        kind, code = "user", 1
        message = f"{type(exc).__name__}: {exc}".splitlines()[0] if not isinstance(exc, UserScriptExit) else str(exc)
        tb = "" if isinstance(exc, UserScriptExit) else user_traceback(exc)
    else:
        return 1
    if run_dir is not None:
        record = {"rank": rank, "kind": kind, "message": message, "traceback": tb, "time": time.time()}
        if isinstance(exc, Diverged):
            record.update(step=exc.step, losses=[v if math.isfinite(v) else None for v in map(float, exc.losses)])
        tmp = run_dir / f".error-{rank}.json.tmp"
        tmp.write_text(json.dumps(record))
        os.replace(tmp, run_dir / f"error-{rank}.json")
    return code


def read_errors(run_dir: Path) -> list[dict[str, Any]]:
    """The ranks' recorded errors, earliest first (the first to raise is the root cause)."""
    out = []
    for p in run_dir.glob("error-*.json"):
        try:
            out.append(json.loads(p.read_text()))
        except (OSError, ValueError):
            pass
    return sorted(out, key=lambda e: (e["time"], e["rank"]))
