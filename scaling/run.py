"""From a backend's raw per-step record to the RunResult every front end reports.

One function for every launcher (local processes, Ray, Colab), so the JSON keys and the meaning
of each number never depend on how the world was started.
"""

from __future__ import annotations

import json
import os
import platform

from pathlib import Path
from typing import Any

from models.spec import get_spec
from scaling import __version__, hardware
from scaling.config import RunConfig
from scaling.errors import UsageError
from scaling.meter import median_step_time, run_peak, throughput

#: every key a run's JSON holds (tests check the set)
RESULT_KEYS = (
    "backend", "model", "devices", "processes", "global_batch", "per_device_batch", "steps", "untimed_steps",
    "dtype", "optimizer", "loss_reduction", "losses", "step_times_s", "step_time_s", "samples_per_s",
    "model_flops_per_step", "xla_flops_per_step", "achieved_flops", "achieved_flops_per_device", "achieved_pflops",
    "peak_flops", "peak_dtype", "mfu", "predicted_step_time_s", "prediction_error", "final_params_l2",
    "replicas_identical", "hardware", "versions", "config",
)


def resolve_hardware(cfg: RunConfig, raw: dict[str, Any]) -> tuple[str, hardware.Hardware | None]:
    hw_id = cfg.hardware or raw.get("hardware") or hardware.detect(cfg.backend)
    try:
        return hw_id, hardware.get(hw_id)
    except UsageError:
        return hw_id, None  # unknown chip: MFU stays null, never another chip's peak


def predict(cfg: RunConfig, hw_id: str) -> float | None:
    """Predicted step time from the throughput model, when it and a calibration are available."""
    try:
        from scaling import perfmodel
    except ImportError:
        return None
    fn = getattr(perfmodel, "predict_run", None)
    if fn is None:
        return None
    try:
        return fn(cfg, hw_id)
    except UsageError:
        return None


def finish(cfg: RunConfig, raw: dict[str, Any]) -> dict[str, Any]:
    spec = get_spec(cfg.model, **cfg.model_opts)
    hw_id, hw = resolve_hardware(cfg, raw)
    # TPUs publish no fp32 matmul peak: an fp32 run there is measured against bf16, and says so
    peak_key, device_peak = hw.peak_for(cfg.dtype) if hw else (hardware.PEAK_DTYPE[cfg.dtype], None)
    peak = run_peak(device_peak, cfg.devices, shared_host=bool(hw and hw.kind == "cpu"))
    step_times = list(raw["step_times"])
    st = median_step_time(step_times, cfg.untimed_steps)
    tp = throughput(st, cfg.global_batch, spec.train_flops_per_sample, cfg.devices, peak)
    if hw is not None and hw.id == "host-cpu" and peak and tp.achieved_flops > peak:
        # achieved above peak means the cached host peak was measured on a busy machine: re-measure once
        device_peak = hardware.measured_host_peaks(refresh=True).get(peak_key)
        peak = run_peak(device_peak, cfg.devices, shared_host=True)
        tp = throughput(st, cfg.global_batch, spec.train_flops_per_sample, cfg.devices, peak)
    predicted = predict(cfg, hw_id)
    versions = {"podscale": __version__, "python": platform.python_version(), **raw.get("versions", {})}
    result = {
        "backend": cfg.backend,
        "model": cfg.model,
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
        "model_flops_per_step": tp.model_flops_per_step,
        "xla_flops_per_step": raw.get("xla_flops_per_step"),
        "achieved_flops": tp.achieved_flops,
        "achieved_flops_per_device": tp.achieved_flops_per_device,
        "achieved_pflops": tp.achieved_pflops,
        "peak_flops": peak,
        "peak_dtype": peak_key,
        "mfu": tp.mfu,
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
    result.pop("step_times", None)
    return result


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


def write_outputs(result: dict[str, Any], cfg: RunConfig) -> None:
    if cfg.json_path:
        p = Path(cfg.json_path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(result, indent=2))
        os.replace(tmp, p)
    if cfg.logdir:
        from scaling.tensorboard import write_scalars

        write_scalars(cfg.logdir, per_step_series(result),
                      text={"config": "    " + json.dumps(cfg.to_dict(), indent=2).replace("\n", "\n    ")})



