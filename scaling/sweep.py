"""A scaling sweep's arithmetic and picture: efficiency rows from run results, and the plot.

Framework-free: it reads the runs' JSON dicts, so a sweep run on a TPU pod and one run on this
laptop are summarised by the same code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from scaling.meter import strong_efficiency, weak_efficiency


def efficiency(mode: str, base: dict[str, Any], run: dict[str, Any], time_key: str) -> float | None:
    """Weak: throughput(N) / (N/N0 × throughput(N0)); strong: t(N0) / (N/N0 × t(N)).

    N0 is the smallest device count of the sweep (1 in the usual sweep), so the figure reads as
    "fraction of perfect linear scaling from the smallest run".
    """
    tb, tr = base.get(time_key), run.get(time_key)
    if not tb or not tr:
        return None
    ratio = run["devices"] / base["devices"]
    if mode == "weak":
        return weak_efficiency(run["global_batch"] / tr, base["global_batch"] / tb, 1) / ratio
    return strong_efficiency(tb, tr, 1) / ratio


def summarize(runs: Sequence[dict[str, Any]], mode: str) -> dict[str, list[dict[str, Any]]]:
    """Per backend, one row per device count (ascending), measured beside predicted."""
    by_backend: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        by_backend.setdefault(r["backend"], []).append(r)
    out: dict[str, list[dict[str, Any]]] = {}
    for backend, rs in by_backend.items():
        rs = sorted(rs, key=lambda r: r["devices"])
        base = rs[0]
        rows = []
        for r in rs:
            pred = r.get("predicted_step_time_s")
            rows.append({
                "devices": r["devices"],
                "global_batch": r["global_batch"],
                "per_device_batch": r["per_device_batch"],
                "step_time_s": r["step_time_s"],
                "predicted_step_time_s": pred,
                "prediction_error": (pred / r["step_time_s"] - 1.0) if pred else None,
                "samples_per_s": r["samples_per_s"],
                "predicted_samples_per_s": (r["global_batch"] / pred) if pred else None,
                "achieved_flops": r["achieved_flops"],
                "peak_flops": r["peak_flops"],
                "mfu": r["mfu"],
                "efficiency": efficiency(mode, base, r, "step_time_s"),
                "predicted_efficiency": efficiency(mode, base, r, "predicted_step_time_s"),
                "model_flops_per_step": r["model_flops_per_step"],
                "hardware": r["hardware"],
                "breakdown": (r.get("breakdown") or {}).get("measured"),
            })
        out[backend] = rows
    return out


#: the breakdown's parts, bottom to top, and their colours in the stacked bars
PARTS = (("data_s", "data", "#8c8c8c"), ("compute_s", "compute", "#4c72b0"), ("comm_exposed_s", "comm (exposed)", "#dd8452"),
         ("unattributed_s", "unattributed", "#c44e52"))


def _parts_bars(ax: Any, summary: dict[str, list[dict[str, Any]]]) -> None:
    """Where each run's step went, measured: one stacked bar per backend and device count."""
    devs = sorted({r["devices"] for rows in summary.values() for r in rows})
    width = 0.8 / max(1, len(summary))
    for i, (backend, rows) in enumerate(summary.items()):
        by_n = {r["devices"]: r.get("breakdown") or {} for r in rows}
        xs = [devs.index(n) + (i - (len(summary) - 1) / 2) * width for n in by_n]
        bottom = [0.0] * len(xs)
        for key, label, colour in PARTS:
            vals = [max(0.0, (by_n[n].get(key) or 0.0)) * 1e3 for n in by_n]
            ax.bar(xs, vals, width * 0.9, bottom=bottom, color=colour, label=label if i == 0 else None,
                   edgecolor="white", linewidth=0.5)
            bottom = [b + v for b, v in zip(bottom, vals)]
        for x, top in zip(xs, bottom):
            ax.text(x, top, backend.replace("jax-", "j-").replace("torch-", "t-"), ha="center", va="bottom", fontsize=6, rotation=90)
    ax.set_xticks(range(len(devs)), [str(d) for d in devs])
    ax.set_xlabel("devices")
    ax.set_ylabel("step time, measured parts (ms)")
    ax.set_title("where the time went", fontsize=9)
    ax.legend(fontsize=7)


def host_ceiling(devices: list[int], cores: int) -> list[float]:
    """The best scaling efficiency N emulated devices can reach on ``cores`` cores when the step is
    compute: N devices compute at most min(N, cores) times as fast as one, so beyond the core count
    efficiency falls as cores / N whatever the software does. (A step dominated by fixed per-step
    host overhead, as torch-xla's on CPU, is not bounded by it: its time barely grows with N.)"""
    n0 = devices[0]
    return [min(n, cores) / min(n0, cores) * n0 / n for n in devices]


def plot(summary: dict[str, list[dict[str, Any]]], mode: str, path: str | Path, title: str = "",
         cores: int | None = None) -> Path:
    """Efficiency and throughput vs devices: measured as points, predicted as lines, a colour per backend;
    with ``cores`` (emulated devices) the host's ceiling too, so the loss the cores explain is visible."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_parts = any(r.get("breakdown") for rows in summary.values() for r in rows)
    fig, axes = plt.subplots(1, 3 if with_parts else 2, figsize=(16.5 if with_parts else 11, 4.2))
    ax_e, ax_t = axes[0], axes[1]
    for i, (backend, rows) in enumerate(summary.items()):
        c = f"C{i}"
        n = [r["devices"] for r in rows]
        ax_e.plot(n, [r["efficiency"] for r in rows], "o", color=c, markersize=7, label=f"{backend} measured")
        ax_t.plot(n, [r["samples_per_s"] for r in rows], "o", color=c, markersize=7, label=f"{backend} measured")
        if all(r["predicted_efficiency"] is not None for r in rows):
            ax_e.plot(n, [r["predicted_efficiency"] for r in rows], "-", color=c, alpha=0.8, label=f"{backend} predicted")
            ax_t.plot(n, [r["predicted_samples_per_s"] for r in rows], "-", color=c, alpha=0.8, label=f"{backend} predicted")
    for ax in (ax_e, ax_t):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("devices")
        ax.grid(alpha=0.3)
        devs = sorted({r["devices"] for rows in summary.values() for r in rows})
        ax.set_xticks(devs, [str(d) for d in devs])
    if cores:
        devs = sorted({r["devices"] for rows in summary.values() for r in rows})
        ax_e.plot(devs, host_ceiling(devs, cores), "k--", lw=1.2, label=f"host ceiling ({cores} cores)")
    ax_e.set_ylabel(f"{mode} scaling efficiency")
    ax_e.axhline(1.0, color="grey", lw=0.8, ls=":")
    ax_e.set_ylim(bottom=0)
    ax_t.set_ylabel("samples/s (whole job)")
    ax_t.set_yscale("log")
    ax_e.legend(fontsize=8)
    if with_parts:
        _parts_bars(axes[2], summary)
    fig.suptitle(title or f"podscale scale ({mode} scaling)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
