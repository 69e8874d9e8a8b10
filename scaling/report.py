"""Results people read: rich tables on the console (JSON and TensorBoard live in ``scaling.run``)."""

from __future__ import annotations

from typing import Any, Iterable

from rich.console import Console
from rich.table import Table

from scaling.meter import format_flops


def mfu_text(mfu: float | None, digits: int = 1) -> str:
    """MFU for a table: above 100% it is flagged, never printed as if fine (the peak or the FLOP
    count behind it is wrong)."""
    if mfu is None:
        return "n/a"
    text = f"{mfu * 100:.{digits}f}%"
    return f"[bold red]{text} (above peak!)[/bold red]" if mfu > 1.0 else text


def _pct(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "n/a"
    return f"{x * 100:+.1f}%" if signed else f"{x * 100:.1f}%"


def _ms(x: float | None) -> str:
    return "n/a" if x is None else f"{x * 1e3:.3g} ms"


def run_table(results: Iterable[dict[str, Any]], title: str = "podscale run") -> Table:
    t = Table(title=title, title_style="bold")
    for col, just in (("backend", "left"), ("model", "left"), ("devices", "right"), ("global batch", "right"),
                      ("step time", "right"), ("predicted", "right"), ("error", "right"), ("samples/s", "right"),
                      ("achieved", "right"), ("peak", "right"), ("MFU", "right"), ("final loss", "right"),
                      ("replicas equal", "center")):
        t.add_column(col, justify=just)  # type: ignore[arg-type]
    for r in results:
        t.add_row(
            r["backend"], r["model"], str(r["devices"]), str(r["global_batch"]),
            _ms(r["step_time_s"]), _ms(r.get("predicted_step_time_s")), _pct(r.get("prediction_error"), signed=True),
            f"{r['samples_per_s']:,.0f}", format_flops(r["achieved_flops"]),
            f"{format_flops(r['peak_flops'])} {r['peak_dtype']} ({r['hardware']})", mfu_text(r["mfu"]),
            f"{r['losses'][-1]:.6g}", "yes" if r["replicas_identical"] else "[red]NO[/red]",
        )
    return t


def summary_table(r: dict[str, Any]) -> Table:
    """One run as metric | measured | predicted rows: fits an 80-column terminal."""
    t = Table(title=f"podscale run: {r['backend']} · {r['model']} · {r['devices']} device(s) · {r['hardware']}", title_style="bold")
    t.add_column("metric")
    t.add_column("measured", justify="right")
    t.add_column("predicted", justify="right")
    pred = r.get("predicted_step_time_s")
    flops = r["model_flops_per_step"]
    peak = r["peak_flops"]
    t.add_row("step time (median)", _ms(r["step_time_s"]), _ms(pred))
    t.add_row("prediction error", "", _pct(r.get("prediction_error"), signed=True))
    t.add_row("samples/s", f"{r['samples_per_s']:,.0f}", f"{r['global_batch'] / pred:,.0f}" if pred else "n/a")
    t.add_row("achieved (model FLOPs)", format_flops(r["achieved_flops"]), format_flops(flops / pred) if pred else "n/a")
    t.add_row("per device", format_flops(r["achieved_flops_per_device"]), "")
    t.add_row(f"peak ({r['peak_dtype']})", format_flops(peak), "")
    t.add_row("MFU", mfu_text(r["mfu"]), mfu_text(flops / pred / peak) if pred and peak else "n/a")
    b = r.get("breakdown") or {}
    m, p = b.get("measured") or {}, b.get("predicted") or {}
    if m or p:  # where the step's time went: K probes after training, beside the prediction's parts
        for label, mk, pk in (("  data", "data_s", "data_s"), ("  compute", "compute_s", "compute_s"),
                              ("  comm (exposed)", "comm_exposed_s", "comm_exposed_s"),
                              ("  unattributed / overhead", "unattributed_s", "overhead_s")):
            flagged = mk == "unattributed_s" and m and b.get("flag")
            t.add_row(label, (_ms(m.get(mk)) + (" (!)" if flagged else "")) if m else "n/a", _ms(p.get(pk)) if pk and p else "")
    t.add_row("global batch / per device", f"{r['global_batch']} / {r['per_device_batch']}", "")
    t.add_row("final loss", f"{r['losses'][-1]:.6g}", "")
    t.add_row("replicas identical", "yes" if r["replicas_identical"] else "[red]NO[/red]", "")
    return t


def print_run(result: dict[str, Any], console: Console | None = None) -> None:
    c = console or Console()
    c.print(summary_table(result))
    for key in ("mfu_flag", "peak_note"):
        if result.get(key):
            c.print(f"{'[bold red]MFU: ' if key == 'mfu_flag' else 'peak: '}{result[key]}{'[/bold red]' if key == 'mfu_flag' else ''}")
    if result.get("replication_note"):
        c.print(f"[yellow]replicated: {result['replication_note']}[/yellow]")
    if (result.get("breakdown") or {}).get("note"):
        c.print(f"[dim]breakdown: {result['breakdown']['note']}[/dim]")
    flag = (result.get("breakdown") or {}).get("flag")
    if flag:
        c.print(f"[yellow]breakdown: {flag}[/yellow]")
