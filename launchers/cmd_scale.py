"""``podscale scale``: the scaling sweep — every backend × device count, measured beside predicted.

Each configuration is a fresh ``podscale run`` process (device counts are fixed when a framework
initialises, and a crash in one run must not take the sweep down). torch-xla runs in its own
environment (``.venv-xla``), found next to the repository or named with ``--xla-python``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from launchers.capacity import check_host_capacity
from scaling.throughput import host
from scaling.backends import BACKENDS, check_name, is_installed
from scaling.errors import RunFailed, UsageError
from scaling.meter import format_flops
from scaling import paths
from scaling.report import mfu_text
from scaling.run import write_json
from scaling.sweep import host_ceiling, plot, summarize

ROOT = Path(__file__).resolve().parent.parent


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("scale", help="scaling sweep: backends × device counts, measured vs predicted")
    p.add_argument("--backends", default=None, help="comma list (default: every installed backend)")
    p.add_argument("--model", default="mlp")
    p.add_argument("--model-opt", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--devices", default="1,2,4,8", help="increasing comma list of device counts (default 1,2,4,8)")
    p.add_argument("--mode", choices=("weak", "strong"), default="weak",
                   help="weak: fixed per-device batch; strong: fixed global batch")
    p.add_argument("--per-device-batch", type=int, default=None, help="weak scaling batch per device (default 64)")
    p.add_argument("--global-batch", type=int, default=None, help="strong scaling global batch (default 512)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--untimed-steps", type=int, default=5)
    p.add_argument("--probe-steps", type=int, default=2, dest="probe_steps",
                   help="rounds of breakdown probes after each run (default 2: medians of 6 runs of each part; 0 = none)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--optimizer", choices=("sgd", "adam"), default="adam")
    p.add_argument("--sharding", choices=("none", "optimizer", "full"), default="none",
                   help="shard gradients + optimizer state (optimizer) or everything (full) too; torch-ddp only so far")
    p.add_argument("--logdir", default="runs/scale", help="one TensorBoard run per configuration under here")
    p.add_argument("--out", default="out/scale", help="scale.json and scale.png go here")
    p.add_argument("--xla-python", default=None, help="python of the torch-xla environment (default: .venv-xla)")
    p.add_argument("--no-calibrate", action="store_true", help="do not calibrate this host first (no predictions if none)")
    p.add_argument("--step-timeout", type=float, default=60.0)
    p.add_argument("--repeats", type=int, default=1,
                   help="passes over every configuration, a run each; the run with the median step time is reported "
                        "(every run's step time rides along): on a shared host one run's median step varies run to run")
    p.set_defaults(func=main)


def find_xla_python(explicit: str | None) -> str | None:
    if explicit:
        if not os.access(explicit, os.X_OK):
            raise UsageError(f"--xla-python {explicit!r} is not an executable python")
        return explicit
    for base in (ROOT, Path.cwd()):
        cand = base / ".venv-xla" / "bin" / "python"
        if cand.exists():
            return str(cand)
    return None


def parse_devices(text: str) -> list[int]:
    try:
        devs = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--devices {text!r}: expected an increasing comma list of positive integers, e.g. 1,2,4,8") from None
    if not devs:
        raise UsageError(f"--devices {text!r} is empty; give an increasing comma list, e.g. 1,2,4,8")
    if devs[0] < 1 or any(b <= a for a, b in zip(devs, devs[1:])):
        raise UsageError(f"--devices {text!r} must be positive and strictly increasing, e.g. 1,2,4,8")
    return devs


def choose_backends(text: str | None, xla_python: str | None) -> tuple[list[str], list[str]]:
    """The backends to sweep, and notes on installed-but-missing ones."""
    notes = []
    if text:
        names = [b.strip() for b in text.split(",") if b.strip()]
        for b in names:
            check_name(b)
            if b == "torch-xla":
                if xla_python is None and not is_installed(b):
                    raise UsageError("backend 'torch-xla' is not installed: build its environment with `make venv-xla` "
                                     "(or pass --xla-python PATH, or pip install 'podscale[xla]')")
            elif not is_installed(b):
                raise UsageError(f"backend {b!r} is not installed here; install it with: {BACKENDS[b][2]}")
        return names, notes
    names = [b for b in BACKENDS if b != "torch-xla" and is_installed(b)]
    if xla_python or is_installed("torch-xla"):
        names.append("torch-xla")
    else:
        notes.append("torch-xla not included: its environment is missing; build it with `make venv-xla`")
    if not names:
        raise UsageError("no backend is installed; run `make venv` (or pip install 'podscale[torch,jax]')")
    return names, notes


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run whose step time is the median of the repeats (the lower middle of an even count)."""
    chosen = dict(sorted(runs, key=lambda r: r["step_time_s"])[(len(runs) - 1) // 2])
    if len(runs) > 1:
        chosen["repeat_step_times_s"] = [r["step_time_s"] for r in runs]
    return chosen


def run_one(python: str, args: list[str], timeout: float) -> tuple[int, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    p = subprocess.run([python, "-m", "launchers.cli", "run", *args], cwd=os.getcwd(), env=env,
                       capture_output=True, text=True, timeout=timeout)
    return p.returncode, (p.stderr.strip().splitlines() or [""])[-1]


def main(args: argparse.Namespace) -> int:
    console = Console(width=max(Console().width, 150))
    devices = parse_devices(args.devices)
    if args.mode == "weak" and args.global_batch is not None:
        raise UsageError("--global-batch is for --mode strong; weak scaling takes --per-device-batch")
    if args.mode == "strong" and args.per_device_batch is not None:
        raise UsageError("--per-device-batch is for --mode weak; strong scaling takes --global-batch")
    pdb = args.per_device_batch or 64
    gb = args.global_batch or 512

    def batch_of(n: int) -> int:
        return pdb * n if args.mode == "weak" else gb

    if args.mode == "strong":
        bad = [n for n in devices if gb % n]
        if bad:
            raise UsageError(f"--global-batch {gb} does not divide evenly over --devices {bad[0]}; use a multiple of {devices[-1]}")
    for n in (args.steps, pdb, gb):
        if n < 1:
            raise UsageError(f"sizes must be positive; got {n}")
    if args.probe_steps < 0:
        raise UsageError(f"invalid --probe-steps {args.probe_steps}: must be >= 0 (rounds of breakdown probes; 0 = none)")
    if args.repeats < 1:
        raise UsageError(f"invalid --repeats {args.repeats}: must be a positive integer (runs per configuration)")
    xla_python = find_xla_python(args.xla_python)
    backends, notes = choose_backends(args.backends, xla_python)
    if args.sharding != "none":
        from scaling.config import SHARDED_BACKENDS

        unsharded = [b for b in backends if b not in SHARDED_BACKENDS]
        if unsharded:
            raise UsageError(f"--sharding {args.sharding}: {', '.join(unsharded)} cannot shard yet; "
                             f"give --backends {','.join(SHARDED_BACKENDS)}")
    from launchers.flags import parse_model_opts

    model_opts = parse_model_opts(args.model_opt)
    check_host_capacity(backends, devices, args.model, model_opts, batch_of, args.sharding, args.optimizer)
    paths.writable_dir("--out", args.out)
    paths.writable_dir("--logdir", args.logdir)
    for n in notes:
        console.print(f"[yellow]note:[/yellow] {n}")

    if not args.no_calibrate:
        from scaling.throughput import measure

        main_backends = [b for b in backends if b != "torch-xla"]
        t = time.time()
        console.print("calibrating this host (cached; once per machine) ...")
        measure.ensure(main_backends, devices, quick=True, log=lambda m: console.print(f"  {m}"))
        if "torch-xla" in backends and xla_python:
            subprocess.run([xla_python, "-m", "launchers.cli", "calibrate", "--quick", "--backends", "torch-xla",
                            "--devices", ",".join(map(str, devices))], check=False,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
        console.print(f"  calibration ready ({time.time() - t:.0f}s)")

    out = Path(args.out)
    runs_dir = out / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    failures: list[str] = []
    configs = [(b, n) for b in backends for n in devices]
    # repeats go in passes over every configuration, not back to back: a slow minute on this host
    # then slows one run of several configurations, not every run of one (jax-pmap at N = 2 read
    # 3.1, 3.1 and 2.0 ms back to back, 1.3-1.6 ms in sweeps minutes later)
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {c: [] for c in configs}
    failed: set[tuple[str, int]] = set()
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=False) as bar:
        task = bar.add_task("sweep", total=len(configs) * args.repeats)
        for rep in range(args.repeats):
            for b, n in configs:
                if (b, n) in failed:
                    bar.advance(task)
                    continue
                pass_note = f" (pass {rep + 1} of {args.repeats})" if args.repeats > 1 else ""
                bar.update(task, description=f"{b} × {n}{pass_note}")
                name = f"{b}-{n}dev"
                tag = name if rep == 0 else f"{name}-repeat{rep}"
                jpath = runs_dir / f"{tag}.json"
                run_args = ["--backend", b, "--model", args.model, "--devices", str(n), "--global-batch", str(batch_of(n)),
                            "--steps", str(args.steps), "--untimed-steps", str(args.untimed_steps), "--dtype", args.dtype,
                            "--probe-steps", str(args.probe_steps), "--sharding", args.sharding,
                            "--optimizer", args.optimizer, "--json", str(jpath), "--logdir", args.logdir, "--run-name", tag,
                            "--step-timeout", str(args.step_timeout), "--quiet"]
                for kv in args.model_opt:
                    run_args += ["--model-opt", kv]
                python = xla_python if b == "torch-xla" and xla_python else sys.executable
                code, last = run_one(python, run_args, timeout=args.step_timeout * 10 + 300)
                if code != 0:
                    failures.append(f"{b} × {n} devices: exit {code}: {last}")
                    console.print(f"[red]{b} × {n} devices failed[/red] (exit {code}): {last}")
                    failed.add((b, n))
                else:
                    runs[(b, n)].append(json.loads(jpath.read_text()))
                bar.advance(task)
    results: list[dict[str, Any]] = [median_run(runs[c]) for c in configs if runs[c]]

    summary = summarize(results, args.mode)
    for backend, rows in summary.items():
        console.print(backend_table(backend, rows, args.mode, args.model))
    doc = {"mode": args.mode, "model": args.model, "devices": devices, "backends": backends,
           "per_device_batch": pdb if args.mode == "weak" else None, "global_batch": gb if args.mode == "strong" else None,
           "host_cores": host.host_cores(), "summary": summary, "runs": results, "failures": failures}
    emulated = bool(results) and all(r["hardware"] == "host-cpu" for r in results)
    if emulated:
        doc["host_ceiling_efficiency"] = dict(zip(map(str, devices), host_ceiling(devices, host.host_cores())))
    write_json(out / "scale.json", doc)
    png = plot(summary, args.mode, out / "scale.png", cores=host.host_cores() if emulated else None,
               title=f"{args.model}, {args.mode} scaling on {results[0]['hardware'] if results else '?'} "
                     f"({host.host_cores()} cores)")
    console.print(f"wrote {out / 'scale.json'}, {png}; TensorBoard: tensorboard --logdir {args.logdir} --host 127.0.0.1")
    if failures:
        raise RunFailed(f"{len(failures)} of {len(configs)} runs failed; first: {failures[0]}")
    return 0


def backend_table(backend: str, rows: list[dict[str, Any]], mode: str, model: str) -> Table:
    t = Table(title=f"{backend} · {model} · {mode} scaling", title_style="bold")
    for col in ("devices", "global batch", "step time", "predicted", "error", "samples/s", "achieved", "MFU",
                "efficiency", "pred. eff."):
        t.add_column(col, justify="right")

    def pct(x: float | None, signed: bool = False) -> str:
        return "n/a" if x is None else (f"{x * 100:+.0f}%" if signed else f"{x * 100:.0f}%")

    def ms(x: float | None) -> str:
        return "n/a" if x is None else f"{x * 1e3:.3g} ms"

    for r in rows:
        t.add_row(str(r["devices"]), str(r["global_batch"]), ms(r["step_time_s"]), ms(r["predicted_step_time_s"]),
                  pct(r["prediction_error"], True), f"{r['samples_per_s']:,.0f}", format_flops(r["achieved_flops"]),
                  mfu_text(r["mfu"], 2), pct(r["efficiency"]), pct(r["predicted_efficiency"]))
    return t



