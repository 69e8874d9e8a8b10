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

from scaling import hardware
from scaling.backends import BACKENDS, check_name, is_installed
from scaling.errors import RunFailed, UsageError
from scaling.meter import format_flops
from scaling.sweep import plot, summarize

ROOT = Path(__file__).resolve().parent.parent
#: resident memory of one idle worker process, measured here (torch/jax imported), for the RAM check
PROCESS_RSS = {"torch-ddp": 0.35e9, "jax-pmap": 0.5e9, "jax-sharded": 0.5e9, "torch-xla": 1.2e9}
MAX_DEVICES_PER_CORE = 8


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
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    p.add_argument("--logdir", default="runs/scale", help="one TensorBoard run per configuration under here")
    p.add_argument("--out", default="out/scale", help="scale.json and scale.png go here")
    p.add_argument("--xla-python", default=None, help="python of the torch-xla environment (default: .venv-xla)")
    p.add_argument("--no-calibrate", action="store_true", help="do not calibrate this host first (no predictions if none)")
    p.add_argument("--step-timeout", type=float, default=60.0)
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


def total_ram() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_host_capacity(backends: list[str], devices: list[int], model: str, model_opts: dict[str, str], batch_of) -> None:
    """Refuse sweeps this host cannot emulate, before any process starts (exit 2, one line)."""
    from models.spec import get_spec

    cores = hardware.host_cores()
    top = devices[-1]
    if top > MAX_DEVICES_PER_CORE * cores:
        raise UsageError(f"--devices {top}: more devices than this host can emulate ({MAX_DEVICES_PER_CORE} × {cores} cores = "
                         f"{MAX_DEVICES_PER_CORE * cores}); use at most {MAX_DEVICES_PER_CORE * cores}")
    spec = get_spec(model, **model_opts)
    ram = total_ram()
    for b in backends:
        procs = top if b in ("torch-ddp",) else 1
        # params + grads + two optimizer moments per replica, activations of its batch, fp32
        per_device = 4 * (4 * spec.param_count + 2 * spec.activations_per_sample * batch_of(top) / top)
        need = procs * PROCESS_RSS.get(b, 0.5e9) + top * per_device
        if need > 0.8 * ram:
            raise UsageError(f"--devices {top} with {b}: predicted memory {need / 1e9:.1f} GB is above 80% of this host's "
                             f"RAM ({ram / 1e9:.1f} GB); use fewer devices or a smaller model/batch")


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
    xla_python = find_xla_python(args.xla_python)
    backends, notes = choose_backends(args.backends, xla_python)
    from launchers.cli import parse_model_opts

    model_opts = parse_model_opts(args.model_opt)
    check_host_capacity(backends, devices, args.model, model_opts, batch_of)
    for n in notes:
        console.print(f"[yellow]note:[/yellow] {n}")

    if not args.no_calibrate:
        from scaling import perfmodel

        main_backends = [b for b in backends if b != "torch-xla"]
        t = time.time()
        console.print("calibrating this host (cached; once per machine) ...")
        perfmodel.ensure_calibration(main_backends, devices, quick=True, log=lambda m: console.print(f"  {m}"))
        if "torch-xla" in backends and xla_python:
            subprocess.run([xla_python, "-m", "launchers.cli", "calibrate", "--quick", "--backends", "torch-xla",
                            "--devices", ",".join(map(str, devices))], check=False,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
        console.print(f"  calibration ready ({time.time() - t:.0f}s)")

    out = Path(args.out)
    runs_dir = out / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    failures: list[str] = []
    configs = [(b, n) for b in backends for n in devices]
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=False) as bar:
        task = bar.add_task("sweep", total=len(configs))
        for b, n in configs:
            bar.update(task, description=f"{b} × {n}")
            name = f"{b}-{n}dev"
            jpath = runs_dir / f"{name}.json"
            run_args = ["--backend", b, "--model", args.model, "--devices", str(n), "--global-batch", str(batch_of(n)),
                        "--steps", str(args.steps), "--untimed-steps", str(args.untimed_steps), "--dtype", args.dtype,
                        "--optimizer", args.optimizer, "--json", str(jpath), "--logdir", str(Path(args.logdir) / name),
                        "--step-timeout", str(args.step_timeout), "--quiet"]
            for kv in args.model_opt:
                run_args += ["--model-opt", kv]
            python = xla_python if b == "torch-xla" and xla_python else sys.executable
            code, last = run_one(python, run_args, timeout=args.step_timeout * 10 + 300)
            if code != 0:
                failures.append(f"{b} × {n} devices: exit {code}: {last}")
                console.print(f"[red]{b} × {n} devices failed[/red] (exit {code}): {last}")
            else:
                results.append(json.loads(jpath.read_text()))
            bar.advance(task)

    summary = summarize(results, args.mode)
    for backend, rows in summary.items():
        console.print(backend_table(backend, rows, args.mode, args.model))
    doc = {"mode": args.mode, "model": args.model, "devices": devices, "backends": backends,
           "per_device_batch": pdb if args.mode == "weak" else None, "global_batch": gb if args.mode == "strong" else None,
           "host_cores": hardware.host_cores(), "summary": summary, "runs": results, "failures": failures}
    tmp = out / ".scale.json.tmp"
    tmp.write_text(json.dumps(doc, indent=2))
    os.replace(tmp, out / "scale.json")
    png = plot(summary, args.mode, out / "scale.png",
               title=f"{args.model}, {args.mode} scaling on {results[0]['hardware'] if results else '?'} "
                     f"({hardware.host_cores()} cores)")
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
                  "n/a" if r["mfu"] is None else f"{r['mfu'] * 100:.2f}%", pct(r["efficiency"]), pct(r["predicted_efficiency"]))
    return t



