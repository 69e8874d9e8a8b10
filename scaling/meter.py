"""Throughput arithmetic: step time, samples/s, achieved FLOPS, MFU, scaling efficiency.

Definitions follow DESIGN.md. The one subtle rule is the peak that MFU divides by: the sum of the
devices' peaks for real chips, but the host's single peak for emulated CPU devices, which all share
the same cores (8 emulated devices on 2 cores do not have 8 CPUs' worth of FLOPS).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Sequence


class StepTimer:
    """Wall time per step; the caller syncs the device before ``stop`` (``.item()``, ``block_until_ready``)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._t0 = 0.0

    def start(self) -> None:
        self._t0 = time.perf_counter()

    def stop(self) -> float:
        dt = time.perf_counter() - self._t0
        self.times.append(dt)
        return dt


def median_step_time(step_times: Sequence[float], untimed_steps: int) -> float:
    timed = list(step_times[untimed_steps:])
    if not timed:
        raise ValueError("no timed steps: --steps must exceed --untimed-steps")
    return statistics.median(timed)


@dataclass(frozen=True)
class Throughput:
    step_time_s: float
    samples_per_s: float
    model_flops_per_step: float
    achieved_flops: float
    achieved_flops_per_device: float
    peak_flops: float | None
    mfu: float | None

    @property
    def achieved_pflops(self) -> float:
        return self.achieved_flops / 1e15


def run_peak(device_peak: float | None, devices: int, shared_host: bool) -> float | None:
    """Peak FLOPS of the whole run's hardware (None if the chip's peak is unknown)."""
    if device_peak is None:
        return None
    return device_peak if shared_host else device_peak * devices


def throughput(
    step_time_s: float,
    global_batch: int,
    flops_per_sample: float,
    devices: int,
    peak_flops: float | None,
) -> Throughput:
    flops = flops_per_sample * global_batch
    achieved = flops / step_time_s
    return Throughput(
        step_time_s=step_time_s,
        samples_per_s=global_batch / step_time_s,
        model_flops_per_step=flops,
        achieved_flops=achieved,
        achieved_flops_per_device=achieved / devices,
        peak_flops=peak_flops,
        mfu=(achieved / peak_flops) if peak_flops else None,
    )


def weak_efficiency(throughput_n: float, throughput_1: float, n: int) -> float:
    """throughput(N) / (N * throughput(1)) at fixed per-device batch."""
    return throughput_n / (n * throughput_1)


def strong_efficiency(time_1: float, time_n: float, n: int) -> float:
    """time(1) / (N * time(N)) at fixed global batch."""
    return time_1 / (n * time_n)


def format_flops(flops: float | None) -> str:
    """Human units: PFLOPS from 1e15 up, TFLOPS, then GFLOPS."""
    if flops is None:
        return "n/a"
    for unit, scale in (("PFLOPS", 1e15), ("TFLOPS", 1e12), ("GFLOPS", 1e9)):
        if flops >= scale:
            return f"{flops / scale:.3g} {unit}"
    return f"{flops / 1e9:.3g} GFLOPS"
