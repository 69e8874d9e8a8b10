"""What the overhead benchmarks share: podscale's own step time for a config, and the interleaved
pairs that compare it with a hand-written loop (one place, so both backends are measured alike)."""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent

#: (devices, d_in, hidden, d_out, global batch, steps, untimed steps)
Shape = tuple[int, int, int, int, int, int, int]


def podscale_step_time(backend: str, devices: int, d_in: int, h: int, d_out: int, batch: int, steps: int,
                       untimed: int) -> float:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "r.json"
        subprocess.run([sys.executable, "-m", "launchers.cli", "run", "--backend", backend, "--devices", str(devices),
                        "--global-batch", str(batch), "--steps", str(steps), "--untimed-steps", str(untimed),
                        "--model-opt", f"d_in={d_in}", "--model-opt", f"hidden={h}", "--model-opt", f"d_out={d_out}",
                        "--json", str(out), "--quiet"], cwd=ROOT, check=True, timeout=600)
        return json.loads(out.read_text())["step_time_s"]


def parse_args(doc: str | None) -> tuple[argparse.Namespace, Shape]:
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--global-batch", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=512)
    a = ap.parse_args()
    return a, (a.devices, 1000, a.hidden, 10, a.global_batch, a.steps, 20)


def compare(label: str, backend: str, handwritten: Callable[..., float], shape: Shape, repeats: int) -> float:
    """Interleaved pairs in ABBA order (whichever runs second in a pair measured slower on a busy
    host); prints each pair and the median ratio podscale ÷ hand-written. Target: <= 1.03."""
    ratios = []
    for i in range(repeats):
        if i % 2 == 0:
            ps, hw = podscale_step_time(backend, *shape), handwritten(*shape)
        else:
            hw, ps = handwritten(*shape), podscale_step_time(backend, *shape)
        ratios.append(ps / hw)
        print(f"pair {i + 1}: podscale {ps * 1e3:.3f} ms, hand-written {hw * 1e3:.3f} ms, ratio {ps / hw:.3f}", flush=True)
    med = statistics.median(ratios)
    print(f"{label}: median ratio {med:.3f} (min {min(ratios):.3f}, max {max(ratios):.3f}, "
          f"{repeats} interleaved pairs; target <= 1.03)")
    return med


def bootstrap_ci(ratios: list[float], level: float = 0.95, resamples: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the median ratio (the pairs resampled with replacement)."""
    import numpy as np

    r = np.asarray(ratios)
    rng = np.random.default_rng(seed)
    meds = np.median(r[rng.integers(0, len(r), size=(resamples, len(r)))], axis=1)
    lo, hi = np.quantile(meds, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def abba(label: str, ours: Callable[[], float], theirs: Callable[[], float], repeats: int,
         target: tuple[float, float] = (1.03, 1.05), names: tuple[str, str] = ("podscale", "hand-written")) -> tuple[float, float, float]:
    """``repeats`` interleaved pairs in ABBA order; prints each pair, the median ratio ours ÷ theirs
    and its bootstrap 95% interval, against a target (median, upper end of the interval)."""
    ratios = []
    for i in range(repeats):
        if i % 4 in (0, 3):
            a, b = ours(), theirs()
        else:
            b, a = theirs(), ours()
        ratios.append(a / b)
        print(f"pair {i + 1}: {names[0]} {a * 1e3:.3f} ms, {names[1]} {b * 1e3:.3f} ms, ratio {a / b:.3f}", flush=True)
    med = statistics.median(ratios)
    lo, hi = bootstrap_ci(ratios)
    ok = med <= target[0] and hi <= target[1]
    print(f"{label}: median ratio {med:.3f}, bootstrap 95% interval [{lo:.3f}, {hi:.3f}] over {repeats} ABBA pairs; "
          f"target median <= {target[0]} and upper end <= {target[1]}: {'met' if ok else 'NOT met'}")
    return med, lo, hi
