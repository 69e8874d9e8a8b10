"""From a backend's raw per-step record to the RunResult every front end reports.

One function for every launcher (local processes, Ray, Colab), so the JSON keys and the meaning
of each number never depend on how the world was started.
"""

from __future__ import annotations

import json
import math
import os
import platform

from pathlib import Path
from typing import Any

from models.spec import get_spec
from scaling import __version__
from scaling.throughput import catalog, estimate, host, host_step
from scaling.config import RunConfig
from scaling.errors import Diverged, UsageError
from scaling.meter import median_step_time, run_peak, throughput

#: every key a run's JSON holds (tests check the set)
RESULT_KEYS = (
    "backend", "model", "devices", "processes", "global_batch", "per_device_batch", "steps", "untimed_steps",
    "dtype", "optimizer", "loss_reduction", "losses", "step_times_s", "step_time_s", "samples_per_s",
    "model_flops_per_step", "xla_flops_per_step", "achieved_flops", "achieved_flops_per_device", "achieved_pflops",
    "peak_flops", "peak_dtype", "mfu", "mfu_flag", "peak_note", "predicted_step_time_s", "prediction_error", "final_params_l2",
    "replicas_identical", "hardware", "versions", "config", "breakdown",
)


def resolve_hardware(cfg: RunConfig, raw: dict[str, Any]) -> tuple[str, catalog.Hardware | None]:
    hw_id = cfg.hardware or raw.get("hardware") or catalog.detect(cfg.backend)
    try:
        return hw_id, catalog.get(hw_id)
    except UsageError:
        return hw_id, None  # unknown chip: MFU stays null, never another chip's peak


def predict(cfg: RunConfig, hw_id: str, measured: estimate.Workload | None = None) -> float | None:
    """Predicted step time from the throughput model, when it and a calibration are available."""
    try:
        return estimate.predict_run(cfg, hw_id, measured)
    except UsageError:
        return None


def measured_workload(raw: dict[str, Any], global_batch: int) -> estimate.Workload | None:
    """The throughput model's view of a user's model: what its first step's op record measured
    (FLOPs of each matmul/conv call, its forward op by op, gradient bytes as DDP bucketed them), not a spec."""
    flops = raw.get("model_flops_per_step")
    if not flops:
        return None
    rec = raw.get("op_record") or {}
    comm = [c for c in (raw.get("comm_bytes_per_step") or []) if c]
    return estimate.Workload(str(raw.get("model", "script")), int(raw.get("params", 0)), float(flops) / global_batch,
                             int(comm[0]) if comm else int(raw.get("grad_bytes", 0)), (),
                             source=f"measured: {rec.get('source', 'first step')}",
                             op_flops=tuple(float(f) for f in rec.get("gemm_flops", ())), optimizer=rec.get("optimizer"),
                             # a jax step's all-reduced arrays, less its loss: the gradient tensors
                             leaves=max(0, int(rec.get("allreduce_operands") or 0) - 1),
                             sample_bytes=rec.get("sample_bytes"),
                             recorded=host_step.recorded_works(rec["layers"], rec.get("batch") or 1, rec.get("backward_gemm_flops", 0))
                             if rec.get("layers") else ())


def predicted_parts(cfg: RunConfig, hw_id: str, workload: estimate.Workload | None) -> dict[str, float] | None:
    """The prediction's step split as the measured breakdown is: data (where priced), compute,
    exposed communication and the per-step overhead (framework, launches), so the two can be read
    side by side."""
    try:
        if workload is None:
            workload = estimate.workload(get_spec(cfg.model, **cfg.model_opts))
        e = estimate.predict_step(workload, hw_id, cfg.devices, cfg.global_batch, cfg.dtype, cfg.backend,
                                  optimizer=cfg.optimizer)
    except Exception:  # noqa: BLE001 - a prediction must never break a finished run
        return None
    return {**({"data_s": e.data_s} if e.data_s else {}), "compute_s": e.compute_s, "comm_exposed_s": e.comm_s,
            "overhead_s": e.overhead_s, "step_s": e.step_time_s}


def mfu_flag(mfu: float | None, hw_id: str) -> str | None:
    """Why an MFU cannot be taken at face value, or None. Above 100% the peak or the FLOP count is
    wrong (on host-cpu: a peak cached while the machine was busy); it is printed flagged, never plain."""
    if mfu is None or mfu <= 1.0:
        return None
    fix = "; run `podscale calibrate` on an idle machine" if hw_id == "host-cpu" else ""
    return f"above 100% of peak: the peak or the FLOP count is wrong{fix}"


def peak_note(hw_id: str, peak_key: str) -> str | None:
    """What the MFU basis is, where it is not the obvious datasheet figure."""
    if hw_id != "host-cpu":
        return None
    if peak_key == "bf16" and not host.native_bf16():
        return ("this CPU has no native bf16 (no AVX512-BF16/AMX): bf16 matmuls are emulated, and MFU is "
                "against the emulated bf16 GEMM rate measured here, the rate they actually ran at")
    return "the best GEMM rate measured on this host's cores (podscale calibrate)"


def finish(cfg: RunConfig, raw: dict[str, Any]) -> dict[str, Any]:
    if cfg.script is not None:
        # a user's script: its fit set the batch and step counts; FLOPs are its measured record's
        cfg = cfg.replace(global_batch=int(raw.get("global_batch", cfg.global_batch)), steps=int(raw.get("steps", cfg.steps)),
                          untimed_steps=int(raw.get("untimed_steps", cfg.untimed_steps)))
        workload = measured_workload(raw, cfg.global_batch)
        flops_per_sample = workload.train_flops_per_sample if workload else 0.0
    else:
        workload = None
        flops_per_sample = get_spec(cfg.model, **cfg.model_opts).train_flops_per_sample
    hw_id, hw = resolve_hardware(cfg, raw)
    # TPUs publish no fp32 matmul peak: an fp32 run there is measured against bf16, and says so
    peak_key, device_peak = hw.peak_for(cfg.dtype) if hw else (catalog.PEAK_DTYPE[cfg.dtype], None)
    peak = run_peak(device_peak, cfg.devices, shared_host=bool(hw and hw.kind == "cpu"))
    step_times = list(raw["step_times"])
    st = median_step_time(step_times, cfg.untimed_steps)
    tp = throughput(st, cfg.global_batch, flops_per_sample, cfg.devices, peak)
    predicted = predict(cfg, hw_id, workload)
    versions = {"podscale": __version__, "python": platform.python_version(), **raw.get("versions", {})}
    result = {
        "backend": cfg.backend,
        "model": raw.get("model", cfg.model) if cfg.script else cfg.model,
        "devices": cfg.devices,
        "processes": raw.get("processes", cfg.processes or cfg.devices),
        "global_batch": cfg.global_batch,
        "per_device_batch": cfg.per_device_batch,
        "steps": cfg.steps,
        "untimed_steps": cfg.untimed_steps,
        "dtype": cfg.dtype,
        "optimizer": cfg.optimizer,
        "loss_reduction": cfg.loss_reduction,
        "losses": list(raw["losses"]),
        "step_times_s": step_times,
        "step_time_s": st,
        "samples_per_s": tp.samples_per_s,
        "model_flops_per_step": tp.model_flops_per_step if flops_per_sample else None,
        "xla_flops_per_step": raw.get("xla_flops_per_step"),
        "achieved_flops": tp.achieved_flops if flops_per_sample else None,
        "achieved_flops_per_device": tp.achieved_flops_per_device if flops_per_sample else None,
        "achieved_pflops": tp.achieved_pflops if flops_per_sample else None,
        "peak_flops": peak,
        "peak_dtype": peak_key,
        "mfu": tp.mfu if flops_per_sample else None,
        "mfu_flag": mfu_flag(tp.mfu if flops_per_sample else None, hw_id),
        "peak_note": peak_note(hw_id, peak_key),
        "predicted_step_time_s": predicted,
        "prediction_error": (predicted / st - 1.0) if predicted else None,
        "final_params_l2": raw["final_params_l2"],
        "replicas_identical": raw["replicas_identical"],
        "hardware": hw_id,
        "versions": versions,
        "config": cfg.to_dict(),
    }
    for k, v in raw.items():  # backend extras (accuracy, resumed_from_step, ...) ride along
        result.setdefault(k, v)
    result["breakdown"] = {**(raw.get("breakdown") or {"probes": 0, "measured": None, "why": "this backend has no probes yet"}),
                           "predicted": predicted_parts(cfg, hw_id, workload) if predicted else None}
    result["breakdown"]["flag"] = breakdown_flag(result["breakdown"].get("measured"), cfg.devices)
    result.pop("step_times", None)
    return result


#: |unattributed| beyond this share of the probed step: the parts do not explain the step
UNATTRIBUTED_LIMIT = 0.15


def breakdown_flag(measured: dict[str, Any] | None, devices: int) -> str | None:
    """Why the measured parts cannot be read as the step's split, or None. The parts are timed
    apart (``_probe``): where they add to far more or far less than the step timed whole, their
    split is not where the time went (torch-ddp's mlp at N = 4 on 2 cores read -7.1 and +3.1 ms
    unattributed of 8-10 ms steps in two runs: ranks sharing cores drift apart differently in each
    part)."""
    if not measured or not measured.get("step_s"):
        return None
    share = measured["unattributed_s"] / measured["step_s"]
    if abs(share) <= UNATTRIBUTED_LIMIT:
        return None
    cores = os.cpu_count() or 1
    why = f"; {devices} devices share {cores} cores, so the ranks' waits differ from part to part" if devices > cores else ""
    return (f"unattributed is {share:+.0%} of the probed step: the parts, timed apart, "
            f"{'add to more than' if share < 0 else 'leave out much of'} the whole step{why}; read them as rough")


def per_step_series(result: dict[str, Any]) -> dict[str, list[float | None]]:
    """The per-step scalars TensorBoard shows; untimed (compile) steps get no timing values."""
    flops = result["model_flops_per_step"]
    peak = result["peak_flops"]
    gb = result["global_batch"]
    untimed = result["untimed_steps"]
    times = result["step_times_s"]
    first = len(result["losses"]) - len(times)  # a resumed run may lack the earliest times
    series: dict[str, list[float | None]] = {"loss": list(result["losses"]), "step_time_s": [], "samples_per_s": [], "achieved_tflops": [], "mfu": []}
    for i in range(len(result["losses"])):
        j = i - first
        t = times[j] if 0 <= j < len(times) and i >= untimed else None
        series["step_time_s"].append(t)
        series["samples_per_s"].append(gb / t if t else None)
        series["achieved_tflops"].append(flops / t / 1e12 if t else None)
        series["mfu"].append(flops / t / peak if t and peak else None)
    return series


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float as None: bare NaN/Infinity is not JSON, and a reader
    (jq, JavaScript, a strict parser) would reject the whole file."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_json(path: str | Path, obj: Any) -> None:
    """Atomically (a reader never sees half a file), strict JSON."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(json_safe(obj), indent=2, allow_nan=False))
    os.replace(tmp, p)


def write_diverged(cfg: RunConfig, exc: Diverged) -> None:
    """A diverged run's JSON: what it was, the step where the loss stopped being finite, the losses
    up to there (non-finite as null), so a sweep reading the file sees why there is no throughput."""
    if cfg.json_path:
        write_json(cfg.json_path, {"status": "diverged", "error": str(exc), "diverged_at_step": exc.step,
                                   "losses": exc.losses, "backend": cfg.backend, "model": cfg.model,
                                   "devices": cfg.devices, "config": cfg.to_dict()})


def write_outputs(result: dict[str, Any], cfg: RunConfig) -> None:
    if cfg.json_path:
        write_json(cfg.json_path, result)
    logdir = cfg.run_logdir
    if logdir is not None:
        from scaling.tensorboard import write_scalars

        write_scalars(logdir, per_step_series(result),
                      text={"config": "    " + json.dumps(cfg.to_dict(), indent=2).replace("\n", "\n    ")})
        parts = (result.get("breakdown") or {}).get("measured") or {}
        if parts:  # where the time went, at the last step (the probes ran after training)
            from scaling.tensorboard import write_points

            write_points(logdir, {f"breakdown/{k}": [(int(result["steps"]), float(v))] for k, v in parts.items() if v is not None})
        if result.get("scalars"):  # what the user's script logged (podscale.torch.log / podscale.jax.log)
            from scaling.tensorboard import write_points

            write_points(logdir, {k: [(int(a), float(b)) for a, b in v] for k, v in result["scalars"].items()})



