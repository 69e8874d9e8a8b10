"""Benchmark (not a test): gloo on CPU with its I/O thread at SCHED_IDLE vs gloo's default.

Gloo's TCP reader spins while a message waits for its buffer, and the thread that would post the
buffer waits behind it for a scheduler tick (``scaling/backends/gloo_io.py``). podscale puts that
reader at idle priority in every gloo rank; ``PODSCALE_GLOO_IO=normal`` keeps gloo's default. This
prints the step time of the same runs under both, in interleaved pairs (ABBA, ``pairs.abba``), and
per device count the median ratio podscale's ÷ gloo's default with its bootstrap interval
(target: no slower, median <= 1.03). Besides the median step it prints each run's mean, the
throughput a user sees, since gloo's stalls are a tail.

torch-ddp runs one process per device; ``--backend jax-pmap`` or ``jax-sharded`` runs one device in
each of N processes (``--processes N``), whose collectives are jaxlib's own gloo.

    .venv/bin/python bench/gloo_io.py [--backend torch-ddp] [--devices 2,4,8] [--hidden 64]
        [--per-device-batch 32] [--steps 40] [--repeats 4]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pairs import abba  # noqa: E402


def step_time(backend: str, devices: int, hidden: int, batch: int, steps: int, setting: str) -> float:
    """One ``podscale run``'s median step under ``PODSCALE_GLOO_IO=setting``; prints its mean too."""
    env = dict(os.environ, PODSCALE_GLOO_IO=setting)
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "r.json"
        subprocess.run([sys.executable, "-m", "launchers.cli", "run", "--backend", backend, "--devices", str(devices),
                        *(["--processes", str(devices)] if backend.startswith("jax") else []),
                        "--model-opt", "d_in=256", "--model-opt", f"hidden={hidden}",
                        "--global-batch", str(batch * devices), "--steps", str(steps), "--untimed-steps", "4",
                        "--probe-steps", "0", "--json", str(out), "--quiet"], cwd=ROOT, env=env, check=True,
                       timeout=600, stdout=subprocess.DEVNULL)
        r = json.loads(out.read_text())
        timed = r["step_times_s"][4:]
        print(f"  {setting:6s} N={devices}: median {r['step_time_s'] * 1e3:.2f} ms, mean {statistics.mean(timed) * 1e3:.2f} ms, "
              f"max {max(timed) * 1e3:.2f} ms", flush=True)
        return float(r["step_time_s"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="torch-ddp", choices=("torch-ddp", "jax-pmap", "jax-sharded"))
    ap.add_argument("--devices", default="2,4,8")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--per-device-batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=4)
    a = ap.parse_args()
    for n in (int(x) for x in a.devices.split(",")):

        def run(setting: str, n: int = n) -> float:
            return step_time(a.backend, n, a.hidden, a.per_device_batch, a.steps, setting)

        abba(f"{a.backend} · mlp 256-{a.hidden} · N={n}: gloo reader idle ÷ gloo's default", lambda: run("idle"),
             lambda: run("normal"), a.repeats, names=("idle", "default"))


if __name__ == "__main__":
    main()
