"""The public calibration set (``published_runs.toml``) and the held-out set (``published_heldout.toml``,
never fitted on) against the predictor: per case, published vs predicted throughput and scaling
efficiency, and whether each is within its target.

Shared by ``bench/published.py`` (prints it) and ``tests/test_published.py`` (holds the targets).
"""

from __future__ import annotations

import statistics
import tomllib
from dataclasses import dataclass
from pathlib import Path

from scaling.throughput.estimate import predict_step

CASES_FILE = Path(__file__).with_name("published_runs.toml")
HELD_OUT_FILE = Path(__file__).with_name("published_heldout.toml")
SETS = {"calibration": CASES_FILE, "held-out": HELD_OUT_FILE}
"""Each set's file: the fitted values in ``compute`` come from the first only."""
THROUGHPUT_TARGET = 0.15
"""|predicted / published - 1| for throughput."""
EFFICIENCY_TARGET = 0.05
"""|predicted - published| for scaling efficiency (fraction, i.e. 5 points)."""


@dataclass(frozen=True)
class Result:
    id: str
    cite: str
    model: str
    hardware: str
    dtype: str
    devices: int
    published_samples_per_s: float | None
    predicted_samples_per_s: float
    published_efficiency: float | None
    predicted_efficiency: float | None
    known_miss: str | None

    @property
    def throughput_error(self) -> float | None:
        p = self.published_samples_per_s
        return None if p is None else self.predicted_samples_per_s / p - 1.0

    @property
    def efficiency_error(self) -> float | None:
        if self.published_efficiency is None or self.predicted_efficiency is None:
            return None
        return self.predicted_efficiency - self.published_efficiency

    @property
    def within(self) -> bool:
        t, e = self.throughput_error, self.efficiency_error
        return (t is None or abs(t) <= THROUGHPUT_TARGET) and (e is None or abs(e) <= EFFICIENCY_TARGET)


def cases(path: Path = CASES_FILE) -> dict[str, dict]:
    return tomllib.loads(path.read_text())


def evaluate(case_id: str, c: dict) -> Result:
    n, b = int(c["devices"]), float(c["per_device_batch"])
    est = predict_step(c["model"], c["hardware"], n, n * b, c["dtype"])
    pub_eff = c.get("efficiency")
    pred_eff = None
    if "base_devices" in c:
        nb = int(c["base_devices"])
        base = predict_step(c["model"], c["hardware"], nb, nb * b, c["dtype"])
        pred_eff = est.samples_per_s / (n / nb * base.samples_per_s)
        if pub_eff is None and "base_samples_per_s" in c and "samples_per_s" in c:
            pub_eff = c["samples_per_s"] / (n / nb * c["base_samples_per_s"])
    return Result(case_id, c["cite"], c["model"], c["hardware"], c["dtype"], n, c.get("samples_per_s"), est.samples_per_s,
                  pub_eff, pred_eff, c.get("known_miss"))


def evaluate_all(path: Path = CASES_FILE) -> list[Result]:
    return [evaluate(k, c) for k, c in cases(path).items()]


def summary(results: list[Result]) -> dict[str, float]:
    """Median and max |error| of throughput (relative) and efficiency (points as a fraction)."""
    t = [abs(r.throughput_error) for r in results if r.throughput_error is not None]
    e = [abs(r.efficiency_error) for r in results if r.efficiency_error is not None]
    return {"throughput_median": statistics.median(t) if t else 0.0, "throughput_max": max(t, default=0.0),
            "efficiency_median": statistics.median(e) if e else 0.0, "efficiency_max": max(e, default=0.0)}
