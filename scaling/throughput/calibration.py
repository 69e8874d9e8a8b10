"""This host's calibration, read: the file, and the terms the host-cpu prediction is composed from.

The measuring half (``scaling.throughput.measure``) writes the file; this half never starts a
process or times anything, so a prediction reads the same numbers every time. What is measured,
per backend and device count N:

- ``overhead``: the median step of a tiny reference model (an mlp of a few hundred parameters) run
  through the real backend: framework, optimizer, synchronisation and contention at N, with next
  to no FLOPs and bytes;
- ``slowdown``: how much longer a fixed GEMM takes on each of N devices running at once than on one
  device alone (1.0 for N <= cores in an idle machine, ~N/cores beyond);
- the all-reduce curve: seconds vs message bytes with the backend's own collective (gloo for
  torch-ddp, XLA-CPU psum for jax-*), with its alpha-beta fit;
- once per host: GEMM rates for square sizes on 1 ... all cores (torch) and for one XLA-CPU device,
  and one device's forward + backward of each kind of layer on a grid of shapes and its optimizer
  update on a grid of sizes (``layer_rates``; ``host_step`` composes a model's step from them).

The file (``calibration-<env>.json`` in ``host.cache_dir()``, one per framework environment) is
keyed by the host fingerprint and the framework versions; it is written atomically and merged, so
calibrating one more backend or N keeps the rest.
"""

from __future__ import annotations

import bisect
import copy
import importlib.metadata
import json
import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from scaling.errors import UsageError
from scaling.throughput import catalog, host, layer_rates

def _env_tag() -> str:
    """A short tag of this environment's frameworks: .venv (torch 2.13, jax 0.10) and .venv-xla (torch
    2.9, jax 0.7, torch_xla) calibrate the same host differently and must not overwrite each other."""
    import hashlib

    vers = {pkg: framework_version(pkg) for pkg in ("torch", "jax", "torch_xla")}
    return hashlib.sha1(json.dumps(vers, sort_keys=True).encode()).hexdigest()[:8]


VERSION = 1
#: backend -> (collective family, framework package whose version keys the entries)
FAMILIES = {"torch-ddp": ("gloo", "torch"), "jax-pmap": ("xla-cpu", "jax"), "jax-sharded": ("xla-cpu", "jax"),
            # torch_xla's SPMD step runs on the same XLA-CPU runtime: its collectives and GEMMs are
            # measured through jax (installed beside it in .venv-xla), its overhead through itself
            "torch-xla": ("xla-cpu", "torch_xla")}
REF_MODEL_OPTS = {"d_in": 16, "hidden": 16, "d_out": 1}
WIDE_REF_OPTS = {"d_in": 512, "hidden": 512, "d_out": 1}
"""Gloo's second reference (1.05 MB of gradients, one sample a device): what a gradient byte costs
in a real DDP step at N, beyond the reference's. The all-reduce probe alone, timed while no rank
computes, priced the 404 KB of an mlp's gradients at 0.2 ms at N = 4 on 2 cores; in the step they
cost 1.3-1.9 ms, since ranks that compute hold the cores gloo's readers need."""


DATA_REF_OPTS = {"d_in": 4096, "hidden": 1, "d_out": 1}
DATA_REF_BATCH = 64
"""The data reference: 64 samples a device of 4096 inputs (1.05 MB a device a step) through a model
of 4097 weights, whose breakdown probe times what a batch's bytes cost to reach the devices beyond
the reference's 68 (``data_s``). A step's input placement is no part of the layer table; measured
here (2 cores, 256 KB a device): 0.03 -> 0.18 ms at N = 4 on torch-ddp, 0.21 -> 0.40 on jax-sharded."""


def sample_bytes(spec: Any) -> int | None:
    """One sample of a spec's own synthetic data, as a run feeds it: inputs and targets; None for a
    spec without data of its own (its batches' bytes stay unpriced)."""
    try:
        x, y = spec.synthetic_data(1, 0, teacher=False)
    except Exception:  # noqa: BLE001
        return None
    return int(x.nbytes + y.nbytes)


def mlp_sample_bytes(opts: dict[str, int]) -> int:
    """One sample's bytes of the references' mlp (``REF_MODEL_OPTS``, ``DATA_REF_OPTS``)."""
    from models.spec import get_spec

    return sample_bytes(get_spec("mlp", **opts)) or 0


def gemm_source(backend: str) -> str:
    """Which GEMM table a backend's compute is predicted from: torch's (gloo ranks) or XLA's (via jax)."""
    return "torch" if FAMILIES[backend][0] == "gloo" else "jax"


def layer_source(backend: str) -> str:
    """Which layer table a backend's step is composed from: the framework that traces its layers.
    torch-xla's own (``layer_rates_xla``): it traces every layer every step and lowers it its own
    way (gpt-tiny on one device: 46.5 ms measured, 47.3 from its own table, 29.5 from jax's)."""
    return "torch_xla" if backend == "torch-xla" else gemm_source(backend)

"""The reference model: mlp 16-16-1 (289 parameters): a step that is all overhead."""

def path() -> Path:
    return host.cache_dir() / FILE_NAME


def framework_version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


FILE_NAME = f"calibration-{_env_tag()}.json"


# ---- the file ------------------------------------------------------------------------------


def load(p: Path | None = None) -> dict[str, Any] | None:
    """This host's calibration, with entries of stale framework versions dropped; None if absent."""
    p = p or path()
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    if data.get("version") != VERSION or data.get("host") != host.host_fingerprint():
        return None
    for backend in list(data.get("backends", {})):
        pkg = FAMILIES.get(backend, ("", ""))[1]
        if data["backends"][backend].get("framework_version") != framework_version(pkg):
            del data["backends"][backend]
    for section in ("gemm", "layers"):
        tables = data.get(section, {})
        for fw in list(tables):
            if tables[fw].get("framework_version") != framework_version(fw) or (
                    section == "layers" and tables[fw].get("method", 1) != layer_rates.METHOD.get(fw, 1)):
                del tables[fw]
    return data


def save(data: dict[str, Any], p: Path | None = None) -> Path:
    p = p or path()
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, p)
    return p


def _empty() -> dict[str, Any]:
    return {"version": VERSION, "host": host.host_fingerprint(), "cores": host.host_cores(),
            "gemm": {}, "layers": {}, "collectives": {}, "backends": {}}


def has_backend(cal: dict[str, Any], backend: str, n: int | None = None) -> bool:
    """Whether ``backend`` is calibrated (at ``n`` or within its calibrated range of N)."""
    b = cal.get("backends", {}).get(backend)
    if not b or not b.get("per_n"):
        return False
    fam = FAMILIES.get(backend, ("",))[0]
    if not cal.get("gemm", {}).get("torch" if fam == "gloo" else "jax"):
        return False
    return n is None or n <= max(int(k) for k in b["per_n"]) or len(b["per_n"]) >= 2


# ---- the terms the predictor reads -----------------------------------------------------------


def _interp(xs: list[float], ys: list[float], x: float, log: bool = True) -> float:
    """Piecewise-linear interpolation (in log x when ``log``); flat beyond the ends."""
    if len(xs) == 1:
        return ys[0]
    f = (lambda v: math.log(v)) if log else (lambda v: v)
    if x <= xs[0]:
        return ys[0]
    if x >= xs[-1]:
        return ys[-1]
    i = bisect.bisect_right(xs, x)
    x0, x1 = f(xs[i - 1]), f(xs[i])
    w = (f(x) - x0) / (x1 - x0)
    return ys[i - 1] + w * (ys[i] - ys[i - 1])


@dataclass(frozen=True)
class HostTerms:
    overhead: float
    slowdown: float
    points: tuple[tuple[float, float], ...]
    """(bytes, seconds) of the all-reduce at this N."""
    alpha: float
    bw: float
    ref_bytes: float
    rates: tuple[tuple[float, float], ...]
    """(GEMM FLOPs, FLOPS) for one device alone."""
    interpolated: bool
    layers: dict[str, Any] | None = None
    """One device's measured layer and optimizer costs (``layer_rates``); None: an older calibration."""
    leaf_s: float = 0.0
    """What each gradient tensor beyond the first adds to an all-reduce of the same bytes (XLA-CPU
    reduces a pytree's leaves one after another); 0: one message (gloo: DDP's buckets)."""
    stream: tuple[tuple[float, float], ...] = ()
    """(bytes each device moves, seconds) of a memory-bound update on all N devices at once; empty:
    an older calibration (no memory floor)."""
    gspmd: dict[str, float] = field(default_factory=dict)
    """Seconds per gradient byte that a partitioned step costs beyond its all-reduce, by optimizer:
    jax-sharded's jit step against the same step with the all-reduce stated (``partitioner``),
    torch-xla's SPMD step beyond one device's (``layer_rates_xla.spmd_probe``); empty: none."""

    def stream_seconds(self, nbytes: float) -> float:
        """What N devices each moving ``nbytes`` at once take at least: log-log between the probe's
        sizes, proportional to the bytes beyond them; 0 without a probe."""
        if not self.stream or nbytes <= 0:
            return 0.0
        xs = [p[0] for p in self.stream]
        if nbytes <= xs[0] or nbytes >= xs[-1]:
            b, t = self.stream[0] if nbytes <= xs[0] else self.stream[-1]
            return t * nbytes / b
        return loglog(xs, [p[1] for p in self.stream], nbytes)

    def allreduce(self, nbytes: float) -> float:
        """Measured curve between the points; alpha-beta fit's slope beyond the largest."""
        if not self.points:
            return 0.0
        xs = [p[0] for p in self.points]
        ys = [p[1] for p in self.points]
        if nbytes > xs[-1]:
            return ys[-1] + (nbytes - xs[-1]) / self.bw
        if nbytes <= xs[0]:
            return ys[0]
        return _interp(xs, ys, nbytes, log=False)

    def gemm_rate(self, gemm_flops: float) -> float:
        """The rate one device sustains on a GEMM of this many FLOPs (interpolated on log size)."""
        xs = [r[0] for r in self.rates]
        ys = [r[1] for r in self.rates]
        return max(1.0, _interp(xs, ys, max(gemm_flops, 1.0)))


def host_terms(cal: dict[str, Any], backend: str, n: int, dtype: str = "float32") -> HostTerms:
    """The calibrated terms for ``backend`` at N devices (log-interpolated between calibrated N)."""
    if backend not in FAMILIES:
        raise UsageError(f"backend {backend!r} is not calibrated on host-cpu; calibrated backends: {', '.join(FAMILIES)}")
    b = cal.get("backends", {}).get(backend)
    if not b or not b.get("per_n"):
        raise UsageError(f"no calibration for {backend} on this host: run `podscale calibrate --backends {backend}`")
    fam = FAMILIES[backend][0]
    fw = gemm_source(backend)
    gemm = cal.get("gemm", {}).get(fw, {})
    key = catalog.PEAK_DTYPE.get(dtype, "fp32")
    table = gemm.get(key) or gemm.get("fp32")
    if not table:
        raise UsageError(f"no GEMM calibration for {fw} on this host: run `podscale calibrate`")
    threads = "1" if fw == "torch" else "device"
    rates = tuple(sorted((2.0 * int(s) ** 3, r) for s, r in table[threads].items()))
    per_n = {int(k): v for k, v in b["per_n"].items()}
    ns = sorted(per_n)
    coll = cal.get("collectives", {}).get(fam, {})

    def stream_at(m: int) -> list[tuple[float, float]]:
        return monotone(sorted((float(b), float(t)) for b, t in coll.get(str(m), {}).get("stream") or []))

    def at(m: int) -> tuple[float, float, list[tuple[float, float]], float, float]:
        e = per_n[m]
        c = coll.get(str(m), {"points": [], "alpha": 0.0, "bw": float("inf")})
        return e["overhead_s"], e["slowdown"], [tuple(p) for p in c["points"]], c["alpha"], c["bw"]

    ref_bytes = float(b.get("ref_grad_bytes", 0))
    layers = cal.get("layers", {}).get(layer_source(backend)) or None
    cores = int(cal.get("cores") or host.host_cores())

    def tax_at(m: int) -> dict[str, float]:
        """The partitioned step's cost per gradient byte at m devices, by optimizer. jax-sharded: its
        jit step less the shard_map one (``partitioner``). torch-xla: how much more its SPMD step
        grows with a weight's bytes than one device's growth slowed by the cores' contention
        (``layer_rates_xla.spmd_probe``)."""
        if backend != "torch-xla":
            return dict(coll.get(str(m), {}).get("gspmd") or {})
        p, p1 = per_n[m].get("spmd"), per_n.get(1, {}).get("spmd")
        if m < 2 or not p or not p1:
            return {}
        slow = floor(fam, m, cores, per_n[m]["slowdown"])
        return {opt: max(0.0, p[opt] - slow * p1[opt]) / p["bytes"] for opt in ("adam", "sgd") if opt in p and opt in p1}
    if n in per_n:
        o, s, pts, a, bw = at(n)
        if n == 1:  # one device all-reduces nothing: no backend runs a collective at N = 1
            pts, a, bw = [], 0.0, float("inf")
            # and is the device alone the layer table measured: its "slowdown" (1.14 once) and its
            # memory probe (page faults into fresh buffers: 2.1 ms at 20 MiB, 1.8 at 40) are noise
            return HostTerms(o, 1.0, (), 0.0, float("inf"), ref_bytes, rates, False, layers)  # type: ignore[arg-type]
        return HostTerms(o, floor(fam, n, cores, s), tuple(pts), a, bw, ref_bytes, rates, False, layers,  # type: ignore[arg-type]
                         float(coll.get(str(n), {}).get("leaf_s") or 0.0), tuple(stream_at(n)), tax_at(n))
    # an N the calibration never ran: each term from the calibrated counts around it (log-log), or
    # from the nearest two beyond the range, with what is known about N devices on C cores taken out
    # first: ``contention`` is the slowdown the cores alone explain, and only the rest is interpolated
    if len(ns) < 2:
        raise UsageError(f"{backend} is calibrated at N={ns[0]} only; run `podscale calibrate --devices 1,2,4,8`")
    # the overhead is per-rank CPU work too: N gloo ranks do it on C cores (across N = C, where
    # plain log-log from N = 1, 2 gave 5 ms at N = 4 on 2 cores and the step took 7.6-11)
    if fam == "gloo" and 1 in per_n:
        o = gloo_overhead({m: per_n[m]["overhead_s"] for m in ns}, n, cores)
    else:
        o = contention(fam, n, cores) * loglog(ns, [per_n[m]["overhead_s"] / contention(fam, m, cores) for m in ns], n)
    s = contention(fam, n, cores) * loglog(ns, [per_n[m]["slowdown"] / contention(fam, m, cores) for m in ns], n)
    # one device has nothing to all-reduce: its "collective" is a no-op, not a point on the curve
    multi = [m for m in ns if m >= 2 and str(m) in coll] if n >= 2 else []
    if not multi:
        pts, a, bw = [], 0.0, float("inf")
    else:
        curves = [at(m) for m in multi]
        xs = [p[0] for p in curves[0][2]]
        same = all([p[0] for p in c[2]] == xs for c in curves)
        if same and min(multi) <= n <= max(multi):  # between two calibrated curves: point by point
            pts = monotone([(x, loglog(multi, [c[2][i][1] for c in curves], n)) for i, x in enumerate(xs)])
        elif same:
            # beyond them the smallest message's time (latency, and at N > C the scheduling of N
            # ranks) and each larger message's time past it are extrapolated apart: point by point, a
            # latency growing 50x from N = 2 to 8 swamps the bytes' share and the curve comes out
            # falling with size (gloo from N = 2, 8 to 16 here: 160 ms at 1 KiB, 67 ms at 1 MiB)
            base = loglog(multi, [c[2][0][1] for c in curves], n)
            inc = [loglog(multi, [max(c[2][i][1] - c[2][0][1], 1e-9) for c in curves], n) for i in range(len(xs))]
            pts = monotone([(x, base + (d if i else 0.0)) for i, (x, d) in enumerate(zip(xs, inc))])
        else:
            pts = list(curves[-1][2])
        a = loglog(multi, [max(c[3], 1e-9) for c in curves], n)
        bw = loglog(multi, [c[4] for c in curves], n)
        if len(multi) == 1:  # one curve to go on: a ring moves 2(N-1)/N of the bytes per device
            k = ((n - 1) / n) / ((multi[0] - 1) / multi[0])
            pts, bw = [(x, t * k) for x, t in pts], bw / k
    # the memory probe, size by size, as the slowdown: the cores' share out, the rest log-log in N
    probed = [m for m in ns if m >= 2 and stream_at(m)]
    sizes = [b for b, _ in stream_at(probed[0])] if probed else []
    probed = [m for m in probed if [b for b, _ in stream_at(m)] == sizes]
    # (one multi-device count to go on: the cores' share alone carries it to N, as for a leaf below)
    stream = [(b, contention(fam, n, cores) * loglog(probed, [stream_at(m)[i][1] / contention(fam, m, cores) for m in probed], n))
              for i, b in enumerate(sizes)]
    leaves = [m for m in multi if coll[str(m)].get("leaf_s")]
    leaf = contention(fam, n, cores) * loglog(leaves, [coll[str(m)]["leaf_s"] / contention(fam, m, cores) for m in leaves], n) \
        if leaves else 0.0
    # the partitioner's cost per byte, optimizer by optimizer, as a leaf's: the cores' share out
    taxed = [m for m in ns if m >= 2 and tax_at(m)] if n >= 2 else []
    gspmd = {opt: contention(fam, n, cores) * loglog(taxed, [max(tax_at(m).get(opt, 0.0), 1e-15) / contention(fam, m, cores)
                                                    for m in taxed], n)
             for opt in tax_at(taxed[0])} if taxed else {}
    return HostTerms(o, floor(fam, n, cores, s), tuple(pts), a, bw, ref_bytes, rates, True, layers,  # type: ignore[arg-type]
                     leaf, tuple(stream), gspmd)


def gloo_overhead(measured: dict[int, float], n: int, cores: int) -> float:
    """The reference step of N gloo ranks from the counts measured (N = 1 among them): one rank's
    step plus the all-reduce's ring, 2(N - 1) hops a step, each hop's wait stretched N/C-fold once N
    ranks share C cores. The per-hop cost is read off each measured count and interpolated in
    log-log between them (constant from one). Log-log of the whole step from N = 1, 2 squares the
    jump from one process to two into N = 4 (on this host 0.35 -> 1.3 ms gave 10 ms, on CI's 0.35
    -> 1.9 gave 21: the step took 8-11), and N = 1 is not a point of the ring's curve at all."""
    base = measured[1]
    if n == 1:
        return base
    multi = sorted(m for m in measured if m >= 2)
    hop = [max(measured[m] - base, 1e-9) / (ring_hops(m) * contention("gloo", m, cores)) for m in multi]
    return base + loglog(multi, hop, n) * ring_hops(n) * contention("gloo", n, cores)


def ring_hops(n: int) -> int:
    """Sequential steps of a ring all-reduce over N ranks: N - 1 to reduce-scatter, N - 1 to gather."""
    return 2 * (n - 1)


def contention(family: str, n: int, cores: int) -> float:
    """How much slower a GEMM runs on each of N devices computing at once than on one alone, from
    the cores alone: a gloo rank runs one thread, so N ranks share C cores from N > C on; an XLA-CPU
    device alone runs its GEMM on every core, so N devices in one process split them N ways."""
    return float(max(1, n)) if family == "xla-cpu" else max(1.0, n / cores)


def floor(family: str, n: int, cores: int, measured: float) -> float:
    """The slowdown a prediction uses: the measured one, but never below what the cores force. N
    one-thread gloo ranks busy at once on C cores cannot each run faster than C/N of a core, and the
    calibration's short GEMM windows (a few ms per rank, shorter than the scheduler's slices) let
    ranks run partly alone: measured here 1.5 at N = 4 and 2.3 at N = 8 on 2 cores, where the
    steps of every compute-heavy model took 2x and 4x. An XLA-CPU device alone already uses every
    core, so its floor is 1."""
    return max(1.0, measured, contention(family, n, cores) if family == "gloo" else 1.0)


def loglog(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    """ys at x, linear in (log x, log y) between x's neighbours among xs, or from the nearest two
    beyond the range; one point: that point."""
    pts = sorted(zip(xs, ys))
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    if len(xs) == 1:
        return ys[0]
    if x in xs:
        return ys[xs.index(x)]
    lo = max((i for i, v in enumerate(xs) if v < x), default=None)
    hi = min((i for i, v in enumerate(xs) if v > x), default=None)
    if lo is None:
        lo, hi = 0, 1
    elif hi is None:
        lo, hi = len(xs) - 2, len(xs) - 1
    w = (math.log(x) - math.log(xs[lo])) / (math.log(xs[hi]) - math.log(xs[lo]))
    y0, y1 = math.log(max(ys[lo], 1e-12)), math.log(max(ys[hi], 1e-12))
    return math.exp(y0 + w * (y1 - y0))


def restricted(cal: dict[str, Any], counts: list[int]) -> dict[str, Any]:
    """The calibration as ``podscale calibrate --devices COUNTS`` would have written it: every N's
    terms are measured on their own, so the other N's entries are simply dropped (the off-grid
    checks: predictions at N the calibration never ran)."""
    keep = {str(n) for n in counts}
    out = copy.deepcopy(cal)
    for b in out.get("backends", {}).values():
        b["per_n"] = {k: v for k, v in b.get("per_n", {}).items() if k in keep}
    for fam in out.get("collectives", {}).values():
        for k in [k for k in fam if k not in keep]:
            del fam[k]
    return out


def host_peak(cal: dict[str, Any], key: str) -> float | None:
    """host-cpu's peak for MFU: the cached measurement (``host.measured_host_peaks``) or, failing
    that, the calibration's best torch GEMM rate on the most threads."""
    cached = host.measured_host_peaks(measure=False).get(key)
    if cached:
        return cached
    table = cal.get("gemm", {}).get("torch", {}).get(key, {})
    if not table:
        return None
    most = max(table, key=int)
    return max(table[most].values())


def monotone(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """More bytes never take less time: a small message slowed by a scheduling hiccup (2 cores shared
    by N ranks) is capped by the larger messages measured after it (running minimum from the right)."""
    out: list[tuple[float, float]] = []
    best = float("inf")
    for b, t in sorted(points, reverse=True):
        best = min(best, t)
        out.append((b, best))
    return out[::-1]


def fit_alpha_beta(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares t = alpha + bytes / bw over the points (alpha >= 0, bw > 0)."""
    if len(points) < 2:
        return (points[0][1] if points else 0.0), float("inf")
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    slope = max(slope, 1e-15)
    alpha = max(0.0, my - slope * mx)
    return alpha, 1.0 / slope


def ref_grad_bytes(opts: dict[str, int] | None = None) -> int:
    o = opts or REF_MODEL_OPTS
    d, h, out = o["d_in"], o["hidden"], o["d_out"]
    return 4 * (d * h + h + h * out + out)


