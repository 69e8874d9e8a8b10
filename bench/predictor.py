"""Benchmark (not a test): measured vs predicted step time on this host, after calibrating it in the
same run. Target: median |error| <= 5%, max <= 15%.

    .venv/bin/python bench/predictor.py [--backends torch-ddp,jax-pmap,jax-sharded] [--devices 1,2,4,8]
                                        [--model mlp] [--per-device-batch 16] [--steps 30] [--full]

Calibrates only what the cache lacks (PODSCALE_CACHE_DIR), then runs every (backend, N) through the
real launcher and prints each run's error = predicted / measured - 1, and the median and max |error|.
Run it on an otherwise idle machine: other load inflates measurements unevenly.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from scaling.world import run_local  # noqa: E402
from scaling.throughput import calibration, measure  # noqa: E402
from scaling.backends import BACKENDS  # noqa: E402
from scaling.config import RunConfig  # noqa: E402
from scaling.run import finish  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", default=None)
    ap.add_argument("--devices", default="1,2,4,8")
    ap.add_argument("--model", default="mlp")
    ap.add_argument("--per-device-batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--full", action="store_true", help="full (slower) calibration instead of --quick")
    args = ap.parse_args()
    counts = [int(x) for x in args.devices.split(",")]
    backends = args.backends.split(",") if args.backends else [
        b for b in calibration.FAMILIES if b in BACKENDS and importlib.util.find_spec(calibration.FAMILIES[b][1])]
    c = Console()
    measure.ensure(backends, counts, quick=not args.full, log=lambda s: c.print(f"[dim]calibrating: {s}[/dim]"))
    t = Table(title=f"predicted vs measured step time ({args.model}, {args.per_device_batch} samples per device)")
    for col in ("backend", "N", "measured", "predicted", "error"):
        t.add_column(col, justify="left" if col == "backend" else "right")
    errors = []
    for b in backends:
        for n in counts:
            cfg = RunConfig(backend=b, model=args.model, devices=n, global_batch=n * args.per_device_batch,
                            steps=args.steps, untimed_steps=max(2, args.steps // 5))
            r = finish(cfg, run_local(cfg))
            err = r["prediction_error"]
            if err is not None:
                errors.append(abs(err))
            t.add_row(b, str(n), f"{r['step_time_s'] * 1e3:.3g} ms",
                      f"{r['predicted_step_time_s'] * 1e3:.3g} ms" if r["predicted_step_time_s"] else "n/a",
                      f"{err * 100:+.1f}%" if err is not None else "n/a")
    c.print(t)
    if errors:
        c.print(f"|error|: median {statistics.median(errors) * 100:.1f}%, max {max(errors) * 100:.1f}% "
                f"over {len(errors)} runs (target: median <= 5%, max <= 15%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
