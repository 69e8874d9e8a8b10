"""Benchmark (not a test): a JAX CPU step with podscale's malloc settings vs glibc's defaults.

XLA-CPU allocates each program's temporaries afresh for every execution. Past glibc's mmap ceiling
(32 MiB) that is an mmap per step whose every page faults in anew, so a model whose step holds
more than 32 MiB of temporaries pays for its memory twice. podscale starts JAX CPU processes with
``GLIBC_TUNABLES`` set (``scaling/backends/jax_env.py``: ``MALLOC_TUNABLES``) so the heap keeps
those pages; this prints the step time of the same runs with and without, in interleaved pairs
(ABBA, ``pairs.abba``), and per config the median ratio podscale's ÷ glibc's defaults with its
bootstrap interval (target: no slower, median <= 1.03).

    .venv/bin/python bench/allocator.py [--configs "jax-pmap:1,jax-sharded:4"] [--model gpt-tiny]
        [--per-device-batch 16] [--steps 20] [--repeats 4]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pairs import abba  # noqa: E402


def step_time(backend: str, devices: int, model: str, batch: int, steps: int, tunables: str | None) -> float:
    """One ``podscale run``'s median step; ``tunables``: GLIBC_TUNABLES as the user's own, which
    podscale leaves alone ("": glibc's defaults); None: podscale's choice."""
    env = dict(os.environ)
    env.pop("GLIBC_TUNABLES", None)
    if tunables is not None:
        env["GLIBC_TUNABLES"] = tunables
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "r.json"
        subprocess.run([sys.executable, "-m", "launchers.cli", "run", "--backend", backend, "--devices", str(devices),
                        "--model", model, "--global-batch", str(batch * devices), "--steps", str(steps),
                        "--json", str(out), "--quiet"], cwd=ROOT, env=env, check=True, timeout=600,
                       stdout=subprocess.DEVNULL)
        return float(json.loads(out.read_text())["step_time_s"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="jax-pmap:1,jax-sharded:4,jax-pmap:4")
    ap.add_argument("--model", default="gpt-tiny")
    ap.add_argument("--per-device-batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=4)
    a = ap.parse_args()
    for item in a.configs.split(","):
        backend, _, n = item.partition(":")

        def run(tunables: str | None, backend: str = backend, n: int = int(n)) -> float:
            return step_time(backend, n, a.model, a.per_device_batch, a.steps, tunables)

        abba(f"{backend} · {a.model} · N={n}: podscale's malloc ÷ glibc's defaults", lambda: run(None), lambda: run(""),
             a.repeats, names=("podscale's", "glibc defaults"))

if __name__ == "__main__":
    main()
