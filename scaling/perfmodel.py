"""The throughput model: predicted step time, samples/s, achieved FLOPS, MFU and scaling efficiency.

One rule, for every hardware and every model (DESIGN.md, "The predictor, in one line")::

    step = F_device / (peak * eta)  +  (1 - overlap) * allreduce(grad_bytes, N)

- ``F_device`` = model FLOPs per step / N (forward + backward, from the spec or a published table).
- all-reduce: alpha-beta closed forms. ``ring`` inside a node; ``hierarchical`` (ring inside each node,
  then a ring across nodes through each node's NIC) when N spans nodes; ``tree`` on request.
- eta and overlap: a stated default per hardware *family* (``FAMILY_RULES``), never per case. The
  hidden part of the all-reduce can never exceed the backward pass it hides behind.

On ``host-cpu`` the emulated devices share the host's cores, so the same terms come from
``podscale calibrate`` instead (``scaling.calibrate``), measured per backend at each device count N::

    step = overhead(backend, N)                      # a tiny model's real step: framework + contention
         + sum_layers F_layer / rate(GEMM size) * slowdown(backend, N)   # compute, measured GEMM rates
         + allreduce(grad_bytes, N) - allreduce(tiny model's bytes, N)   # measured collective curve

with overlap 0 (the cores that would run the all-reduce are the ones computing).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Sequence

from scaling import hardware
from scaling.errors import UsageError

# ---- the rule ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    eta: float
    """Fraction of the dense peak a training step's matmuls sustain."""
    overlap: float
    """Fraction of the all-reduce hidden behind the backward pass (capped at the backward time)."""
    basis: str


#: The one documented rule (docs/throughput-model.md). eta 0.5: tuned data-parallel CNN training on
#: GPUs and TPUs sustains about half the dense peak (P100 ResNet-50 fp32 ~220 img/s x 24.6 GFLOP =
#: 5.4 of 10.6 TFLOPS). overlap 0.5: bucketed all-reduce (DDP, Horovod tensor fusion, XLA async
#: collectives) starts during backward but the last buckets finish after it. Catalog CPUs: eta 0.5,
#: no overlap. host-cpu does not use this table: its terms are measured (calibration).
FAMILY_RULES: dict[str, Rule] = {
    "gpu": Rule(0.5, 0.5, "default for GPUs"),
    "tpu": Rule(0.5, 0.5, "default for TPUs"),
    "cpu": Rule(0.5, 0.0, "default for catalog CPUs"),
}


def rule_for(hw: hardware.Hardware) -> Rule:
    return FAMILY_RULES.get(hw.family, FAMILY_RULES["gpu"])


# ---- workloads: specs or published figures --------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """What the predictor needs of a model: FLOPs per sample, gradient bytes, matmul layer sizes."""

    name: str
    params: int
    train_flops_per_sample: float
    grad_bytes: int
    layer_flops: tuple[float, ...] = ()
    """Per-sample training FLOPs of each matmul layer (host-cpu picks a GEMM rate per layer size)."""
    source: str = "spec"


#: Published models for reproducing papers without building them: (params, multiply-adds per image
#: at 224x224 (299 for Inception), citation). Training FLOPs/sample = 3 (fwd + 2x bwd) x 2 x MACs.
PUBLISHED: dict[str, tuple[float, float, str]] = {
    "inception-v3": (23.8e6, 5.7e9, "Szegedy et al. 2016 (Rethinking the Inception Architecture), 299x299; params per Keras applications"),
    "resnet-101": (44.5e6, 7.8e9, "He et al. 2016 (Deep Residual Learning), Table 1: 7.8 x 10^9 FLOPs (multiply-adds)"),
    "resnet-50": (25.6e6, 4.1e9, "He et al. 2016, Table 1: 3.8 x 10^9 multiply-adds; torchvision: 25.6M params, 4.1 GMACs"),
    "vgg-16": (138.4e6, 15.5e9, "Simonyan & Zisserman 2015; torchvision: 138.4M params, 15.5 GMACs"),
    "alexnet": (61.1e6, 0.72e9, "Krizhevsky et al. 2012; torchvision: 61.1M params, 0.72 GMACs"),
}


def workload(model: Any, **opts: Any) -> Workload:
    """A Workload from a ModelSpec, a model name in the zoo, a published name, or a Workload."""
    if isinstance(model, Workload):
        return model
    if isinstance(model, str):
        from models.spec import SPECS, get_spec

        if model in SPECS:
            model = get_spec(model, **opts)
        elif model in PUBLISHED:
            params, macs, cite = PUBLISHED[model]
            return Workload(model, int(params), 6.0 * macs, int(params) * 4, (6.0 * macs,), f"published: {cite}")
        else:
            raise UsageError(f"unknown model {model!r}; valid: {', '.join([*SPECS, *PUBLISHED])}")
    layers = tuple(float(c.forward_flops + c.backward_flops) for c in model.layer_costs() if c.forward_flops)
    return Workload(model.name, model.param_count, float(model.train_flops_per_sample), model.grad_bytes(), layers)


# ---- collectives: alpha-beta closed forms ----------------------------------------------------


def ring_allreduce_bytes(nbytes: float, n: int) -> float:
    """Bytes each device sends in a ring all-reduce (reduce-scatter + all-gather): 2(N-1)/N x bytes."""
    return 2.0 * (n - 1) / n * nbytes if n > 1 else 0.0


def ring_allreduce_time(nbytes: float, n: int, alpha: float, bw: float) -> float:
    """2(N-1) latency hops + 2(N-1)/N x bytes / bandwidth."""
    if n <= 1:
        return 0.0
    return 2 * (n - 1) * alpha + ring_allreduce_bytes(nbytes, n) / bw


def tree_allreduce_time(nbytes: float, n: int, alpha: float, bw: float) -> float:
    """Pipelined (double binary) tree: 2 ceil(log2 N) latency hops, ~2 x bytes / bandwidth."""
    if n <= 1:
        return 0.0
    return 2 * math.ceil(math.log2(n)) * alpha + 2.0 * nbytes / bw


def hierarchical_allreduce_time(nbytes: float, n: int, per_node: int, intra: tuple[float, float],
                                inter: tuple[float, float]) -> float:
    """Reduce-scatter + all-gather inside each node (ring of g = min(N, per_node)), and a ring over
    the M = ceil(N/g) nodes through each node's NIC, which carries the node's whole buffer.
    With one node this is exactly the ring."""
    g = max(1, min(n, per_node))
    m = math.ceil(n / g)
    t = ring_allreduce_time(nbytes, g, *intra)
    if m > 1:
        t += ring_allreduce_time(nbytes, m, *inter)
    return t


def allreduce_time(nbytes: float, n: int, hw: hardware.Hardware, algorithm: str = "auto") -> float:
    """The catalog's all-reduce time for N devices of ``hw``."""
    if n <= 1:
        return 0.0
    intra = (hw.intra_latency or 10e-6, hw.intra_bw or hw.inter_bw or 10e9)
    inter = (hw.inter_latency or intra[0], hw.inter_bw or intra[1])
    per_node = hw.devices_per_node or n
    if algorithm == "ring":
        return ring_allreduce_time(nbytes, n, *(intra if n <= per_node else inter))
    if algorithm == "tree":
        return tree_allreduce_time(nbytes, n, *(intra if n <= per_node else inter))
    if algorithm in ("auto", "hierarchical"):
        return hierarchical_allreduce_time(nbytes, n, per_node, intra, inter)
    raise UsageError(f"unknown all-reduce algorithm {algorithm!r}; valid: auto, ring, tree, hierarchical")


# ---- estimates ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Estimate:
    model: str
    hardware: str
    devices: int
    global_batch: float
    dtype: str
    backend: str | None
    step_time_s: float
    compute_s: float
    comm_s: float
    """Exposed (not hidden) all-reduce time."""
    allreduce_s: float
    """The all-reduce's full time, hidden or not."""
    overhead_s: float
    samples_per_s: float
    model_flops_per_step: float
    achieved_flops: float
    peak_flops: float | None
    """The run's peak: devices x device peak (host-cpu: the host's one shared peak)."""
    peak_dtype: str
    mfu: float | None
    eta: float | None
    overlap: float
    basis: str
    efficiency: float | None = None
    scaling: str | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def per_device_batch(self) -> float:
        return self.global_batch / self.devices

    @property
    def achieved_pflops(self) -> float:
        return self.achieved_flops / 1e15

    def as_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["notes"] = list(self.notes)
        d["per_device_batch"] = self.per_device_batch
        d["achieved_pflops"] = self.achieved_pflops
        return d


def _check_sizes(devices: int, global_batch: float) -> None:
    if not isinstance(devices, int) or devices < 1:
        raise UsageError(f"invalid --devices {devices!r}: must be a positive integer")
    if not global_batch > 0:
        raise UsageError(f"invalid --global-batch {global_batch!r}: must be a positive number of samples")


def predict_step(model_spec: Any, hw_id: str, devices: int, global_batch: float, dtype: str = "float32",
                 backend: str | None = None, algorithm: str = "auto", calibration: Any = None) -> Estimate:
    """Predicted step of data-parallel training of ``model_spec`` on ``devices`` devices of ``hw_id``.

    ``host-cpu`` needs a calibration (``calibration`` or this machine's file) for ``backend``
    (default torch-ddp): UsageError when none exists. Elsewhere the catalog and FAMILY_RULES decide."""
    _check_sizes(devices, global_batch)
    if dtype not in hardware.PEAK_DTYPE:
        raise UsageError(f"invalid --dtype {dtype!r}; valid: {', '.join(hardware.PEAK_DTYPE)}")
    hw = hardware.get(hw_id) if hw_id != "host-cpu" else hardware._build("host-cpu", hardware._raw_catalog())
    hw.check_devices(devices)
    wl = workload(model_spec)
    flops = wl.train_flops_per_sample * global_batch
    if hw.id == "host-cpu":
        return _predict_host(wl, hw, devices, global_batch, dtype, backend or "torch-ddp", calibration)
    key, dev_peak = hw.peak_for(dtype)
    if dev_peak is None:
        raise UsageError(f"{hw.id} has no {key} peak in the catalog (it lists {', '.join(hw.peak_flops) or 'none'})")
    rule = rule_for(hw)
    compute = flops / devices / (dev_peak * rule.eta)
    ar = allreduce_time(wl.grad_bytes, devices, hw, algorithm)
    backward_share = 2.0 / 3.0
    hidden = min(rule.overlap * ar, compute * backward_share)
    step = compute + ar - hidden
    peak = dev_peak * devices
    notes = []
    if key != hardware.PEAK_DTYPE[dtype]:
        notes.append(f"{hw.id} publishes no {hardware.PEAK_DTYPE[dtype]} matmul peak: MFU is against {key}")
    return Estimate(wl.name, hw.id, devices, global_batch, dtype, backend, step, compute, ar - hidden, ar, 0.0,
                    global_batch / step, flops, flops / step, peak, key, flops / step / peak, rule.eta,
                    rule.overlap, f"catalog + {rule.basis} (eta {rule.eta}, overlap {rule.overlap})", notes=tuple(notes))


def _predict_host(wl: Workload, hw: hardware.Hardware, n: int, global_batch: float, dtype: str, backend: str,
                  calibration: Any) -> Estimate:
    from scaling import calibrate

    hw = replace(hw, peak_flops={})  # host-cpu's peak comes from the calibration (no second measurement)
    cal = calibration if calibration is not None else calibrate.load()
    if cal is None:
        raise UsageError("no calibration of this host yet: run `podscale calibrate` (host-cpu predictions are measured, not guessed)")
    terms = calibrate.host_terms(cal, backend, n, dtype)
    per_dev = global_batch / n
    layers = wl.layer_flops or (wl.train_flops_per_sample,)
    compute_1 = sum(f * per_dev / terms.gemm_rate(f * per_dev / 3.0) for f in layers)
    compute = compute_1 * terms.slowdown
    comm = max(0.0, terms.allreduce(wl.grad_bytes) - terms.allreduce(terms.ref_bytes))
    step = terms.overhead + compute + comm
    flops = wl.train_flops_per_sample * global_batch
    key = hardware.PEAK_DTYPE[dtype]
    peak = calibrate.host_peak(cal, key)  # shared by all emulated devices: not multiplied by N
    return Estimate(wl.name, hw.id, n, global_batch, dtype, backend, step, compute, comm, comm, terms.overhead,
                    global_batch / step, flops, flops / step, peak, key, (flops / step / peak) if peak else None,
                    None, 0.0, f"calibration of this host ({backend}, N={n}{', interpolated' if terms.interpolated else ''})")


def device_counts(max_devices: int) -> list[int]:
    """1, 2, 4, ... up to max_devices (which is included even when not a power of two)."""
    out, n = [], 1
    while n < max_devices:
        out.append(n)
        n *= 2
    out.append(max_devices)
    return out


def predict(model_spec: Any, hw_id: str, max_devices: int, *, per_device_batch: float | None = None,
            global_batch: float | None = None, scaling: str = "weak", dtype: str = "float32",
            backend: str | None = None, counts: Sequence[int] | None = None, algorithm: str = "auto",
            calibration: Any = None) -> list[Estimate]:
    """Estimates for N = 1, 2, 4, ... max_devices with scaling efficiency against N = 1.

    weak: fixed per-device batch (default: global_batch / max_devices); efficiency =
    throughput(N) / (N x throughput(1)). strong: fixed global batch; efficiency = time(1) / (N x time(N))."""
    if scaling not in ("weak", "strong"):
        raise UsageError(f"invalid scaling {scaling!r}; valid: weak, strong")
    _check_sizes(max_devices, global_batch if global_batch is not None else (per_device_batch or 1))
    if per_device_batch is None and global_batch is None:
        raise UsageError("give --global-batch (or a per-device batch)")
    if per_device_batch is not None and not per_device_batch > 0:
        raise UsageError(f"invalid per-device batch {per_device_batch!r}: must be positive")
    ns = list(counts) if counts else device_counts(max_devices)
    out: list[Estimate] = []
    base: Estimate | None = None
    for n in ns:
        if scaling == "weak":
            b = per_device_batch if per_device_batch is not None else global_batch / max_devices  # type: ignore[operator]
            gb = b * n
        else:
            gb = global_batch if global_batch is not None else per_device_batch * max_devices  # type: ignore[operator]
        est = predict_step(model_spec, hw_id, n, gb, dtype, backend, algorithm, calibration)
        if base is None:
            base = est if n == 1 else predict_step(model_spec, hw_id, 1, gb / n if scaling == "weak" else gb, dtype,
                                                   backend, algorithm, calibration)
        if scaling == "weak":
            eff = est.samples_per_s / (n * base.samples_per_s)
        else:
            eff = base.step_time_s / (n * est.step_time_s)
        out.append(replace(est, efficiency=eff, scaling=scaling))
    return out


def ensure_calibration(backends: Iterable[str], device_counts: Iterable[int], quick: bool = True,
                       log: Any = None) -> Any:
    """This host's calibration, measuring only the (backend, N) pairs it lacks (for `podscale scale`)."""
    from scaling import calibrate

    return calibrate.ensure(list(backends), list(device_counts), quick=quick, log=log)


def predict_run(cfg: Any, hw_id: str) -> float | None:
    """Predicted step time of a run's config, or None (no calibration, unknown hardware, ...).

    Called by ``scaling.run.finish`` for every run; never calibrates and never raises."""
    try:
        if hw_id != "host-cpu":
            hardware.get(hw_id)
        else:
            from scaling import calibrate

            cal = calibrate.load()
            if cal is None or not calibrate.has_backend(cal, cfg.backend, cfg.devices):
                return None
            if cfg.backend.startswith("jax") and cfg.processes not in (0, 1):
                return None  # calibrated for one process holding all emulated devices
        from models.spec import get_spec

        spec = get_spec(cfg.model, **cfg.model_opts)
        return predict_step(spec, hw_id, cfg.devices, cfg.global_batch, cfg.dtype, cfg.backend).step_time_s
    except Exception:  # noqa: BLE001 - a prediction must never break a finished run
        return None


__all__ = [
    "Estimate", "FAMILY_RULES", "PUBLISHED", "Rule", "Workload", "allreduce_time", "device_counts",
    "ensure_calibration", "hierarchical_allreduce_time", "predict", "predict_run", "predict_step",
    "ring_allreduce_bytes", "ring_allreduce_time", "tree_allreduce_time", "workload",
]
