"""``podscale hardware | predict | calibrate | flops``: the catalog, the predictor and its measurements.

None of these import torch or jax unless they must (``calibrate`` measures with them; ``flops``
builds nothing), so listing the catalog is instant.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from scaling import paths
from scaling.throughput import catalog
from scaling.errors import UsageError
from scaling.meter import format_flops
from scaling.report import mfu_text


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("hardware", help="the hardware catalog: peaks (derived and quoted), memory, links, prices")
    p.add_argument("id", nargs="?", help="show one entry in full: derivations, quoted figures, which one MFU uses")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--sort", choices=("catalog", "gflops-per-dollar", "year", "peak"), default="catalog")
    p.add_argument("--out", default=None, metavar="DIR", help="write the GFLOPS-per-dollar PNG here (default: no PNG)")
    p.add_argument("--wide", action="store_true", help="every column (fp32 and 16-bit per device, derived, quoted)")
    p.set_defaults(func=main_hardware)

    p = sub.add_parser("predict", help="predicted step time, throughput, MFU and scaling efficiency for N = 1, 2, 4 ... devices")
    p.add_argument("--model", required=True, help="zoo model (podscale models), a named size (bert-base, gpt3-175b, resnet50-v1, ...) "
                   "or published: " + ", ".join(_published()))
    p.add_argument("--model-opt", action="append", default=[], dest="model_opt", metavar="KEY=VALUE")
    p.add_argument("--hardware", required=True, help="catalog id (podscale hardware lists them)")
    p.add_argument("--devices", type=int, required=True, help="largest device count (framework-visible devices)")
    p.add_argument("--global-batch", type=int, required=True, dest="global_batch",
                   help="samples per step at --devices (weak: it must divide evenly over --devices)")
    p.add_argument("--scaling", choices=("weak", "strong"), default="weak",
                   help="weak: per-device batch fixed at global-batch/devices; strong: global batch fixed")
    p.add_argument("--dtype", choices=tuple(catalog.PEAK_DTYPE), default="float32",
                   help="the unit the matmuls run on: float32 (FP32 cores), tf32 (TF32 tensor cores), "
                        "float16 (AMP: fp16 tensor cores, loss scaling), bfloat16; MFU is against that unit's peak")
    p.add_argument("--slices", type=int, default=1,
                   help="TPU multislice: K ICI slices joined over the data-center network (beyond the largest slice)")
    p.add_argument("--backend", default=None, help="host-cpu only: which calibrated backend (default torch-ddp)")
    p.add_argument("--algorithm", choices=("auto", "ring", "tree", "hierarchical", "torus"), default="auto")
    p.add_argument("--sharding", choices=("none", "optimizer", "full"), default="none",
                   help="memory per device with the state replicated (none) or split N ways (as podscale run --sharding)")
    p.add_argument("--optimizer", choices=("adam", "sgd"), default="adam", help="for memory: Adam's two moments or none")
    p.add_argument("--json", action="store_true")
    p.add_argument("--out", default=None, metavar="DIR", help="write predict.png (efficiency and PFLOPS vs devices) here")
    p.add_argument("--wide", action="store_true", help="every column (per-device batch, compute, exposed comm, achieved)")
    p.set_defaults(func=main_predict)

    p = sub.add_parser("calibrate", help="measure this host (GEMM rates, all-reduce curves, per-backend step overhead)")
    p.add_argument("--quick", action="store_true", help="fewer sizes and repeats (~1 min per backend)")
    p.add_argument("--backends", default=None, help="comma-separated (default: every installed one of torch-ddp, jax-pmap, jax-sharded)")
    p.add_argument("--devices", default="1,2,4,8", help="device counts to calibrate (default 1,2,4,8)")
    p.add_argument("--fresh", action="store_true", help="discard the existing calibration first")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=main_calibrate)

    p = sub.add_parser("flops", help="per-layer FLOP and parameter breakdown of a model")
    p.add_argument("--model", required=True)
    p.add_argument("--model-opt", action="append", default=[], dest="model_opt", metavar="KEY=VALUE")
    p.add_argument("--batch", type=int, default=1, help="samples (default 1)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=main_flops)


def _published() -> list[str]:
    from scaling.throughput.estimate import PUBLISHED

    return list(PUBLISHED)


def _opts(items: list[str]) -> dict[str, str]:
    from launchers.flags import parse_model_opts

    return parse_model_opts(items)


def _t(x: float | None) -> str:
    return "" if x is None else f"{x / 1e12:.3g}" if x < 1e15 else f"{x / 1e15:.4g}P"


# ---- hardware --------------------------------------------------------------------------------


def _entry_dict(hw: catalog.Hardware) -> dict[str, Any]:
    return {
        "id": hw.id, "name": hw.name, "kind": hw.kind, "family": hw.family, "year": hw.year, "device": hw.device,
        "devices": hw.devices, "chips": hw.chips, "peak_flops_per_device": hw.peak_flops,
        "peak_flops_total": {k: v * hw.devices for k, v in hw.peak_flops.items()}, "peak_note": hw.peak_note,
        "derived": {k: {"flops": d.value, "how": d.text} for k, d in hw.derived.items()},
        "quoted": hw.quoted, "quoted_source": hw.quoted_source, "memory_bytes": hw.memory_bytes, "memory_bw": hw.memory_bw,
        "price_usd": hw.price_usd, "price_usd_per_hour": hw.price_usd_per_hour, "price_year": hw.price_year,
        "price_source": hw.price_source, "gflops_per_dollar": hw.gflops_per_dollar(),
        "devices_per_node": hw.devices_per_node, "max_devices": hw.max_devices, "intra_bw": hw.intra_bw,
        "intra_latency": hw.intra_latency, "inter_bw": hw.inter_bw, "inter_latency": hw.inter_latency,
        "part_of": hw.part_of, "source": hw.source, "memory_source": hw.memory_source, "link_source": hw.link_source,
        "latency_source": hw.latency_source, "intra_link": hw.intra_link, "ici_link_bw": hw.ici_link_bw,
        "ici_links": hw.ici_links, "torus_dims": hw.torus_dims, "max_slice_chips": hw.max_slice_chips,
        "slice_source": hw.slice_source, "dcn_bw": hw.dcn_bw, "dcn_source": hw.dcn_source, "dtypes": hw.dtypes(),
    }


def _best_key(hw: catalog.Hardware) -> str | None:
    for k in ("bf16", "fp16", "tf32", "fp32"):
        if k in hw.peak_flops:
            return k
    return None


def main_hardware(args: argparse.Namespace) -> int:
    if args.out is not None:
        paths.writable_dir("--out", args.out)
    if args.id:
        return _one(catalog.get(args.id), args.json)
    hws = catalog.all_hardware()
    if args.sort == "gflops-per-dollar":
        hws.sort(key=lambda h: -(h.gflops_per_dollar() or -1))
    elif args.sort == "year":
        hws.sort(key=lambda h: h.year or 9999)
    elif args.sort == "peak":
        hws.sort(key=lambda h: -max([v * h.devices for v in h.peak_flops.values()] or [0]))
    if args.json:
        print(json.dumps([_entry_dict(h) for h in hws], indent=1))
    else:
        t = Table(title="podscale hardware (dense peaks; TFLOPS)" + ("" if args.wide else "; --wide: all columns"),
                  title_style="bold")
        cols = ["id", "devices", "fp32/dev", "16-bit/dev", "total (MFU basis)", "derived", "quoted", "price", "GFLOPS/$"]
        shown = cols if args.wide else ["id", "devices", "total (MFU basis)", "price", "GFLOPS/$"]  # fits 80 columns
        width = max(len(h.id) for h in hws)
        for col in shown:
            if col == "id":
                t.add_column(col, justify="left", no_wrap=True, min_width=width)  # ids are what people type: never cut
            else:
                t.add_column(col, justify="right")
        for h in hws:
            k = _best_key(h)
            half = h.peak("bf16") or h.peak("fp16")
            dk = k if k in h.derived else next(iter(h.derived), None)
            qk = k if k in h.quoted else next(iter(h.quoted), None)
            price = (f"${h.price_usd:,.0f}" if h.price_usd else f"${h.price_usd_per_hour:.2f}/h" if h.price_usd_per_hour else "")
            cells = dict(zip(cols, (h.id, str(h.devices), _t(h.peak("fp32")), _t(half),
                                    f"{_t(h.total_peak(k))} {k}" if k else "n/a (calibrate)",
                                    f"{_t(h.derived[dk].value)} {dk}" if dk else "", f"{_t(h.quoted[qk])} {qk}" if qk else "",
                                    price, f"{h.gflops_per_dollar():.3g}" if h.gflops_per_dollar() else "")))
            t.add_row(*(cells[c] for c in shown))
        Console().print(t)
    if args.out is not None:
        png = plot_cost_trend(catalog.all_hardware(), Path(args.out))
        print(f"wrote {png}", file=sys.stderr if args.json else sys.stdout)
    return 0


def _one(hw: catalog.Hardware, as_json: bool) -> int:
    d = _entry_dict(hw)
    if as_json:
        print(json.dumps(d, indent=1))
        return 0
    c = Console()
    c.print(f"[bold]{hw.id}[/bold]: {hw.name} ({hw.kind}, {hw.year or 'n/a'})")
    c.print(f"  one device = {hw.device}; {hw.devices} device(s), {hw.chips} chip(s) in this entry"
            + (f"; --devices capped at {hw.max_devices}" if hw.max_devices else ""))
    for k, v in hw.peak_flops.items():
        c.print(f"  peak {k}: {format_flops(v)} per device, {format_flops(v * hw.devices)} in all  [MFU uses this]")
    for k, der in hw.derived.items():
        c.print(f"  derived {k}: {format_flops(der.value)} = {der.text}")
    for k, v in hw.quoted.items():
        c.print(f"  quoted {k}: {format_flops(v)} ({hw.quoted_source})")
    if hw.peak_note:
        c.print(f"  note: {hw.peak_note}")
    if hw.price_usd or hw.price_usd_per_hour:
        price = f"${hw.price_usd:,.0f}" if hw.price_usd else f"${hw.price_usd_per_hour:.2f}/hour"
        c.print(f"  price: {price} ({hw.price_year}; {hw.price_source})")
    if hw.memory_bytes or hw.memory_bw:
        mb = hw.memory_bytes or 0
        size = f"{mb / 2**30:.4g} GiB" if mb % 2**30 == 0 else f"{mb / 1e9:.4g} GB"
        c.print(f"  memory: {size}, "
                f"{(hw.memory_bw or 0) / 1e9:.4g} GB/s per device ({hw.memory_source or 'source: the entry source'})")
    if hw.ici_link_bw:
        c.print(f"  ICI: {hw.torus_dims}-D torus, {hw.ici_links} links x {hw.ici_link_bw / 1e9:.4g} GB/s per direction per chip; "
                f"largest slice {hw.max_slice_chips} chips ({hw.slice_source})"
                + (f"; DCN {hw.dcn_bw / 1e9:.4g} GB/s per chip ({hw.dcn_source})" if hw.dcn_bw else "; no DCN figure (no multislice)"))
    elif hw.intra_bw or hw.inter_bw:
        c.print(f"  links: intra-node {(hw.intra_bw or 0) / 1e9:.4g} GB/s per device per direction ({hw.intra_link}), "
                f"inter-node {(hw.inter_bw or 0) / 1e9:.4g} GB/s per node; {hw.devices_per_node} device(s) per node")
    if hw.link_source:
        c.print(f"  link source: {hw.link_source}")
    if hw.latency_source:
        c.print(f"  latency source: {hw.latency_source}")
    c.print(f"  source: {hw.source}")
    return 0


def plot_cost_trend(hws: list[catalog.Hardware], out: Path) -> Path:
    """The lecture's chart: fp32 GFLOPS per purchase dollar over the years, CPUs vs GPUs (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for fam, marker in (("cpu", "s"), ("gpu", "o")):
        pts = sorted((h.year, h.gflops_per_dollar(), h.id) for h in hws
                     if h.family == fam and h.year and h.gflops_per_dollar() and h.kind in ("cpu", "gpu"))
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=fam.upper())
            for y, v, name in pts:
                ax.annotate(name, (y, v), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_yscale("log")
    ax.set_xlabel("year")
    ax.set_ylabel("peak fp32 GFLOPS per dollar")
    ax.set_title("GFLOPS per dollar (podscale hardware catalog)")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    png = out / "hardware_gflops_per_dollar.png"
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


# ---- predict ---------------------------------------------------------------------------------


def main_predict(args: argparse.Namespace) -> int:
    from scaling.throughput import estimate

    if args.devices < 1:
        raise UsageError(f"invalid --devices {args.devices}: must be a positive integer")
    if not args.global_batch > 0:
        raise UsageError(f"invalid --global-batch {args.global_batch:g}: must be positive")
    from scaling.throughput.estimate import device_counts

    # every N predicted must split its batch evenly, as `podscale run` requires
    for n in device_counts(args.devices) if args.scaling == "strong" else [args.devices]:
        if args.global_batch % n:
            raise UsageError(f"--global-batch {args.global_batch} does not divide evenly over {n} devices "
                             f"({args.scaling} scaling); use a multiple of {n}, e.g. {n * max(1, args.global_batch // n)}")
    if args.out is not None:
        paths.writable_dir("--out", args.out)
    hw = catalog.get(args.hardware)
    hw.check_devices(args.devices, args.slices)
    from scaling.throughput.compute import check_dtype

    check_dtype(hw, args.dtype)  # a dtype the hardware has no unit for: one line naming what it has
    model: Any = args.model
    if args.model_opt:  # zoo and named specs take options (seq_len=512 for bert-base)
        model = estimate.workload(args.model, **_opts(args.model_opt))
    if args.backend and hw.id != "host-cpu":
        raise UsageError(f"--backend applies to host-cpu predictions only (its calibration); {hw.id} uses the catalog")
    kw: dict[str, Any] = {"global_batch": args.global_batch} if args.scaling == "strong" else {"per_device_batch": args.global_batch / args.devices}
    rows = estimate.predict(model, hw.id, args.devices, scaling=args.scaling, dtype=args.dtype, backend=args.backend,
                             algorithm=args.algorithm, slices=args.slices, sharding=args.sharding, **kw)
    from scaling.throughput.memory import per_device

    wl = estimate.workload(model)
    mems = [per_device(wl.params, wl.activations_per_sample, r.per_device_batch, r.devices, args.sharding, args.optimizer, args.dtype)
            for r in rows]
    chip = hw.memory_bytes  # per device
    if args.json:
        print(json.dumps([{**r.as_dict(), "memory": {**m.as_dict(), "device_memory_bytes": chip, "sharding": args.sharding,
                                                      "fits": None if chip is None else m.total_bytes <= chip}}
                          for r, m in zip(rows, mems)], indent=1))
    else:
        r0 = rows[0]
        t = Table(title=f"podscale predict: {r0.model} on {hw.id} ({args.scaling} scaling, {args.dtype}, MFU vs {r0.peak_dtype} peak)",
                  title_style="bold")
        # step time = overhead + data + compute + exposed comm: with those columns the parts add up
        cols = ["devices", "global batch", "per device", "step time", "overhead", "data", "compute", "comm (exposed)",
                "samples/s", "achieved", "MFU", f"{args.scaling} eff."]
        shown = cols if args.wide else ["devices", "global batch", "step time", "samples/s", "MFU", f"{args.scaling} eff."]
        for col, attr in (("overhead", "overhead_s"), ("data", "data_s")):
            if not any(getattr(r, attr) for r in rows):
                cols.remove(col)
                shown = [c for c in shown if c != col]
        for col in shown:
            t.add_column(col, justify="right")
        for r in rows:
            cells = dict(zip(cols, (str(r.devices), f"{r.global_batch:g}", f"{r.per_device_batch:g}", f"{r.step_time_s * 1e3:.4g} ms",
                                    *([f"{r.overhead_s * 1e3:.4g} ms"] if "overhead" in cols else []),
                                    *([f"{r.data_s * 1e3:.4g} ms"] if "data" in cols else []), f"{r.compute_s * 1e3:.4g} ms", f"{r.comm_s * 1e3:.4g} ms", f"{r.samples_per_s:,.1f}",
                                    format_flops(r.achieved_flops), mfu_text(r.mfu),
                                    f"{r.efficiency * 100:.1f}%" if r.efficiency is not None else "")))
            t.add_row(*(cells[c] for c in shown))
        c = Console()
        c.print(t)
        c.print(f"basis: {rows[-1].basis}" + "".join(f"; {n}" for n in rows[-1].notes))
        c.print(memory_line(rows, mems, chip, args.sharding, args.optimizer))
        for r in rows:
            if r.mfu_flag:
                c.print(f"MFU at {r.devices} device(s): {r.mfu_flag}")
    if args.out:
        png = plot_prediction(rows, Path(args.out))
        print(f"wrote {png}", file=sys.stderr if args.json else sys.stdout)
    return 0


def memory_line(rows: list[Any], mems: list[Any], chip: float | None, sharding: str, optimizer: str) -> str:
    """Memory per device at the largest N and whether every N fits the device (one line)."""
    m, gb = mems[-1], 1e9
    act = f", activations {m.activations_bytes / gb:.3g}" if m.activations_bytes is not None else ", activations unknown"
    head = (f"memory per device at N={rows[-1].devices} (--sharding {sharding}): {m.total_bytes / gb:.3g} GB = params "
            f"{m.params_bytes / gb:.3g}, grads {m.grads_bytes / gb:.3g}, {optimizer} {m.optimizer_bytes / gb:.3g}{act}")
    if chip is None:
        return head + "; the device's memory is not in the catalog"
    over = [str(r.devices) for r, mm in zip(rows, mems) if mm.total_bytes > chip]
    if not over:
        return head + f"; fits the device's {chip / gb:.3g} GB at every N"
    return head + f"; [red]does not fit[/red] the device's {chip / gb:.3g} GB at N={','.join(over)}" + \
        ("" if sharding == "full" else " (--sharding full splits the state N ways)")


def plot_prediction(rows: list[Any], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ns = [r.devices for r in rows]
    ax.plot(ns, [r.efficiency * 100 for r in rows], marker="o", color="tab:blue", label=f"{rows[0].scaling} efficiency")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("devices")
    ax.set_ylabel("scaling efficiency (%)", color="tab:blue")
    ax.set_ylim(0, 105)
    ax2 = ax.twinx()
    ax2.plot(ns, [r.achieved_pflops for r in rows], marker="s", color="tab:red", label="achieved PFLOPS")
    ax2.set_ylabel("achieved PFLOPS (model FLOPs)", color="tab:red")
    ax.set_title(f"predicted: {rows[0].model} on {rows[0].hardware}")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    png = out / "predict.png"
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


# ---- calibrate -------------------------------------------------------------------------------


def _int_list(s: str, flag: str) -> list[int]:
    try:
        out = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"invalid {flag} {s!r}: expected comma-separated positive integers (e.g. 1,2,4,8)") from None
    if not out or any(n < 1 for n in out):
        raise UsageError(f"invalid {flag} {s!r}: expected comma-separated positive integers (e.g. 1,2,4,8)")
    return sorted(set(out))


def main_calibrate(args: argparse.Namespace) -> int:
    import importlib.util

    from scaling.throughput import calibration, measure

    counts = _int_list(args.devices, "--devices")
    if args.backends:
        backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    else:
        backends = [b for b, (_, pkg) in calibration.FAMILIES.items() if importlib.util.find_spec(pkg) is not None]
    c = Console(stderr=args.json)
    existing = calibration._empty() if args.fresh else None
    data = measure.calibrate(backends, counts, measure.QUICK if args.quick else measure.FULL,
                               log=lambda s: c.print(f"[dim]calibrating: {s}[/dim]"), existing=existing)
    if args.json:
        print(json.dumps(data, indent=1))
        return 0
    t = Table(title=f"podscale calibrate: {data['host']} ({data['cores']} cores usable)", title_style="bold")
    for col in ("backend", "N", "step overhead", "GEMM slowdown", "all-reduce alpha", "all-reduce bw", "per tensor",
                "memory, N at once"):
        t.add_column(col, justify="right" if col != "backend" else "left")
    for b in backends:
        fam = calibration.FAMILIES[b][0]
        for n in counts:
            e = data["backends"][b]["per_n"][str(n)]
            col = data["collectives"][fam][str(n)]
            bw = col["bw"]
            # the memory probe's largest size: bytes all N devices moved per second, together
            big = max(col.get("stream") or [[0, 0]], key=lambda p: p[0])
            leaf = col.get("leaf_s")
            t.add_row(b, str(n), f"{e['overhead_s'] * 1e3:.3g} ms", f"{e['slowdown']:.2f}x", f"{col['alpha'] * 1e6:.0f} us",
                      "n/a" if bw == float("inf") else f"{bw / 1e9:.3g} GB/s",
                      "buckets" if fam == "gloo" else f"{leaf * 1e6:.0f} us" if leaf is not None else "not measured",
                      f"{n * big[0] / big[1] / 1e9:.3g} GB/s" if big[1] else "not measured")
    c.print(t)
    g = data["gemm"].get("torch", {}).get("fp32", {})
    if g:
        c.print("torch fp32 GEMM (largest size): " + ", ".join(
            f"{th} thread(s) {format_flops(max(v.values()))}" for th, v in sorted(g.items(), key=lambda kv: int(kv[0]))))
    c.print(f"wrote {calibration.path()}")
    return 0


# ---- flops -----------------------------------------------------------------------------------


def main_flops(args: argparse.Namespace) -> int:
    from scaling.throughput import flops

    if args.batch < 1:
        raise UsageError(f"invalid --batch {args.batch}: must be a positive integer")
    fc = flops.count(args.model, **_opts(args.model_opt))
    b = args.batch
    if args.json:
        print(json.dumps({"model": fc.model, "params": fc.params, "batch": b, "forward": fc.forward_per_sample * b,
                          "backward": fc.backward_per_sample * b, "train": fc.train_per_sample * b, "grad_bytes": fc.grad_bytes,
                          "layers": [{"name": r.name, "kind": r.kind, "params": r.params, "forward": r.forward * b,
                                      "backward": r.backward * b, "share": r.share} for r in fc.layers]}, indent=1))
        return 0
    t = Table(title=f"podscale flops: {fc.model}, batch {b} (multiply-add = 2 FLOPs)", title_style="bold")
    for col in ("layer", "kind", "params", "forward", "backward", "share"):
        t.add_column(col, justify="left" if col in ("layer", "kind") else "right")
    for r in fc.layers:
        t.add_row(r.name, r.kind, f"{r.params:,}", f"{r.forward * b:,}", f"{r.backward * b:,}", f"{r.share * 100:.1f}%")
    t.add_row("[bold]total[/bold]", "", f"{fc.params:,}", f"{fc.forward_per_sample * b:,}", f"{fc.backward_per_sample * b:,}", "100%")
    c = Console()
    c.print(t)
    c.print(f"training FLOPs per step: {fc.train_per_sample * b:,} ({fc.train_per_sample * b / 1e9:.4g} GFLOP); "
            f"gradient bytes all-reduced: {fc.grad_bytes:,}")
    return 0
