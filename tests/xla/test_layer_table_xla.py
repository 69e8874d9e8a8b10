"""torch_xla's own layer table, measured for real on one XLA-CPU device (the calibration's worker
process, as `podscale calibrate --backends torch-xla` runs it), and what a prediction reads it for."""

from __future__ import annotations

import statistics

from scaling.throughput import calibration, layer_rates, measure
from tests.test_host_step import check_real_table


def test_the_tiny_torch_xla_table_is_measured_in_its_own_process() -> None:
    tab = measure.measure_torch_xla_layers(measure.TINY)
    check_real_table(tab, "torch_xla")
    # torch_xla traces each layer every step: at the tiny grid's shapes a layer costs its tracing,
    # tens of microseconds (35-135 here, whatever the FLOPs), where inside one jax program it pays
    # none (a 16 x 64 dense: a few microseconds). The median of each kind: one copy's cost is the
    # difference of two timings, and under load single entries came out at the 0.1 us clamp
    for kind in ("dense", "conv", "bmm", "layernorm", "softmax"):
        assert statistics.median(p[-1] for p in tab[kind]) > 5e-6, (kind, tab[kind])
    assert calibration.layer_source("torch-xla") == "torch_xla" and "torch_xla" in layer_rates.METHOD


def test_the_spmd_probe_runs_on_two_devices_and_sees_the_weight_grow() -> None:
    """The probe `calibrate --backends torch-xla` runs at each N: one SPMD program over N = 2 devices,
    a 512 x 512 weight's step against a 16 x 16 one's, per optimizer (a MiB of gradient costs
    milliseconds here, never nothing)."""
    got = measure.measure_torch_xla_spmd(2)
    assert got["bytes"] == 4 * (512 * 512 - 16 * 16)
    assert got["adam"] > 1e-4 and got["sgd"] > 1e-4
