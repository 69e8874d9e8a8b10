"""The throughput model: predicted step time, samples/s, achieved FLOPS, MFU and scaling efficiency.

One rule, for every catalog hardware and every model (DESIGN.md, "The predictor")::

    step = sum_layers [max(FLOPs / (peak_unit * f_unit), bytes / (mem_bw * f_mem)) + kernels * launch]
         + optimizer update (memory-bound)  +  exposed all-reduce (bucketed behind backward)

- the unit is the one the dtype's matmuls run on (``compute.UNITS``: fp32 CUDA cores, TF32 or 16-bit
  tensor cores, TPU MXUs), f_unit its attainable fraction (``compute.COMPUTE_FRACTION``), and MFU is
  taken against that unit's peak (``peak_dtype``);
- per-layer FLOPs and bytes from the spec's op list (``roofline``); a model known only by a paper's
  FLOPs is compute-only (a lower bound of its time);
- the all-reduce by topology (``collectives``: NVLink/NVSwitch ring in a node, NICs across nodes,
  the TPU torus per chip, DCN between slices), bucketed behind backward by one rule (``roofline``).

On ``host-cpu`` the emulated devices share the host's cores, so the same terms come from
``podscale calibrate`` instead (``scaling.throughput.calibration``), measured per backend at each device count N::

    step = overhead(backend, N)                      # a tiny model's real step: framework + contention
         + sum_layers F_layer / rate(GEMM size) * slowdown(backend, N)   # compute, measured GEMM rates
         + allreduce(grad_bytes, N) - allreduce(tiny model's bytes, N)   # measured collective curve

with overlap 0 (the cores that would run the all-reduce are the ones computing).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

from scaling.backends.jax_env import step_kind
from scaling.errors import UsageError
from scaling.throughput import catalog
from scaling.throughput import host, host_step, partitioner
from scaling.throughput.calibration import (FAMILIES, REF_MODEL_OPTS, WIDE_REF_OPTS, has_backend, host_peak, host_terms,
                                            contention, loglog, sample_bytes)
from scaling.throughput.calibration import load as load_calibration
from scaling.throughput import compute
from scaling.throughput.collectives import allreduce_time
from scaling.throughput.roofline import LayerWork, Rates, flops_only_works, layer_works, sharded_parts, step_parts


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
    op_flops: tuple[float, ...] = ()
    """Measured instead of specified: the FLOPs of each matmul/conv call of one device's training
    step (forward and backward), as a run's first step recorded them at its per-device batch."""
    works: tuple[LayerWork, ...] = ()
    """Per-layer FLOPs and bytes per sample (the roofline's input); empty: compute-only pieces."""
    activations_per_sample: float | None = None
    """Activation values one sample keeps for backward (the spec's layers); None: a paper's figures only."""
    optimizer: str | None = None
    """The update curve a measured run's own optimizer reads (``adam``, ``sgd``); None: unknown, unpriced."""
    leaves: int = 0
    """Gradient tensors (the spec's parameter arrays): XLA-CPU all-reduces them one after another;
    0: unknown, priced as one message."""
    recorded: tuple[LayerWork, ...] = ()
    """A measured run's forward op by op as layers (``host_step.recorded_works``): the host prices
    them from its layer table as it prices a spec's ``works``. Host-only: the ops a CPU step ran are
    not the kernels a GPU would, so the catalog's roofline keeps to the FLOPs."""
    strided_grad_bytes: int | None = None
    """Gradient bytes of the matmul weights whose fan-in XLA's partitioned step reads at the strided
    rate (``partitioner.strided``); None: unknown (a recorded run), every byte priced so."""

    sample_bytes: float | None = None
    """Bytes of one sample's inputs and targets as the data loader hands them over: what the host's
    data term prices (``calibration.DATA_REF_OPTS``); None: unknown, unpriced."""

    def roofline_works(self) -> tuple[LayerWork, ...]:
        return self.works or flops_only_works(self.train_flops_per_sample, self.params)


#: Published models known only by a paper's figures: (params, multiply-adds per image at 299x299,
#: citation). Training FLOPs/sample = 3 (fwd + 2x bwd) x 2 x MACs. Models with an op list are specs
#: instead (``models.named_spec``: resnet50-v1, resnet101(-v1), bert-base/large, gpt2-*, gpt3-*).
PUBLISHED: dict[str, tuple[float, float, str]] = {
    "inception-v3": (23.8e6, 5.7e9, "Szegedy et al. 2016 (Rethinking the Inception Architecture), 299x299; params per Keras applications"),
}


def workload(model: Any, **opts: Any) -> Workload:
    """A Workload from a ModelSpec, a model name (zoo, named, published) or a Workload.

    Names: the zoo's (``resnet50`` = ResNet-50 v1.5 as torchvision and NVIDIA name it; ``resnet-50``
    is the same), the named specs (``resnet50-v1`` = He et al.'s v1, ``bert-base``, ``gpt3-175b``, ...),
    then the paper-only entries of PUBLISHED."""
    if isinstance(model, Workload):
        return model
    name = None
    if isinstance(model, str):
        from models.errors import did_you_mean
        from models.named_spec import NAMED, named_spec
        from models.spec import SPECS, canonical_model_name, get_spec

        if model in PUBLISHED:  # a paper's figures, by the paper's name
            params, macs, cite = PUBLISHED[model]
            return Workload(model, int(params), 6.0 * macs, int(params) * 4, (6.0 * macs,), f"published: {cite}")
        named = named_spec(model, **opts)
        if named is not None:
            name, model = model, named
        elif canonical_model_name(model) in SPECS:
            model = get_spec(model, **opts)
        else:
            valid = [*SPECS, *NAMED, *PUBLISHED]
            raise UsageError(f"unknown model {model!r}{did_you_mean(model, valid)}; valid: {', '.join(valid)}")
    costs = model.layer_costs()
    layers = tuple(float(c.forward_flops + c.backward_flops) for c in costs if c.forward_flops)
    works = layer_works(costs, math.prod(model.input_shape))
    return Workload(name or model.name, model.param_count, float(model.train_flops_per_sample), model.grad_bytes(), layers,
                    works=works, activations_per_sample=float(model.activations_per_sample),
                    leaves=len(model.param_shapes()),
                    strided_grad_bytes=partitioner.strided_bytes(list(model.param_shapes().values())),
                    sample_bytes=sample_bytes(model))


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
    unit: str | None = None
    """The execution unit the matmuls ran on (compute.UNITS); MFU is against its peak."""
    fraction_source: str | None = None
    memory_bound_s: float = 0.0
    """Time of the memory-bound layer pieces (norms, activations, pools, embeddings), in compute_s."""
    launch_s: float = 0.0
    slices: int = 1
    data_s: float = 0.0
    """Placing the step's batch on the devices (host-cpu: the reference's measured data part, plus
    the batch's extra bytes at the data reference's rate); in ``step_time_s``, not in ``overhead_s``."""

    @property
    def mfu_flag(self) -> str | None:
        """Why the MFU cannot be taken at face value (above 100%: the peak or the FLOP count is wrong)."""
        if self.mfu is None or self.mfu <= 1.0:
            return None
        return "above 100% of peak: the peak or the FLOP count is wrong"

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
        d["mfu_flag"] = self.mfu_flag
        return d


def _check_sizes(devices: int, global_batch: float) -> None:
    if not isinstance(devices, int) or devices < 1:
        raise UsageError(f"invalid --devices {devices!r}: must be a positive integer")
    if not global_batch > 0:
        raise UsageError(f"invalid --global-batch {global_batch!r}: must be a positive number of samples")


def predict_step(model_spec: Any, hw_id: str, devices: int, global_batch: float, dtype: str = "float32",
                 backend: str | None = None, algorithm: str = "auto", calibration: Any = None, slices: int = 1,
                 sharding: str = "none", optimizer: str = "adam") -> Estimate:
    """Predicted step of data-parallel training of ``model_spec`` on ``devices`` devices of ``hw_id``.

    ``host-cpu`` needs a calibration (``calibration`` or this machine's file) for ``backend``
    (default torch-ddp): UsageError when none exists. Elsewhere the catalog and ``compute`` decide."""
    _check_sizes(devices, global_batch)
    if dtype not in catalog.PEAK_DTYPE:
        raise UsageError(f"invalid --dtype {dtype!r}; valid: {', '.join(catalog.PEAK_DTYPE)}")
    hw = catalog.get(hw_id) if hw_id != "host-cpu" else catalog._build("host-cpu", catalog._raw_catalog())
    hw.check_devices(devices, slices)
    wl = workload(model_spec)
    flops = wl.train_flops_per_sample * global_batch
    if hw.id == "host-cpu":
        compute.check_dtype(hw, dtype)
        est = _predict_host(wl, hw, devices, global_batch, dtype, backend or "torch-ddp", calibration, optimizer)
        if sharding != "none" and devices > 1:
            est = replace(est, notes=est.notes + ("--sharding is not priced on host-cpu yet: its calibration measured "
                                                  "all-reduce only, so this is the replicated step",))
        return est
    key, dev_peak = compute.check_dtype(hw, dtype)
    frac = compute.compute_fraction(hw, key)
    rates = Rates(dev_peak * frac.value, (hw.memory_bw or 1e12) * compute.memory_fraction(hw).value,
                  compute.launch_s(hw).value, 2 if dtype in ("float16", "bfloat16") else 4)
    def ar(b: float) -> float:
        return allreduce_time(b, devices, hw, algorithm, slices)

    works, batch, hidden = wl.roofline_works(), global_batch / devices, compute.OVERLAP_HIDDEN.value
    if sharding == "none" or devices == 1:
        parts = step_parts(works, batch, rates, wl.grad_bytes, ar, hidden)
    else:
        parts = sharded_parts(works, batch, rates, wl.grad_bytes, ar, hidden, sharding, devices)
    peers = peer_step_s(hw, devices)
    step = parts.step_s + peers
    peak = dev_peak * devices
    notes = []
    if key != catalog.PEAK_DTYPE[dtype]:
        notes.append(f"{hw.id} publishes no {catalog.PEAK_DTYPE[dtype]} matmul peak: MFU is against {key}")
    if not wl.works:
        notes.append(f"{wl.name}: no op list (a paper's FLOPs only): compute-only, memory-bound layers not modelled")
    if dtype == "float32" and "tf32" in hw.peak_flops:
        notes.append("float32 = FP32 CUDA cores; frameworks that run convolutions/matmuls in TF32 by default "
                     "(cuDNN, JAX on GPU) are --dtype tf32")
    unit = compute.unit_for(hw, key)
    basis = (f"roofline: {unit} at {frac.value:g} of peak ({frac.basis}), memory at "
             f"{compute.memory_fraction(hw).value:g} of bandwidth; all-reduce {'torus' if hw.ici_link_bw else 'by node topology'}, "
             f"bucketed behind backward" if sharding == "none" or devices == 1 else
             f"sharded ({sharding}): per-unit all-gathers and reduce-scatters, prefetched one unit ahead")
    if peers:
        basis += f"; overhead {compute.PEER_STEP_S.value * 1e3:g} ms a further GPU in the node (fitted)"
    return Estimate(wl.name, hw.id, devices, global_batch, dtype, backend, step, parts.compute_s, parts.exposed_comm_s,
                    parts.allreduce_s, peers, global_batch / step, flops, flops / step, peak, key, flops / step / peak,
                    frac.value, 1.0 - (parts.exposed_comm_s / parts.allreduce_s if parts.allreduce_s else 0.0), basis,
                    notes=tuple(notes), unit=unit, fraction_source=frac.source, memory_bound_s=parts.memory_bound_s,
                    launch_s=parts.launch_s, slices=slices)


def peer_step_s(hw: catalog.Hardware, devices: int) -> float:
    """The GPU step's cost of the other GPUs in its node (``compute.PEER_STEP_S`` each), beyond the
    all-reduce: published single-node steps grow by about a millisecond a GPU whatever the link and
    the precision, which no bandwidth term reproduces. Across nodes each node pays it once, in parallel."""
    if hw.family != "gpu" or devices <= 1:
        return 0.0
    return compute.PEER_STEP_S.value * (min(devices, hw.devices_per_node or devices) - 1)


def _ref_spec() -> Any:
    """The calibration's reference model: its layers and update are in the measured overhead already."""
    from models.spec import get_spec

    return get_spec("mlp", **REF_MODEL_OPTS)


def _predict_host(wl: Workload, hw: catalog.Hardware, n: int, global_batch: float, dtype: str, backend: str,
                  calibration: Any, optimizer: str = "adam") -> Estimate:
    hw = replace(hw, peak_flops={})  # host-cpu's peak comes from the calibration (no second measurement)
    cal = calibration if calibration is not None else load_calibration()
    if cal is None:
        raise UsageError("no calibration of this host yet: run `podscale calibrate` (host-cpu predictions are measured, not guessed)")
    terms = host_terms(cal, backend, n, dtype)
    per_dev = global_batch / n
    works = wl.works or wl.recorded
    by_layers = bool(works) and host_step.has_table(terms.layers) and dtype == "float32"
    if by_layers:
        # the spec's (or the run's recorded) layers at their shapes, from the measured layer table,
        # less the reference model's own layers and update (its measured step, the overhead, holds
        # them already). A recorded run's update is its own optimizer's (None: unpriced on both sides).
        # Each piece at N devices is slowed by the GEMM contention or takes what N devices moving
        # its bytes take, whichever is more (``host_step.contended_seconds``)
        opt = optimizer if wl.works else wl.optimizer
        # a spec's parameter tensors each add to the update (the reference's four, in its overhead,
        # are taken out with it); a recorded run does not know its tensors: the curve's own count
        tensors, ref_tensors = (wl.leaves, len(_ref_spec().param_shapes())) if wl.works and wl.leaves else (0, 0)
        compute = _net_compute(works, per_dev, terms, opt, None if wl.works else wl.params, tensors, ref_tensors)
    elif wl.op_flops:  # measured calls without a forward record (an older run): each one GEMM/conv of that many FLOPs
        compute_1 = sum(f / terms.gemm_rate(f) for f in wl.op_flops)
        if wl.optimizer and host_step.has_table(terms.layers):
            # plus the run's own optimizer update by its parameters, less the reference's (in its overhead)
            compute_1 += max(0.0, host_step.update_seconds(wl.params, terms.layers, wl.optimizer)  # type: ignore[arg-type]
                             - host_step.update_seconds(_ref_spec().param_count, terms.layers, wl.optimizer))  # type: ignore[arg-type]
    else:
        layers = wl.layer_flops or (wl.train_flops_per_sample,)
        compute_1 = sum(f * per_dev / terms.gemm_rate(f * per_dev / 3.0) for f in layers)
    if not by_layers:
        compute = compute_1 * terms.slowdown
    in_step = _gloo_byte_cost(cal, backend, n) if n > 1 and by_layers else None
    if in_step is not None:  # gloo: a byte's cost in a real step, not in the probe's idle all-reduce
        comm = in_step * (wl.grad_bytes - terms.ref_bytes)
    else:
        comm = terms.allreduce(wl.grad_bytes) - terms.allreduce(terms.ref_bytes)
    if wl.leaves:  # each tensor beyond the first pays the collective's latency, as the reference's did
        comm += terms.leaf_s * (wl.leaves - len(_ref_spec().param_shapes()))
    if terms.gspmd and (backend == "torch-xla" or (backend == "jax-sharded" and step_kind() == "jit")):
        # XLA's partitioned step pays for each gradient byte beyond its all-reduce (jax-sharded:
        # ``partitioner``, strided and plain weights each at their rate; torch-xla: its SPMD probe,
        # one rate); an unknown optimizer: the cheapest measured. The reference's bytes are plain.
        opt = (optimizer if wl.works else wl.optimizer) or ""
        rates = {k: v for k, v in terms.gspmd.items() if not k.endswith(partitioner.PLAIN)}
        plains = {k[:-len(partitioner.PLAIN)]: v for k, v in terms.gspmd.items() if k.endswith(partitioner.PLAIN)}
        per_byte = rates.get(opt, min(rates.values()))
        plain = plains.get(opt, min(plains.values())) if plains else per_byte  # an older calibration: one rate
        strided = wl.grad_bytes if wl.strided_grad_bytes is None else wl.strided_grad_bytes
        comm += per_byte * strided + plain * max(0.0, wl.grad_bytes - strided - terms.ref_bytes)
    comm = max(0.0, comm)
    overhead, data = terms.overhead, 0.0
    cost = _data_cost(cal, backend, n)
    if cost is not None and wl.sample_bytes:  # the reference's own data part moves from the overhead to data
        ref_data, ref_bytes, per_byte = cost
        ref_data = min(ref_data, terms.overhead)  # an extrapolated part of the step, never more than it
        overhead, data = terms.overhead - ref_data, ref_data + per_byte * max(0.0, per_dev * wl.sample_bytes - ref_bytes)
    step = overhead + data + compute + comm
    flops = wl.train_flops_per_sample * global_batch
    key = catalog.PEAK_DTYPE[dtype]
    peak = host_peak(cal, key)  # shared by all emulated devices: not multiplied by N
    return Estimate(wl.name, hw.id, n, global_batch, dtype, backend, step, compute, comm, comm, overhead,
                    global_batch / step, flops, flops / step, peak, key, (flops / step / peak) if peak else None,
                    None, 0.0, f"calibration of this host ({backend}, N={n}{', interpolated' if terms.interpolated else ''})",
                    data_s=data)


def _net_compute(works: Sequence[LayerWork], per_dev: float, terms: Any, opt: str | None, params: float | None,
                 tensors: int, ref_tensors: int) -> float:
    """The layers and update of ``works`` at N devices (each piece slowed by the GEMM contention or
    taking what N devices moving its bytes take, whichever is more: ``host_step.contended_seconds``),
    less the reference model's own, which its measured step (the overhead) holds already."""
    ref = layer_works(_ref_spec().layer_costs(), REF_MODEL_OPTS["d_in"])
    return max(0.0, host_step.contended_seconds(works, per_dev, terms.layers, opt, terms.slowdown, terms.stream_seconds,
                                                params, tensors)
               - terms.slowdown * host_step.step_seconds(ref, 1.0, terms.layers, opt, None, ref_tensors))


def _gloo_byte_cost(cal: Any, backend: str, n: int) -> float | None:
    """Seconds per gradient byte beyond the reference's in a real gloo step at N: the wide
    reference's step less the reference's and less the wide one's own layers and update, over the
    bytes between them (``calibration.WIDE_REF_OPTS``); log-log in N between calibrated counts.
    None: not gloo, or a calibration without the wide reference (the all-reduce probe prices it)."""
    from models.spec import get_spec

    if FAMILIES.get(backend, ("",))[0] != "gloo":
        return None
    per_n = {int(k): v for k, v in cal.get("backends", {}).get(backend, {}).get("per_n", {}).items()
             if int(k) > 1 and "wide_step_s" in v}
    if not per_n or (n not in per_n and len(per_n) < 2):
        return None
    wide = get_spec("mlp", **WIDE_REF_OPTS)
    works = layer_works(wide.layer_costs(), WIDE_REF_OPTS["d_in"])
    ref_tensors = len(_ref_spec().param_shapes())
    rates = {}
    for m, e in per_n.items():
        terms = host_terms(cal, backend, m)
        if not host_step.has_table(terms.layers):
            return None
        # the references train with the run's default optimizer, Adam
        own = _net_compute(works, 1.0, terms, "adam", None, len(wide.param_shapes()), ref_tensors)
        extra = e["wide_grad_bytes"] - terms.ref_bytes
        rates[m] = max(1e-15, (e["wide_step_s"] - e["overhead_s"] - own) / extra)
    if n in rates:
        return rates[n]
    ms = sorted(rates)
    return loglog(ms, [rates[m] for m in ms], n)


def _data_cost(cal: Any, backend: str, n: int) -> tuple[float, float, float] | None:
    """(the reference's data part, its bytes a device, seconds per byte beyond them) at N: the data
    reference's probe less the reference's, over the bytes between them. At an N the calibration
    never ran, the cores' share (``contention``: N XLA devices placed by one process, N gloo ranks
    on C cores) is taken out, the rest taken log-log between the calibrated counts around N, or
    held at the nearest one's beyond them: a rate near zero at N = 1 (a difference of two noisy
    probes) extrapolated log-log from N = 1, 2 put a CI run's N = 4 at twice its measured step.
    None: a calibration without the data reference (or torch-xla, which has no probes)."""
    per_n = {int(k): v for k, v in cal.get("backends", {}).get(backend, {}).get("per_n", {}).items() if "data_wide_s" in v}
    if not per_n:
        return None
    fam, cores = FAMILIES[backend][0], int(cal.get("cores") or host.host_cores())
    ms = sorted(per_n)
    ref_bytes = float(per_n[ms[0]]["data_bytes"])

    def rate(e: dict[str, Any]) -> float:
        return max(0.0, (e["data_wide_s"] - e["data_s"]) / (e["data_wide_bytes"] - e["data_bytes"]))

    def at(value: Any) -> float:
        if n in per_n:
            return float(value(per_n[n]))
        below, above = [m for m in ms if m < n], [m for m in ms if m > n]
        norm = {m: max(1e-15, value(per_n[m])) / contention(fam, m, cores) for m in ms}
        if below and above:
            return contention(fam, n, cores) * loglog([below[-1], above[0]], [norm[below[-1]], norm[above[0]]], n)
        return contention(fam, n, cores) * norm[below[-1] if below else above[0]]
    return at(lambda e: e["data_s"]), ref_bytes, at(rate)


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
            calibration: Any = None, slices: int = 1, sharding: str = "none") -> list[Estimate]:
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
        # the largest count spans the slices; a smaller one spans as many slices of that size as it fills
        k = slices if n == ns[-1] else max(1, math.ceil(n / max(1, ns[-1] // slices)))
        while n % k:
            k += 1
        est = predict_step(model_spec, hw_id, n, gb, dtype, backend, algorithm, calibration, k, sharding)
        if base is None:
            base = est if n == 1 else predict_step(model_spec, hw_id, 1, gb / n if scaling == "weak" else gb, dtype,
                                                   backend, algorithm, calibration)
        if scaling == "weak":
            eff = est.samples_per_s / (n * base.samples_per_s)
        else:
            eff = base.step_time_s / (n * est.step_time_s)
        out.append(replace(est, efficiency=eff, scaling=scaling))
    return out


def predict_run(cfg: Any, hw_id: str, measured: Workload | None = None) -> float | None:
    """Predicted step time of a run's config, or None (no calibration, unknown hardware, ...).

    Called by ``scaling.run.finish`` for every run; never calibrates and never raises."""
    try:
        if hw_id != "host-cpu":
            catalog.get(hw_id)
        else:
            cal = load_calibration()
            if cal is None or not has_backend(cal, cfg.backend, cfg.devices):
                return None
            if cfg.backend.startswith("jax") and cfg.processes not in (0, 1):
                return None  # calibrated for one process holding all emulated devices
        if measured is None:
            from models.spec import get_spec

            measured = workload(get_spec(cfg.model, **cfg.model_opts))
        return predict_step(measured, hw_id, cfg.devices, cfg.global_batch, cfg.dtype, cfg.backend,
                            optimizer=cfg.optimizer).step_time_s
    except Exception:  # noqa: BLE001 - a prediction must never break a finished run
        return None


