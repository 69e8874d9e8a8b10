"""Benchmark (not a test): measured vs predicted step time on this host, on-grid and off-grid.

    .venv/bin/python bench/predictor.py [--backends torch-ddp,jax-pmap,jax-sharded] [--devices 1,2,4,8]
        [--model mlp] [--per-device-batch 16] [--steps 30] [--full]
        [--calibrate-on 1,2,8] [--predict-at 4,16] [--off-grid-models "mlp:hidden=256;gpt-tiny"]
        [--skip-on-grid] [--skip-off-grid] [--repeats 1]
    .venv-xla/bin/python bench/predictor.py --backends torch-xla      # torch-xla from its own venv

Two figures (#16), each the median and max of |predicted / measured - 1|:

- **on-grid**: the calibration holds every N of ``--devices`` and the run is ``--model``: the
  prediction reads the terms measured at that very N;
- **off-grid**: the calibration is restricted to ``--calibrate-on`` (what ``podscale calibrate
  --devices 1,2,8`` writes: every N's terms are measured on their own, so dropping the other N's
  entries is that calibration), and predicts runs at ``--predict-at`` (none of them calibrated) of
  models the calibration never ran: MLPs of other widths, a small ResNet, gpt-tiny.

Targets on an idle 2-core host: on-grid median <= 10%; off-grid median <= 15%, max <= 35%.
Run it on an otherwise idle machine: other load inflates measurements unevenly. This one drifts by
itself: the same eight torch-ddp runs measured 20 minutes apart differed by a median of 16%, so
``--repeats R`` measures every run R times, in R interleaved passes over all of them, and compares
the median with the prediction.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from launchers.cmd_scale import parse_devices  # noqa: E402
from launchers.flags import parse_model_opts  # noqa: E402
from models.spec import get_spec  # noqa: E402
from scaling.backends import BACKENDS  # noqa: E402
from scaling.config import RunConfig  # noqa: E402
from scaling.errors import UsageError  # noqa: E402
from scaling.run import finish  # noqa: E402
from scaling.throughput import calibration, estimate, measure  # noqa: E402
from scaling.world import run_local  # noqa: E402

OFF_GRID_MODELS = ("mlp:hidden=256;mlp:hidden=1024;"
                   "resnet18:small=true,image_size=16,width=16,num_classes=10;gpt-tiny")
TARGETS = {"on-grid": "median <= 10%", "off-grid": "median <= 15%, max <= 35%"}


def parse_models(text: str) -> list[tuple[str, dict[str, Any]]]:
    """``name:k=v,k=v;name`` -> [(name, opts)]."""
    out = []
    for item in filter(None, (s.strip() for s in text.split(";"))):
        name, _, opts = item.partition(":")
        out.append((name, parse_model_opts([o for o in opts.split(",") if o])))
    return out


def label(model: str, opts: dict[str, Any]) -> str:
    return model + (" " + ",".join(f"{k}={v}" for k, v in opts.items()) if opts else "")


def measured_vs_predicted(backend: str, model: str, opts: dict[str, Any], n: int, per_device_batch: int, steps: int,
                          cal: dict[str, Any] | None) -> tuple[float, float | None]:
    """(measured step, predicted step) of one real run; ``cal`` None: the run's own prediction."""
    cfg = RunConfig(backend=backend, model=model, model_opts=opts, devices=n, global_batch=n * per_device_batch,
                    steps=steps, untimed_steps=max(2, steps // 5))
    r = finish(cfg, run_local(cfg))
    if cal is None:
        return r["step_time_s"], r["predicted_step_time_s"]
    wl = estimate.workload(get_spec(model, **opts))
    pred = estimate.predict_step(wl, "host-cpu", n, cfg.global_batch, cfg.dtype, backend, calibration=cal)
    return r["step_time_s"], pred.step_time_s


def summarise(c: Console, title: str, rows: list[tuple[str, ...]], errors: list[float]) -> None:
    t = Table(title=title)
    for col in ("backend", "model", "N", "measured", "predicted", "error"):
        t.add_column(col, justify="left" if col in ("backend", "model") else "right")
    for row in rows:
        t.add_row(*row)
    c.print(t)
    if errors:
        name = title.split(":")[0]
        c.print(f"{name} |error|: median {statistics.median(errors) * 100:.1f}%, max {max(errors) * 100:.1f}% "
                f"over {len(errors)} runs (target: {TARGETS[name]})")


def row(backend: str, model: str, n: int, meas: float, pred: float | None, errors: list[float]) -> tuple[str, ...]:
    err = pred / meas - 1 if pred else None
    if err is not None:
        errors.append(abs(err))
    return (backend, model, str(n), f"{meas * 1e3:.3g} ms", f"{pred * 1e3:.3g} ms" if pred else "n/a",
            f"{err * 100:+.1f}%" if err is not None else "n/a")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", default=None)
    ap.add_argument("--devices", default="1,2,4,8", help="on-grid: calibrated and measured at these N")
    ap.add_argument("--model", default="mlp")
    ap.add_argument("--per-device-batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--full", action="store_true", help="full (slower) calibration instead of --quick")
    ap.add_argument("--calibrate-on", default="1,2,8", help="off-grid: the calibration is restricted to these N")
    ap.add_argument("--predict-at", default="4,16", help="off-grid: measured and predicted at these N")
    ap.add_argument("--off-grid-models", default=OFF_GRID_MODELS, help="name:k=v,k=v;name ...")
    ap.add_argument("--skip-on-grid", action="store_true")
    ap.add_argument("--skip-off-grid", action="store_true")
    ap.add_argument("--repeats", type=int, default=1, help="interleaved passes; each run's measured step is their median")
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error(f"--repeats {args.repeats} must be a positive integer")
    lists = []
    for flag, text in (("--devices", args.devices), ("--calibrate-on", args.calibrate_on), ("--predict-at", args.predict_at)):
        try:  # the sweep's own parser: a bad list is one line naming it
            lists.append(parse_devices(text))
        except UsageError as e:
            ap.error(str(e).replace("--devices", flag, 1))
    on_ns, cal_ns, at_ns = lists
    if set(cal_ns) & set(at_ns):
        ap.error(f"--predict-at {args.predict_at} must not share an N with --calibrate-on {args.calibrate_on}: "
                 "those would be on-grid")
    models = parse_models(args.off_grid_models)
    for m, o in models:
        get_spec(m, **o)  # a bad model fails now, not after the calibration
    backends = args.backends.split(",") if args.backends else [
        b for b in calibration.FAMILIES if b in BACKENDS and importlib.util.find_spec(calibration.FAMILIES[b][1])]
    c = Console()
    need = sorted(set(([] if args.skip_on_grid else on_ns) + ([] if args.skip_off_grid else cal_ns)))
    cal = measure.ensure(backends, need, quick=not args.full, log=lambda s: c.print(f"[dim]calibrating: {s}[/dim]"))

    def passes(jobs: list[tuple[str, str, dict[str, Any], int]], cal_: dict[str, Any] | None, what: str
               ) -> list[tuple[float, float | None]]:
        """(median measured, predicted) per job, over ``--repeats`` interleaved passes."""
        seen: list[list[tuple[float, float | None]]] = [[] for _ in jobs]
        for k in range(args.repeats):
            for i, (b, m, o, n) in enumerate(jobs):
                c.print(f"[dim]{what} (pass {k + 1}/{args.repeats}): {b} N={n} {label(m, o)}[/dim]")
                seen[i].append(measured_vs_predicted(b, m, o, n, args.per_device_batch, args.steps, cal_))
        return [(statistics.median(x[0] for x in got), got[-1][1]) for got in seen]

    if not args.skip_on_grid:
        rows, errors = [], []
        jobs = [(b, args.model, {}, n) for b in backends for n in on_ns]
        for (b, m, _, n), (meas, pred) in zip(jobs, passes(jobs, None, "on-grid")):
            rows.append(row(b, m, n, meas, pred, errors))
        summarise(c, f"on-grid: calibrated at N = {args.devices}, {args.model}, {args.per_device_batch} samples per device",
                  rows, errors)

    if not args.skip_off_grid:
        sub = calibration.restricted(cal, cal_ns)
        rows, errors = [], []
        jobs = [(b, m, o, n) for b in backends for n in at_ns for m, o in models]
        for (b, m, o, n), (meas, pred) in zip(jobs, passes(jobs, sub, "off-grid")):
            rows.append(row(b, label(m, o), n, meas, pred, errors))
        summarise(c, f"off-grid: calibrated at N = {args.calibrate_on} on the reference mlp only, predicted at N = "
                     f"{args.predict_at}", rows, errors)
    return 0


if __name__ == "__main__":
    sys.exit(main())
