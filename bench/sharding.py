"""Benchmark (not a test): sharded vs replicated data parallelism on this host, per backend, N and
``--sharding`` mode: the training state's bytes per device, measured (live tensors) beside
predicted (``scaling.throughput.memory``), each process's peak RSS, and the step time of the
sharded run divided by the replicated one's, as the median over interleaved repeats.

    .venv/bin/python bench/sharding.py [--backends torch-ddp,jax-sharded] [--devices 2,4] [--repeats 3]
                                       [--model-opt hidden=1024 ...] [--steps 30]

Each repeat runs every mode once, in turn, so the host's drift touches all modes alike. Run it on
an otherwise idle machine. On 2 cores the gathers of FSDP are scheduling-bound, so the ratios say
what sharding costs here, not on a GPU node.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

MODES = ("none", "optimizer", "full")


def run(backend: str, n: int, mode: str, steps: int, opts: list[str], batch: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "r.json"
        args = [sys.executable, "-m", "launchers.cli", "run", "--backend", backend, "--devices", str(n), "--sharding", mode,
                "--steps", str(steps), "--untimed-steps", str(max(2, steps // 5)), "--global-batch", str(batch * n),
                "--probe-steps", "0", "--json", str(out), "--quiet"]
        for kv in opts:
            args += ["--model-opt", kv]
        subprocess.run(args, cwd=ROOT, check=True, timeout=900)
        return json.loads(out.read_text())


def state_bytes(r: dict) -> tuple[int, int | None]:
    """(largest per-device state bytes, largest per-process peak RSS or None)."""
    per = r["memory"].get("per_rank") or r["memory"]["per_device"]
    state = max(d["params_bytes"] + (d.get("grads_bytes") or 0) + d["optimizer_bytes"] for d in per)
    rss = [d["rss_peak_bytes"] for d in per if d.get("rss_peak_bytes")] or [r["memory"].get("rss_peak_bytes") or 0]
    return state, max(rss) or None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", default="torch-ddp,jax-sharded")
    ap.add_argument("--devices", default="2,4")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--per-device-batch", type=int, default=16)
    ap.add_argument("--model-opt", action="append", default=None, dest="model_opt")
    a = ap.parse_args()
    opts = a.model_opt or ["d_in=256", "hidden=1024", "d_out=64"]
    from models.spec import get_spec
    from scaling.throughput.memory import per_device

    spec = get_spec("mlp", **{k: int(v) for k, v in (kv.split("=") for kv in opts)})
    c = Console()
    t = Table(title=f"sharded vs replicated: mlp {' '.join(opts)}, {a.per_device_batch}/device, medians of {a.repeats}")
    for col in ("backend", "N", "sharding", "state/device measured", "predicted", "peak RSS", "step", "÷ none"):
        t.add_column(col, justify="left" if col in ("backend", "sharding") else "right")
    for b in a.backends.split(","):
        for n in (int(x) for x in a.devices.split(",")):
            steps: dict[str, list[float]] = {m: [] for m in MODES}
            ratios: dict[str, list[float]] = {m: [] for m in MODES}
            last: dict[str, dict] = {}
            for _ in range(a.repeats):
                got = {m: run(b, n, m, a.steps, opts, a.per_device_batch) for m in MODES}
                for m in MODES:
                    steps[m].append(got[m]["step_time_s"])
                    ratios[m].append(got[m]["step_time_s"] / got["none"]["step_time_s"])
                last = got
            for m in MODES:
                state, rss = state_bytes(last[m])
                pred = per_device(spec.param_count, None, a.per_device_batch, n, m, "adam")
                if b == "jax-sharded":  # gradients live only inside the compiled step there
                    pred_state = pred.params_bytes + pred.optimizer_bytes
                else:
                    pred_state = pred.params_bytes + pred.grads_bytes + pred.optimizer_bytes
                t.add_row(b, str(n), m, f"{state / 1e6:.3f} MB", f"{pred_state / 1e6:.3f} MB",
                          f"{rss / 1e6:.0f} MB" if rss else "n/a", f"{statistics.median(steps[m]) * 1e3:.3g} ms",
                          f"{statistics.median(ratios[m]):.2f}")
    c.print(t)
    c.print("state = parameters + gradients (torch: after the first backward) + optimizer state, the largest device's; "
            "predicted = the same terms from scaling.throughput.memory (torch optimizer mode: FSDP2 keeps parameters "
            "sharded between steps, the prediction counts them whole, the step's peak)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
