"""Compute by execution unit: which unit a dtype's matmuls run on, and the fraction of its peak
(and of the memory bandwidth) that work attains.

Why per unit: fp32 CUDA cores, tensor cores and TPU MXUs sustain very different shares of their
peaks on the same network (ResNet-50: ~60-80% of the fp32 peak, ~20-40% of the 16-bit tensor peak),
so one eta for all of them over-predicts 16-bit throughput 2.5-3x. Each fraction below names where
it comes from: a measurement that is not a training run, or, where none is in the repo, a fit on
the public calibration set (``scaling/throughput/published_runs.toml``), labelled ``fitted``.
The fractions are per unit *family*, never per chip or per case.
"""

from __future__ import annotations

from dataclasses import dataclass

from scaling.errors import UsageError
from scaling.throughput import catalog


@dataclass(frozen=True)
class Attainable:
    """A fraction of a peak (or a time) and where it comes from."""

    value: float
    source: str

    @property
    def fitted(self) -> bool:
        return self.source.startswith("fitted")

    @property
    def basis(self) -> str:
        """fitted (on the calibration set), assumed (no source), or sourced (a cited measurement)."""
        if self.fitted:
            return "fitted"
        return "assumed" if self.source.startswith(("not", "assumed")) else "sourced"


#: the calibration set the fitted values come from (bench/published.py prints the fit's errors)
_FIT = "fitted on the calibration set (scaling/throughput/published_runs.toml; bench/published.py)"

#: (hardware family, catalog peak key) -> the execution unit those matmuls run on
UNITS: dict[tuple[str, str], str] = {
    ("gpu", "fp32"): "gpu-fp32-simt",
    ("gpu", "tf32"): "gpu-tensor-tf32",
    ("gpu", "fp16"): "gpu-tensor-16bit",
    ("gpu", "bf16"): "gpu-tensor-16bit",
    ("tpu", "bf16"): "tpu-mxu-bf16",
    ("cpu", "fp32"): "cpu-simd",
    ("cpu", "bf16"): "cpu-simd",
}

#: GPU architectures before Volta: no tensor cores (P100's fp16 is SIMT half2 at 2x the fp32 rate), and
#: the cuDNN 5-7 convolutions of their era
PRE_TENSOR_CORE_ARCHS = ("tesla", "fermi", "kepler", "maxwell", "pascal")

#: attainable fraction of the unit's dense peak for a training step's convolutions and matmuls.
#: Convolutions of a CNN's early layers (few channels, large maps) and the matmul shapes of a
#: training step run far below a large square GEMM's rate, so a cuBLAS GEMM figure (~0.85-0.9 of
#: peak) is an upper bound, not the value; these are fits on the set, labelled so.
COMPUTE_FRACTION: dict[str, Attainable] = {
    "gpu-fp32-simt": Attainable(0.78, _FIT + ": V100 FP32 1-GPU ResNet-50 (Volta and later)"),
    "gpu-fp32-simt-pre-volta": Attainable(0.37, _FIT + ": Goyal 2017's 8 P100s (138 img/s per GPU at 32 per GPU); "
                                                "corroborated by jcjohnson/cnn-benchmarks, GTX 1080 + cuDNN 5.0.05, "
                                                "ResNet-50 forward + backward 153.9 ms at batch 16 (0.38 by the same roofline)"),
    "gpu-fp16-simt-pre-volta": Attainable(0.37, "not fitted: no pre-Volta fp16 run in the set; assumed equal to "
                                                "gpu-fp32-simt-pre-volta (half2 on the same SIMT cores)"),
    "gpu-tensor-tf32": Attainable(0.24, _FIT + ": A100 TF32 1-GPU ResNet-50 (NCHW, cuDNN TF32 convolutions)"),
    "gpu-tensor-16bit": Attainable(0.40, _FIT + ": V100 and A100 AMP 1-GPU ResNet-50 (one value for both)"),
    "tpu-mxu-bf16": Attainable(0.40, "not fitted: assumed equal to gpu-tensor-16bit; checked afterwards, not tuned, "
                                     "against Ying et al. 2018 (1024-chip v3 pod, 1.05M img/s): -1.1%"),
    "cpu-simd": Attainable(0.5, "assumed: half the SIMD peak (catalog CPUs only; host-cpu is measured by calibrate)"),
}

#: attainable fraction of the memory bandwidth for elementwise, norm and pooling layers
MEMORY_FRACTION: dict[str, Attainable] = {
    "gpu": Attainable(0.88, "cub::DeviceTransform BabelStream copy/triad at 2^28 elements: 87.8% of the DRAM peak "
                            "(BWUtil column, NVIDIA/cccl pull request #9881)"),
    "tpu": Attainable(0.88, "not sourced: assumed equal to the GPU figure"),
    "cpu": Attainable(0.70, "not sourced: assumed (STREAM on multi-channel DDR typically 60-80%)"),
}

#: per-kernel launch cost (s): a step of a few hundred kernels pays it per kernel
LAUNCH_S: dict[str, Attainable] = {
    "gpu": Attainable(4e-6, "assumed: ~4 us per kernel launch (no cited measurement in the repo; at ResNet-50's ~500 "
                            "kernels per step it is 2 ms of a 100-300 ms step)"),
    "tpu": Attainable(0.0, "XLA compiles the step into fused programs: no per-kernel launch from the host"),
    "cpu": Attainable(0.0, "no launch cost modelled on catalog CPUs"),
}

#: attainable fraction of a link's nominal per-direction bandwidth for a large all-reduce
LINK_FRACTION: dict[str, Attainable] = {
    "nvlink": Attainable(0.69, "nccl-tests all_reduce_perf on 8x A100 SXM NVLink: busbw ~200-208 GB/s of 300 GB/s "
                               "per direction (NVIDIA/nccl-tests issues #149, #178)"),
    "network": Attainable(0.85, "nccl-tests all_reduce_perf over 4x HDR InfiniBand per 8 A100s: 84.8 GB/s average of "
                                "100 GB/s (NVIDIA/nccl-tests issue #119)"),
    "ici": Attainable(1.0, "Google's all-reduce bandwidth per pod equals chips x per-direction ICI bandwidth "
                           "(Cloud TPU v5e docs: 51.2 TB/s = 256 x 200 GB/s): no derating"),
}


#: the largest share of an all-reduce that running it beside backward can hide (roofline's overlap rule)
OVERLAP_HIDDEN = Attainable(0.3, _FIT + ": the cross-node efficiencies (Goyal 2017 90%, Horovod 2018 88% x 2) "
                                 "meet their targets for 0.2-0.35; 0.3 taken")


#: a data-parallel step's cost for each further GPU in its node, beyond the modelled all-reduce
PEER_STEP_S = Attainable(1.1e-3, _FIT + ": DeepLearningExamples' ResNet-50 steps at 8 GPUs are 8.6 ms (DGX-1 FP32) and "
                                 "9.6 ms (DGX A100 TF32) longer than at 1, of which the exposed all-reduce is 1.6 and 0.9 ms; "
                                 "the rest over 7 further GPUs is 1.0 and 1.25 ms each; 1.1 taken. Not bandwidth: it does "
                                 "not shrink from NVLink cube-mesh to NVSwitch, nor with a shorter (AMP) step. The AMP "
                                 "cases were left out of the fit (their input-pipeline limit, published_runs.toml)")


def unit_for(hw: catalog.Hardware, peak_key: str) -> str:
    """The execution unit a matmul in ``peak_key`` runs on: before Volta, fp32 and fp16 both run on the
    SIMT cores (no tensor cores), with their era's convolution kernels."""
    if hw.family == "gpu" and hw.arch in PRE_TENSOR_CORE_ARCHS and peak_key in ("fp32", "fp16"):
        return f"gpu-{peak_key}-simt-pre-volta"
    return UNITS.get((hw.family, peak_key), f"{hw.family}-{peak_key}")


def compute_fraction(hw: catalog.Hardware, peak_key: str) -> Attainable:
    return COMPUTE_FRACTION.get(unit_for(hw, peak_key), COMPUTE_FRACTION["gpu-fp32-simt"])


def memory_fraction(hw: catalog.Hardware) -> Attainable:
    return MEMORY_FRACTION.get(hw.family, MEMORY_FRACTION["gpu"])


def launch_s(hw: catalog.Hardware) -> Attainable:
    return LAUNCH_S.get(hw.family, LAUNCH_S["gpu"])


#: what a run on this machine's CPU can compute in (no TF32 or fp16 matmul unit on a CPU)
HOST_DTYPES = ("float32", "bfloat16")


def check_dtype(hw: catalog.Hardware, dtype: str) -> tuple[str, float]:
    """(peak key, per-device peak) of the unit ``dtype``'s matmuls run on; UsageError naming the
    dtypes this hardware has when it has no such unit (``float16`` on a TPU, ``tf32`` on a V100)."""
    if dtype not in catalog.PEAK_DTYPE:
        raise UsageError(f"invalid --dtype {dtype!r}; valid: {', '.join(catalog.PEAK_DTYPE)}")
    if hw.id == "host-cpu":  # its peaks are measured (maybe not yet): its units are what torch/XLA run on a CPU
        if dtype not in HOST_DTYPES:
            raise UsageError(f"--dtype {dtype}: this host's CPU has no {catalog.PEAK_DTYPE[dtype]} unit; "
                             f"valid on host-cpu: {', '.join(HOST_DTYPES)}")
        return hw.peak_for(dtype)[0], hw.peak_for(dtype)[1] or 0.0
    key, peak = hw.peak_for(dtype)
    if peak is None:
        has = hw.dtypes()
        raise UsageError(f"--dtype {dtype}: {hw.id} has no {catalog.PEAK_DTYPE[dtype]} unit; "
                         f"valid on {hw.id}: {', '.join(has) or 'none in the catalog'}")
    return key, peak
