"""``podscale calibrate``, measuring: times this host's GEMMs, collectives and reference steps.

Emulated devices share the host's cores, and gloo / XLA-CPU collectives and per-step framework work
grow with N far faster than ``N / cores`` (8 gloo ranks on 2 cores: ~30x one rank's step), so they
are measured, per backend and N, and merged into the file that ``calibration`` reads (what each
term means is written there). The reference steps run through the real backend
(``scaling.world.run_local``); the collective and GEMM workers are this module's own
``--worker`` processes.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from scaling.backends import gloo_io
from scaling.backends.jax_env import cpu_malloc_env
from scaling.errors import RunFailed, UsageError
from scaling.throughput import host, layer_rates, partitioner
from scaling.throughput.layer_rates import time_calls as _time_calls
from scaling.throughput.calibration import (DATA_REF_BATCH, DATA_REF_OPTS, FAMILIES, REF_MODEL_OPTS, VERSION, WIDE_REF_OPTS, _empty,
                                            fit_alpha_beta, framework_version,
                                            gemm_source, layer_source, load, monotone, mlp_sample_bytes, ref_grad_bytes, save)



@dataclass(frozen=True)
class Sizes:
    gemm: tuple[int, ...]
    messages: tuple[int, ...]
    ref_steps: int
    reps: int
    ref_runs: int = 5
    """Separate runs of the reference model per (backend, N); their median is the overhead. Five, not
    three: two gloo ranks' reference step came out 1.26, 1.33 and 2.1 ms in three calibrations of
    three runs each, and a prediction beyond the calibrated N multiplies that error (x6 at N = 4)."""
    tiny_layers: bool = False
    """The layer table's small test grid (``layer_rates.TINY``)."""
    stream: tuple[int, ...] = (1 << 16, 1 << 18, 1 << 20, 1 << 21)
    """Elements per device of each of the memory probe's three arrays (``stream_bytes``): 0.75 to
    24 MiB of working set per device, the range of the zoo's models (the mlp of width 1024 and
    its Adam state: 16 MiB)."""


QUICK = Sizes((32, 64, 128, 256, 512), (1 << 10, 1 << 14, 1 << 18, 1 << 20, 1 << 22), 60, 5)
FULL = Sizes((16, 32, 64, 128, 256, 512, 1024), (1 << 10, 1 << 12, 1 << 14, 1 << 16, 1 << 18, 1 << 20, 1 << 22, 1 << 24), 60, 11)
TINY = Sizes((32, 128), (1 << 10, 1 << 16), 8, 3, 1, True, (1 << 12, 1 << 16))
"""For tests: seconds, not minutes."""


#: passes of XLA's memory probe over its sizes (the fastest of each size); an entry measured in
#: fewer is measured again
STREAM_PASSES = 3

#: the per-leaf all-reduce probe's pytree: this many 1 KiB arrays
LEAVES = 16


def stream_bytes(elems: int) -> int:
    """Bytes one device moves in the memory probe's update of three float32 arrays of ``elems``:
    reads p, m and g, writes p and m."""
    return 5 * 4 * elems


def torch_gemm_table(sizes: tuple[int, ...], threads: list[int], dtypes: tuple[str, ...] = ("fp32", "bf16")) -> dict[str, Any]:
    """GEMM FLOPS by dtype, thread count and square size, in this process."""
    out: dict[str, Any] = {"framework_version": framework_version("torch")}
    for key in dtypes:
        out[key] = {str(t): {str(n): host.measure_gemm_flops(key, t, n=n, repeats=3)[0] for n in sizes} for t in threads}
    return out


def _spawn(argv: list[str], envs: list[dict[str, str]], timeout: float, what: str) -> None:
    """Start the processes in one new process group; kill them all on timeout or a failure."""
    root = str(Path(__file__).resolve().parents[2])
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for i, env in enumerate(envs):
            e = {**os.environ, **env, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
            procs.append(subprocess.Popen(argv, env=e, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                          process_group=0 if i == 0 else procs[0].pid))
        deadline = time.time() + timeout
        while True:
            codes = [p.poll() for p in procs]
            bad = [c for c in codes if c not in (None, 0)]
            if bad:
                err = (procs[codes.index(bad[0])].stderr.read() or b"").decode(errors="replace").strip().splitlines()  # type: ignore[union-attr]
                raise RunFailed(f"calibration of {what} failed: {err[-1] if err else f'exit code {bad[0]}'}")
            if all(c == 0 for c in codes):
                return
            if time.time() > deadline:
                raise RunFailed(f"calibration of {what} did not finish within {timeout:g}s; killed it")
            time.sleep(0.05)
    finally:
        if procs and any(p.poll() is None for p in procs):
            try:
                os.killpg(procs[0].pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
            if p.stderr:
                p.stderr.close()


def measure_gloo(n: int, sizes: Sizes, timeout: float = 240.0) -> dict[str, Any]:
    """All-reduce curve and GEMM slowdown of N gloo ranks (one thread each, as torch-ddp runs them)."""
    from scaling.world import free_port

    with tempfile.TemporaryDirectory(prefix="podscale-cal-") as tmp:
        out = Path(tmp) / "out.json"
        spec = json.dumps({"messages": sizes.messages, "reps": sizes.reps, "out": str(out), "stream": sizes.stream})
        port = str(free_port())
        envs = [{"RANK": str(r), "WORLD_SIZE": str(n), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
                 "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "PODSCALE_CAL": spec} for r in range(n)]
        _spawn([sys.executable, "-m", "scaling.throughput.measure", "--worker", "gloo"], envs, timeout, f"gloo at N={n}")
        return json.loads(out.read_text())


def measure_xla(n: int, sizes: Sizes, gemm_table: bool, timeout: float = 240.0) -> dict[str, Any]:
    """psum curve and GEMM slowdown of N XLA-CPU devices in one process (as jax-pmap runs them)."""
    with tempfile.TemporaryDirectory(prefix="podscale-cal-") as tmp:
        out = Path(tmp) / "out.json"
        spec = json.dumps({"messages": sizes.messages, "reps": sizes.reps, "out": str(out), "stream": sizes.stream,
                           "gemm": list(sizes.gemm) if gemm_table else []})
        flags = (os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}").strip()
        envs = [{"XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu", "PODSCALE_CAL": spec, **cpu_malloc_env()}]
        _spawn([sys.executable, "-m", "scaling.throughput.measure", "--worker", "xla"], envs, timeout, f"XLA-CPU at N={n}")
        return json.loads(out.read_text())


def measure_xla_layers(sizes: Sizes, timeout: float = 600.0) -> dict[str, Any]:
    """The layer table of one XLA-CPU device alone (``layer_rates.jax_table``), in its own process."""
    with tempfile.TemporaryDirectory(prefix="podscale-cal-") as tmp:
        out = Path(tmp) / "out.json"
        spec = json.dumps({"out": str(out), "tiny": sizes.tiny_layers})
        flags = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=1").strip()
        envs = [{"XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu", "PODSCALE_CAL": spec, **cpu_malloc_env()}]
        _spawn([sys.executable, "-m", "scaling.throughput.measure", "--worker", "xla-layers"], envs, timeout, "XLA-CPU layers")
        return json.loads(out.read_text())


def _torch_xla_worker(worker: str, devices: int, spec: dict[str, Any], timeout: float, what: str) -> dict[str, Any]:
    """One torch_xla calibration worker on ``devices`` XLA-CPU devices, in its own process."""
    with tempfile.TemporaryDirectory(prefix="podscale-cal-") as tmp:
        out = Path(tmp) / "out.json"
        envs = [{"PJRT_DEVICE": "CPU", "CPU_NUM_DEVICES": str(devices), "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"),
                 "PODSCALE_CAL": json.dumps({"out": str(out), **spec})}]
        _spawn([sys.executable, "-m", "scaling.throughput.measure", "--worker", worker], envs, timeout, what)
        return json.loads(out.read_text())


def measure_torch_xla_layers(sizes: Sizes, timeout: float = 900.0) -> dict[str, Any]:
    """torch_xla's own layer table (``layer_rates_xla``) on one XLA-CPU device."""
    return _torch_xla_worker("torch-xla-layers", 1, {"tiny": sizes.tiny_layers}, timeout, "torch_xla layers")


def measure_torch_xla_spmd(n: int, timeout: float = 600.0) -> dict[str, Any]:
    """torch-xla's SPMD step of two one-weight models on N XLA-CPU devices (``layer_rates_xla.spmd_probe``)."""
    return _torch_xla_worker("torch-xla-spmd", n, {}, timeout, f"torch_xla SPMD at N={n}")


def reference_runs(backend: str, n: int, sizes: Sizes, opts: dict[str, int] | None = None, per_device: int = 1,
                   runs: int | None = None) -> tuple[float, float | None]:
    """(median step, median data part) over ``runs`` (default ``sizes.ref_runs``) separate runs of the
    mlp ``opts`` (the reference's by default) through the real backend at N devices, ``per_device``
    samples a device; each run gives its median step, and its breakdown probe's data part (None for
    torch-xla, whose calibration runs no probes). On 2 shared cores the median step of one multi-rank run
    varies run to run far more than within a run (2 gloo ranks: 1.5 to 3.4 ms over five runs here),
    and one torch run at N = 1 too (0.35 to 0.44 ms), so one run's figure would be replayed into
    every prediction."""
    from scaling.world import run_local
    from scaling.config import RunConfig
    from scaling.meter import median_step_time

    untimed = max(2, sizes.ref_steps // 5)
    cfg = RunConfig(backend=backend, model="mlp", devices=n, global_batch=n * per_device, steps=sizes.ref_steps,
                    untimed_steps=untimed, model_opts={k: str(v) for k, v in (opts or REF_MODEL_OPTS).items()},
                    # torch-xla's runs have probes now, but its calibration keeps none: each probe compiles
                    # two more graphs, and the data reference they would add is a torch-xla run a count
                    # (about 30 s each here): a CI sweep's calibration went past its 20 minutes with them
                    probe_steps=0 if backend == "torch-xla" else max(2, sizes.ref_steps // 30),
                    step_timeout=120.0, startup_timeout=300.0)
    steps, data = [], []
    for _ in range(runs or sizes.ref_runs):
        raw = run_local(cfg)
        steps.append(median_step_time(raw["step_times"], untimed))
        d = ((raw.get("breakdown") or {}).get("measured") or {}).get("data_s")
        if d is not None:
            data.append(d)
    return statistics.median(steps), (statistics.median(data) if data else None)


def calibrate(backends: list[str], device_counts: list[int], sizes: Sizes = QUICK, log: Callable[[str], None] | None = None,
              existing: dict[str, Any] | None = None) -> dict[str, Any]:
    """Measure ``backends`` at ``device_counts`` and merge into this host's calibration file."""
    log = log or (lambda s: None)
    for b in backends:
        if b not in FAMILIES:
            raise UsageError(f"cannot calibrate backend {b!r} on host-cpu; valid: {', '.join(FAMILIES)}")
        pkg = FAMILIES[b][1]
        if importlib.util.find_spec(pkg) is None:
            raise UsageError(f"backend {b!r} needs {pkg!r}, not installed here")
    for n in device_counts:
        if n < 1:
            raise UsageError(f"invalid --devices {n}: device counts must be positive integers")
    data = existing if existing is not None else (load() or _empty())
    data.update({"version": VERSION, "host": host.host_fingerprint(), "cores": host.host_cores()})
    if importlib.util.find_spec("torch") is not None:
        log("host peak: GEMM on all cores (cached only when the repeats agree)")
        try:
            host.measured_host_peaks(write=True)  # the one writer of the MFU basis (runs only read it)
        except host.BusyMachine as e:
            log(str(e))
    cores = host.host_cores()
    fams = {FAMILIES[b][0] for b in backends}
    if "gloo" in fams and not data["gemm"].get("torch"):
        log(f"GEMM rates, torch, 1..{cores} threads")
        data["gemm"]["torch"] = torch_gemm_table(sizes.gemm, list(range(1, cores + 1)))
    layers = data.setdefault("layers", {})
    # only the tables these backends' predictions read (``layer_source``): .venv-xla calibrating
    # torch-xla alone measured jax's too, 92 s of a CI sweep that nothing there reads
    reads = {layer_source(b) for b in backends}
    if "torch" in reads and not layers.get("torch"):
        log("layer and optimizer costs, torch, one thread")
        layers["torch"] = {"framework_version": framework_version("torch"), "method": layer_rates.METHOD["torch"],
                           **layer_rates.torch_table(sizes.tiny_layers)}
    if "jax" in reads and not layers.get("jax"):
        log("layer and optimizer costs, XLA-CPU, one device")
        layers["jax"] = {"framework_version": framework_version("jax"), "method": layer_rates.METHOD["jax"], **measure_xla_layers(sizes)}
    if "torch_xla" in reads and not layers.get("torch_xla"):
        log("layer and optimizer costs, torch_xla, one XLA-CPU device")
        layers["torch_xla"] = {"framework_version": framework_version("torch_xla"), "method": layer_rates.METHOD["torch_xla"],
                               **measure_torch_xla_layers(sizes)}
    for fam in sorted(fams):
        colls = data["collectives"].setdefault(fam, {})
        for n in device_counts:
            old = colls.get(str(n), {})
            if old.get("framework_version") == framework_version("torch" if fam == "gloo" else "jax") and _probed(old, fam):
                continue
            log(f"{fam} all-reduce, GEMM and memory contention at N={n}")
            need_table = fam == "xla-cpu" and not data["gemm"].get("jax")
            m = measure_gloo(n, sizes) if fam == "gloo" else measure_xla(n, sizes, need_table)
            if need_table and "gemm" in m:
                data["gemm"]["jax"] = {"framework_version": framework_version("jax"), **m.pop("gemm")}
            pts = monotone([(float(b), float(t)) for b, t in m["points"]])
            alpha, bw = fit_alpha_beta(pts)
            colls[str(n)] = {"points": pts, "alpha": alpha, "bw": bw, "slowdown": m["slowdown"], "stream": m.get("stream", []),
                             "leaf_s": m.get("leaf_s", 0.0), "gspmd": m.get("gspmd", {}),
                             "stream_passes": m.get("stream_passes", 1), **_io_mark(fam),
                             "ref_step_s": m.get("ref_step_s"), "framework_version": framework_version("torch" if fam == "gloo" else "jax")}
    for b in backends:
        fam, pkg = FAMILIES[b]
        entry = data["backends"].setdefault(b, {"per_n": {}})
        if entry.get("framework_version") != framework_version(pkg):
            entry.clear()
            entry["per_n"] = {}
        entry.update({"framework_version": framework_version(pkg), "collective": fam, "ref_grad_bytes": ref_grad_bytes(),
                      "ref_model": {"model": "mlp", **REF_MODEL_OPTS}})
        for n in device_counts:
            if not _ref_current(b, n, entry["per_n"].get(str(n))):  # absent, older, or gloo's I/O at another priority
                entry["per_n"][str(n)] = _reference_entry(b, n, sizes, data, log)
            if not _spmd_probed(b, entry["per_n"][str(n)]):  # torch-xla's, also where an older calibration lacks it
                log(f"{b}: SPMD step of one weight, two sizes, at N={n}")
                entry["per_n"][str(n)]["spmd"] = measure_torch_xla_spmd(n)
    data["measured_at"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    save(data)
    return data


def _reference_entry(b: str, n: int, sizes: Sizes, data: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any]:
    """A backend's calibration at N: its reference step (the overhead) and the family's slowdown."""
    fam = FAMILIES[b][0]
    log(f"{b}: reference step (mlp 16-16-1) at N={n}")
    data_s: float | None = None
    try:
        (step, data_s), source = reference_runs(b, n, sizes), "podscale run (the real backend)"
    except (ImportError, UsageError) as e:
        coll = data["collectives"][fam][str(n)]
        if not coll.get("ref_step_s"):
            raise UsageError(f"cannot calibrate {b}: {e}") from None
        step, source = coll["ref_step_s"], "reference jax step (backend unavailable)"
    entry = {"overhead_s": step, "slowdown": data["collectives"][fam][str(n)]["slowdown"], "overhead_source": source,
             **_io_mark(fam)}
    if data_s is not None:  # what a batch's bytes cost to reach the devices (``DATA_REF_OPTS``)
        log(f"{b}: data reference ({DATA_REF_BATCH} samples of {mlp_sample_bytes(DATA_REF_OPTS)} bytes a device) at N={n}")
        wide = reference_runs(b, n, sizes, DATA_REF_OPTS, DATA_REF_BATCH, runs=1)[1]
        if wide is not None:
            entry.update(data_s=data_s, data_bytes=mlp_sample_bytes(REF_MODEL_OPTS), data_wide_s=wide,
                         data_wide_bytes=DATA_REF_BATCH * mlp_sample_bytes(DATA_REF_OPTS))
    if fam == "gloo" and n > 1:  # a gradient byte's cost in the step (``WIDE_REF_OPTS``); N = 1 reduces nothing
        log(f"{b}: wide reference step (mlp {WIDE_REF_OPTS['d_in']}-{WIDE_REF_OPTS['hidden']}-{WIDE_REF_OPTS['d_out']}) at N={n}")
        entry.update(wide_step_s=reference_runs(b, n, sizes, WIDE_REF_OPTS)[0], wide_grad_bytes=ref_grad_bytes(WIDE_REF_OPTS))
    return entry


def _io_mark(family: str) -> dict[str, str]:
    """Gloo's entries say at which priority its I/O thread ran (``gloo_io``): 2 to 8 ranks' steps
    differ 2-2.5x between the two, so an entry of the other setting is measured again."""
    return {"gloo_io": gloo_io.setting()} if family == "gloo" else {}


def _io_current(family: str, entry: dict[str, Any] | None) -> bool:
    return entry is not None and (family != "gloo" or entry.get("gloo_io") == gloo_io.setting())


def _ref_current(backend: str, n: int, entry: dict[str, Any] | None) -> bool:
    """A backend's entry at N is complete: gloo's at N > 1 holds the wide reference too, and every
    backend with breakdown probes (all but torch-xla) the data reference."""
    family = FAMILIES[backend][0]
    return (_io_current(family, entry) and (family != "gloo" or n < 2 or "wide_step_s" in entry)  # type: ignore[operator]
            and (backend == "torch-xla" or "data_wide_s" in entry))  # type: ignore[operator]


def _spmd_probed(backend: str, entry: dict[str, Any]) -> bool:
    """Whether a backend's entry at N holds its SPMD probe (torch-xla's; other backends have none)."""
    return backend != "torch-xla" or "spmd" in entry


def _probed(entry: dict[str, Any], family: str) -> bool:
    """Whether a collective entry holds every probe this version measures (an older one is measured again)."""
    gspmd = entry.get("gspmd")
    return "stream" in entry and (_io_current(family, entry) if family == "gloo" else ("leaf_s" in entry and gspmd is not None
                                                       and entry.get("stream_passes", 1) >= STREAM_PASSES
                                                       and (not gspmd or "adam" + partitioner.PLAIN in gspmd)))


def ensure(backends: list[str], device_counts: list[int], quick: bool = True, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The calibration, measuring only what is missing for (backend, N)."""
    cal = load() or _empty()
    # backends this environment cannot run (torch-xla from the main venv) are calibrated by their own venv
    backends = [b for b in backends if b in FAMILIES and importlib.util.find_spec(FAMILIES[b][1]) is not None]
    colls = cal.get("collectives", {})
    per_n = {b: cal.get("backends", {}).get(b, {}).get("per_n", {}) for b in backends}
    missing_b = [b for b in backends if not all(_ref_current(b, n, per_n[b].get(str(n))) and _spmd_probed(b, per_n[b][str(n)])
                                                for n in device_counts)
                 or not all(_probed(colls.get(FAMILIES[b][0], {}).get(str(n), {}), FAMILIES[b][0]) for n in device_counts)
                 or not cal.get("gemm", {}).get(gemm_source(b)) or not cal.get("layers", {}).get(layer_source(b))]
    if not missing_b:
        return cal
    return calibrate(missing_b, device_counts, QUICK if quick else FULL, log, existing=cal)


# ---- workers (run in subprocesses) ------------------------------------------------------------


def _gloo_worker() -> None:
    import torch
    import torch.distributed as dist

    spec = json.loads(os.environ["PODSCALE_CAL"])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    gloo_io.idle_io_threads()  # as in the runs it prices (``scaling.train_torch``)
    reps = spec["reps"]
    # GEMM contention: every rank at once vs rank 0 alone
    a = torch.randn(256, 256)
    for _ in range(3):
        a @ a
    # twice, interleaved, the faster of each: one timing of either read 1.0 and 1.8 at N = 2 in two
    # calibrations of the same idle machine
    alone, together = float("inf"), float("inf")
    for _ in range(2):
        dist.barrier()
        if rank == 0:
            alone = min(alone, _time_calls(lambda: a @ a, reps, 8))
        dist.barrier()
        t_all = torch.tensor([_time_calls(lambda: a @ a, reps, 8)])
        dist.all_reduce(t_all)
        together = min(together, float(t_all) / world)
    stream = []
    for e in spec.get("stream", []):
        p, m, g = torch.ones(e), torch.ones(e), torch.ones(e)

        def update() -> None:
            m.mul_(0.9).add_(g)
            p.add_(m, alpha=-1e-3)

        update()
        dist.barrier()
        t = torch.tensor([_time_calls(update, reps, 4 if e < (1 << 20) else 2)])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)  # a DP step waits for its slowest rank
        stream.append((stream_bytes(e), float(t)))
    points = []
    for nbytes in spec["messages"]:
        buf = torch.zeros(max(1, nbytes // 4))
        for _ in range(2):
            dist.all_reduce(buf)
        dist.barrier()
        inner = 4 if nbytes < (1 << 20) else 2
        t = torch.tensor([_time_calls(lambda: dist.all_reduce(buf), reps, inner)])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        points.append((nbytes, float(t)))
    if rank == 0:
        Path(spec["out"]).write_text(json.dumps({"points": points, "slowdown": max(1.0, together / alone), "gemm_s": together,
                                                 "stream": stream}))
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # gloo may abort at interpreter exit (PLATFORM_NOTES)


def _xla_worker() -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    spec = json.loads(os.environ["PODSCALE_CAL"])
    reps = spec["reps"]
    devs = jax.devices()
    n = len(devs)
    res: dict[str, Any] = {}
    if spec.get("gemm"):
        table: dict[str, Any] = {}
        # k dependent GEMMs inside one compiled program: a jax step is one XLA program, so its
        # matmuls pay no per-call dispatch; timing one GEMM per call would charge that to compute
        k = 16
        for key, dt in (("fp32", jnp.float32), ("bf16", jnp.bfloat16)):
            mm = jax.jit(lambda x, w: jax.lax.fori_loop(0, k, lambda i, a: a @ w, x))
            row = {}
            for s in spec["gemm"]:
                x, w = jnp.ones((s, s), dt), jnp.eye(s, dtype=dt)  # identity: values stay put
                mm(x, w).block_until_ready()
                t = _time_calls(lambda: mm(x, w).block_until_ready(), reps, 2)
                row[str(s)] = 2.0 * s**3 * k / t
            table[key] = {"device": row}
        res["gemm"] = table
    # "alone" is the same pmap'd GEMMs on one of the devices, so the ratio holds contention only.
    # Eight dependent GEMMs a call, not one: pmap's dispatch of N devices (in the reference step's
    # overhead already) was half of one 256 GEMM's call, and the ratio of single-GEMM calls came
    # out 1.95 and 2.75 at N = 2 in two runs here, 10.7 at N = 8 (eight a call: 1.85-1.99, 6.0)
    eye = jnp.eye(256, dtype=jnp.float32)

    def gemms(x: Any) -> Any:
        for _ in range(8):
            x = x @ eye
        return x

    one = jax.pmap(gemms, devices=devs[:1])
    x1 = jnp.ones((1, 256, 256), jnp.float32)
    one(x1).block_until_ready()
    pm = jax.pmap(gemms)
    # inputs already on their devices, as a step's parameters and state are: an (N, ...) array on
    # device 0 is split and copied to the N devices on every call (the memory probe below came out
    # 3-4x slower at N = 2 and 8 with its gradient array left on device 0)
    put = jax.pmap(lambda v: v)
    xs = put(jnp.ones((n, 256, 256), jnp.float32))
    pm(xs).block_until_ready()
    # (2.0 and 1.5 at N = 2 in two calibrations of the same idle machine, and 1.5 and 1.9 with the
    # faster of two interleaved timings each: the spread is the process's, not one timing's)
    alone = _time_calls(lambda: one(x1).block_until_ready(), reps, 8)
    together = _time_calls(lambda: pm(xs).block_until_ready(), reps, 8)
    res["slowdown"] = max(1.0, together / alone)
    # memory-bound work of N devices at once: a momentum update on every device, into fresh buffers
    # as a podscale step writes them (donating them made this probe 2-3x faster at N = 8, but not
    # the training step: 37 and 33 ms against 33 and 29 for the mlp of width 1024)
    # Three passes over the sizes, the fastest of each size: the first pass's timings ran 1.3-2.4x
    # the later ones' at N = 2 here (fresh memory: the heap has not yet grown to the step's size),
    # and one pass read N = 2's update of 1.3 MiB at 0.14 ms in one calibration and 0.34 in the
    # next, which put the on-grid mlp at N = 2 43% high and the off-grid N = 4 runs 20-28% high
    upd = jax.pmap(lambda p, m, g: (p - 1e-3 * (0.9 * m + g), 0.9 * m + g))
    best: dict[int, float] = {}
    for _ in range(STREAM_PASSES):
        for e in spec.get("stream", []):
            state = [put(jnp.ones((n, e), jnp.float32)), put(jnp.ones((n, e), jnp.float32))]
            g = put(jnp.ones((n, e), jnp.float32))

            def run() -> None:
                state[:] = upd(state[0], state[1], g)
                state[0].block_until_ready()

            run()
            best[e] = min(best.get(e, float("inf")), _time_calls(run, reps, 4 if e < (1 << 20) else 2))
    res["stream"] = [(stream_bytes(e), best[e]) for e in spec.get("stream", [])]
    res["stream_passes"] = STREAM_PASSES
    psum = jax.pmap(lambda v: jax.lax.psum(v, "i"), axis_name="i")
    points = []
    for nbytes in spec["messages"]:
        v = put(jnp.zeros((n, max(1, nbytes // 4)), jnp.float32))
        psum(v).block_until_ready()
        inner = 4 if nbytes < (1 << 20) else 2
        points.append((nbytes, _time_calls(lambda: psum(v).block_until_ready(), reps, inner)))
    res["points"] = points
    # a psum of a pytree is one all-reduce whose operands XLA-CPU reduces one after another: each
    # gradient tensor pays the collective's latency (64 leaves of 1 KiB took 42x one leaf at N = 16
    # here). The extra cost of a leaf: LEAVES small ones against one of their total size
    small = [put(jnp.zeros((n, 256), jnp.float32)) for _ in range(LEAVES)]
    whole = put(jnp.zeros((n, 256 * LEAVES), jnp.float32))
    psum(small)[0].block_until_ready()
    psum(whole).block_until_ready()
    t_many = _time_calls(lambda: psum(small)[0].block_until_ready(), reps, 4)
    t_one = _time_calls(lambda: psum(whole).block_until_ready(), reps, 4)
    res["leaf_s"] = max(0.0, (t_many - t_one) / (LEAVES - 1))
    res["gspmd"] = partitioner.tax_per_byte(reps)  # jax-sharded's partitioned step beyond the all-reduce
    # a reference DP step (mlp 16-16-1), used only when the jax backends are not installed
    d, h, o = REF_MODEL_OPTS["d_in"], REF_MODEL_OPTS["hidden"], REF_MODEL_OPTS["d_out"]
    rng = np.random.default_rng(0)
    params = {"w1": rng.standard_normal((d, h), dtype=np.float32), "b1": np.zeros(h, np.float32),
              "w2": rng.standard_normal((h, o), dtype=np.float32), "b2": np.zeros(o, np.float32)}

    def step(p: Any, xb: Any, yb: Any) -> Any:
        def loss(q: Any) -> Any:
            return jnp.mean((jax.nn.relu(xb @ q["w1"] + q["b1"]) @ q["w2"] + q["b2"] - yb) ** 2)

        lv, g = jax.value_and_grad(loss)(p)
        g = jax.lax.pmean(g, "i")
        return jax.tree.map(lambda a, b: a - 1e-3 * b, p, g), jax.lax.pmean(lv, "i")

    pstep = jax.pmap(step, axis_name="i")
    rp = jax.tree.map(lambda a: jnp.stack([a] * n), params)
    xb = jnp.ones((n, 1, d), jnp.float32)
    yb = jnp.ones((n, 1, o), jnp.float32)
    for _ in range(3):
        rp, lv = pstep(rp, xb, yb)
        float(lv[0])
    ts = []
    for _ in range(max(10, reps * 3)):
        t = time.perf_counter()
        rp, lv = pstep(rp, xb, yb)
        float(lv[0])
        ts.append(time.perf_counter() - t)
    res["ref_step_s"] = statistics.median(ts)
    Path(spec["out"]).write_text(json.dumps(res))


def _main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", choices=("gloo", "xla", "xla-layers", "torch-xla-layers", "torch-xla-spmd"), required=True)
    args = ap.parse_args()
    if args.worker in ("xla-layers", "torch-xla-layers", "torch-xla-spmd"):
        spec = json.loads(os.environ["PODSCALE_CAL"])
        if args.worker == "xla-layers":
            table = layer_rates.jax_table(spec["tiny"])
        else:
            from scaling.throughput import layer_rates_xla
            table = layer_rates_xla.spmd_probe() if args.worker == "torch-xla-spmd" else layer_rates_xla.torch_xla_table(spec["tiny"])
        Path(spec["out"]).write_text(json.dumps(table))
        return
    _gloo_worker() if args.worker == "gloo" else _xla_worker()


if __name__ == "__main__":
    _main()
