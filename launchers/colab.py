"""Helpers for ``notebooks/colab_tpu.ipynb``: find the accelerator, prepare the environment, pick
defaults that fit one chip, and read the runs back.

JAX and torch_xla each claim the TPU for as long as their process lives, so nothing here imports
either: the accelerator is read from what the runtime exposes (``TPU_ACCELERATOR_TYPE``, ``/dev``,
the PCI bus, ``nvidia-smi``) and every training runs as its own ``podscale run`` process. No hidden
state: each helper takes what it needs as arguments, so a plain script on a TPU VM can call them
too (``python -m launchers.colab`` prints what was found).
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, MutableMapping, Sequence

GOOGLE_PCI_VENDOR = "0x1ae0"
#: PCI device id -> TPU generation (v2 and v3 share 0x0027 and differ by subsystem id)
TPU_PCI_IDS = {"0x005e": "v4", "0x0063": "v5e", "0x0062": "v5p", "0x006f": "v6e", "0x0076": "7x"}
TPU_PCI_V2_V3 = {"0x004e": "v2", "0x004f": "v3"}

#: per TPU generation: (JAX devices per chip, most chips one host holds, does the slice name count
#: TensorCores (v2-8 = 4 chips) rather than chips (v5litepod-8 = 8 chips)?)
TPU_GEN = {
    "v2": (2, 4, True), "v3": (2, 4, True), "v4": (1, 4, True), "v5p": (1, 4, True),
    "v5e": (1, 8, False), "v6e": (1, 8, False), "7x": (2, 4, False),
}
#: generation -> (catalog id of one chip, of a 4-chip board, of the full pod); None = not catalogued
TPU_CATALOG: dict[str, tuple[str | None, str | None, str | None]] = {
    "v2": ("tpu-v2-chip", "tpu-v2-board", "tpu-v2-pod"),
    "v3": ("tpu-v3-chip", "tpu-v3-board", "tpu-v3-pod"),
    "v4": ("tpu-v4", None, "tpu-v4"),
    "v5e": ("tpu-v5e", None, "tpu-v5e"),
    "v5p": ("tpu-v5p", None, "tpu-v5p"),
    "v6e": ("tpu-v6e", None, "tpu-v6e"),
    "7x": (None, None, None),
}
#: nvidia-smi name pattern -> catalog id (first match wins). A GPU absent here (T4, L4, ...) gets no
#: id, so MFU stays empty rather than borrowing another chip's peak. PCIe H100/V100 clock lower than
#: the SXM parts the catalog lists, so they are left out too.
GPU_NAMES: tuple[tuple[str, str], ...] = (
    (r"h200", "h200"), (r"h100(?!.*(pcie|nvl))", "h100-sxm"), (r"a100", "a100-sxm4"),
    (r"v100.*sxm2", "v100-sxm2"), (r"p100.*sxm2", "p100-sxm2"), (r"p100.*pcie", "p100-pcie"),
    (r"rtx 4090", "rtx-4090"), (r"titan rtx", "titan-rtx"), (r"1080 ti", "gtx-1080-ti"), (r"gtx 580", "gtx-580"),
)
#: where there is no TPU, the pod the notebook predicts for: Colab's TPU runtime (one v5e chip)
DEFAULT_POD = "tpu-v5e"


@dataclass(frozen=True)
class Accelerator:
    """What this host offers for training, as found without starting any framework."""

    kind: str
    """'tpu', 'gpu' or 'cpu'."""
    name: str
    """For people: 'TPU v5e', 'NVIDIA A100-SXM4-40GB', 'CPU (2 cores)'."""
    chips: int
    """Physical accelerator chips on this host (0 on CPU)."""
    devices: int
    """Framework-visible devices a run uses (v2/v3: 2 per chip; CPU: the emulated count)."""
    hardware: str | None
    """Catalog id passed as ``--hardware`` (its per-device peak is the MFU basis); None = not in the catalog."""
    generation: str | None = None
    """TPU generation ('v5e', 'v6e', 'v2', ...)."""
    accelerator_type: str | None = None
    """TPU_ACCELERATOR_TYPE as the runtime set it (the whole slice, e.g. 'v5litepod-1')."""
    evidence: tuple[str, ...] = field(default_factory=tuple)
    """What was read to reach this answer."""

    def pod(self) -> tuple[str, int]:
        """(catalog id, devices) of the full pod of this TPU generation; Colab's v5e pod elsewhere."""
        from scaling.throughput import catalog

        pod_id = TPU_CATALOG.get(self.generation or "", (None, None, None))[2] if self.kind == "tpu" else None
        hw = catalog.get(pod_id or DEFAULT_POD)
        return hw.id, hw.max_devices or hw.devices

    def describe(self) -> str:
        """Two lines: what was found (and its peak) and why."""
        if self.kind == "cpu":
            head = f"No accelerator: {self.name}, {self.devices} emulated device(s) for the runs"
        else:
            per = " (2 devices per chip)" if self.devices != self.chips else ""
            head = f"{self.name}: {self.chips} chip(s) on this host = {self.devices} device(s){per}"
        head += f"; catalog id {self.hardware}" + _peak_text(self.hardware) if self.hardware else "; not in the catalog: MFU stays empty"
        return head + "\n  found by: " + "; ".join(self.evidence)


def _peak_text(hw_id: str) -> str:
    from scaling.throughput import catalog

    if hw_id == "host-cpu":
        return " (peak = this host's measured GEMM rate)"
    hw = catalog.get(hw_id)
    key, peak = hw.peak_for("bfloat16")
    return f" ({peak / 1e12:.4g} TFLOPS {key} per device)" if peak else ""


# ---- detection ------------------------------------------------------------------------------


def detect(root: str | os.PathLike[str] = "/", env: Mapping[str, str] | None = None, cpu_devices: int = 2) -> Accelerator:
    """TPU, else GPU, else CPU. ``root`` and ``env`` are where /dev, /sys and the variables are read
    (a test passes a fake tree and environment); ``nvidia-smi`` is looked up on ``env['PATH']``."""
    env = os.environ if env is None else env
    return _detect_tpu(Path(root), env) or _detect_gpu(Path(root), env) or _cpu(env, cpu_devices)


def _numbered(root: Path, pattern: str) -> list[str]:
    return sorted(p for p in glob.glob(str(root / pattern)) if re.search(r"\d+$", p))


def _pci_tpus(root: Path) -> list[str]:
    """TPU generation of each Google TPU on the PCI bus (the sysfs files tpu-info reads)."""
    gens = []
    for dev in sorted(glob.glob(str(root / "sys/bus/pci/devices/*"))):
        try:
            if Path(dev, "vendor").read_text().strip() != GOOGLE_PCI_VENDOR:
                continue
            did = Path(dev, "device").read_text().strip()
            gen = TPU_PCI_IDS.get(did)
            if did == "0x0027":
                gen = TPU_PCI_V2_V3.get(Path(dev, "subsystem_device").read_text().strip())
        except OSError:
            continue
        if gen:
            gens.append(gen)
    return gens


def parse_accelerator_type(acc_type: str) -> tuple[str | None, int | None]:
    """'v5litepod-8' -> ('v5e', 8 chips); 'v2-8' -> ('v2', 4 chips: v2..v5p count TensorCores)."""
    m = re.fullmatch(r"(?:tpu[-_ ]?)?v?(\d+)[-_ ]?(litepod|lite|e|p|x)?(?:-(\d+))?", acc_type.strip().lower())
    if not m:
        return None, None
    num, variant, size = m.group(1), m.group(2) or "", m.group(3)
    if num in ("2", "3", "4"):
        gen = f"v{num}"
    elif num == "5":
        gen = "v5p" if variant == "p" else "v5e"
    elif num == "6":
        gen = "v6e"
    elif num == "7":
        gen = "7x"
    else:
        return None, None
    if size is None:
        return gen, None
    counts_cores = TPU_GEN[gen][2]
    return gen, max(1, int(size) // 2) if counts_cores else int(size)


def _detect_tpu(root: Path, env: Mapping[str, str]) -> Accelerator | None:
    acc_type = env.get("TPU_ACCELERATOR_TYPE", "").strip() or None
    accel = _numbered(root, "dev/accel[0-9]*")
    vfio = _numbered(root, "dev/vfio/[0-9]*")
    pci = _pci_tpus(root)
    if not (acc_type or accel or pci):
        return None  # /dev/vfio groups alone are any passthrough device, not evidence of a TPU
    evidence = []
    gen, slice_chips = parse_accelerator_type(acc_type) if acc_type else (None, None)
    if acc_type:
        evidence.append(f"TPU_ACCELERATOR_TYPE={acc_type}" + ("" if gen else " (unrecognised)"))
    if pci:
        evidence.append(f"{len(pci)} Google TPU {pci[0]} on the PCI bus")
        gen = gen or pci[0]
    files = accel or vfio
    if files:
        evidence.append(", ".join("/" + str(Path(f).relative_to(root)) for f in files))
    per_chip, host_max, _ = TPU_GEN.get(gen or "", (1, 8, False))
    if files:
        chips = len(files)
    elif pci:
        chips = len(pci)
    else:
        chips = min(slice_chips or 1, host_max)
        evidence.append(f"no TPU device files: {chips} chip(s) assumed from the slice name")
    one, board, _ = TPU_CATALOG.get(gen or "", (None, None, None))
    hw = board if board and chips == 4 else one
    name = f"TPU {gen}" if gen else "TPU (generation unknown: set TPU_ACCELERATOR_TYPE)"
    return Accelerator("tpu", name, chips, chips * per_chip, hw, gen, acc_type, tuple(evidence))


def gpu_catalog_id(name: str) -> str | None:
    n = name.lower()
    return next((hw for pat, hw in GPU_NAMES if re.search(pat, n)), None)


def _detect_gpu(root: Path, env: Mapping[str, str]) -> Accelerator | None:
    exe = shutil.which("nvidia-smi", path=env.get("PATH", os.defpath))
    names: list[str] = []
    evidence = []
    if exe:
        try:
            p = subprocess.run([exe, "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True,
                               timeout=20, env=dict(env))
            names = [ln.strip() for ln in p.stdout.splitlines() if ln.strip()] if p.returncode == 0 else []
            evidence.append(f"nvidia-smi: {', '.join(names)}" if names else f"nvidia-smi exited {p.returncode}")
        except (OSError, subprocess.TimeoutExpired) as e:
            evidence.append(f"nvidia-smi failed ({type(e).__name__})")
    nodes = _numbered(root, "dev/nvidia[0-9]*")
    if not names and nodes:
        names = ["NVIDIA GPU (model unknown: nvidia-smi gave no names)"] * len(nodes)
        evidence.append(", ".join("/" + str(Path(f).relative_to(root)) for f in nodes))
    if not names:
        return None
    hw = gpu_catalog_id(names[0])
    label = names[0] if len(set(names)) == 1 else " + ".join(sorted(set(names)))
    return Accelerator("gpu", label, len(names), len(names), hw, evidence=tuple(evidence))


def _cpu(env: Mapping[str, str], devices: int) -> Accelerator:
    if devices < 1:
        raise ValueError(f"cpu_devices={devices}: must be a positive integer")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    why = ("no TPU_ACCELERATOR_TYPE, /dev/accel*, or Google TPU on the PCI bus",
           "no nvidia-smi on PATH" if not shutil.which("nvidia-smi", path=env.get("PATH", os.defpath)) else "nvidia-smi lists no GPU")
    return Accelerator("cpu", f"CPU ({cores} cores)", 0, devices, "host-cpu", evidence=why)


# ---- environment and defaults ---------------------------------------------------------------

_COUNT_FLAG = re.compile(r"--xla_force_host_platform_device_count=\S+")


def setup_env(acc: Accelerator, env: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set, in ``env`` (default: this process's environment, which ``!podscale`` inherits), what the
    frameworks read once when they start: on CPU the emulated device count for JAX (XLA_FLAGS) and
    torch_xla (CPU_NUM_DEVICES), on TPU the PJRT platform. Returns what it set. Variables a user
    already chose are left alone, except the CPU device count, which must match the runs."""
    env = os.environ if env is None else env
    new: dict[str, str] = {"COLUMNS": env.get("COLUMNS", "160"), "TF_CPP_MIN_LOG_LEVEL": env.get("TF_CPP_MIN_LOG_LEVEL", "2")}
    if acc.kind == "cpu":
        flags = _COUNT_FLAG.sub("", env.get("XLA_FLAGS", ""))
        new.update(JAX_PLATFORMS="cpu", PJRT_DEVICE="CPU", CPU_NUM_DEVICES=str(acc.devices),
                   XLA_FLAGS=" ".join(f"{flags} --xla_force_host_platform_device_count={acc.devices}".split()))
    elif acc.kind == "tpu":
        new["PJRT_DEVICE"] = env.get("PJRT_DEVICE", "TPU")
        if acc.accelerator_type and "TPU_ACCELERATOR_TYPE" not in env:
            new["TPU_ACCELERATOR_TYPE"] = acc.accelerator_type
    elif acc.kind == "gpu":
        new["XLA_PYTHON_CLIENT_PREALLOCATE"] = env.get("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    env.update(new)
    started = [m for m in ("jax", "torch_xla") if m in sys.modules]
    if started and env is os.environ:
        warnings.warn(f"{', '.join(started)} already imported in this process: the settings reach only processes started "
                      f"from now on (podscale run), not this one", stacklevel=2)
    return new


@dataclass(frozen=True)
class RunDefaults:
    """One run that fits a single chip: a matmul-heavy MLP whose per-device batch keeps the MXU busy
    on a TPU, and the lecture's small TwoLayerNet on CPU, where the point is that it runs at all."""

    model: str
    model_opts: dict[str, str]
    devices: int
    per_device_batch: int
    steps: int
    untimed_steps: int
    dtype: str

    @property
    def global_batch(self) -> int:
        return self.per_device_batch * self.devices

    def model_args(self) -> list[str]:
        out = ["--model", self.model]
        for k, v in self.model_opts.items():
            out += ["--model-opt", f"{k}={v}"]
        return out

    def __str__(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in self.model_opts.items())
        return (f"{self.model}{f' ({opts})' if opts else ''} on {self.devices} device(s), global batch {self.global_batch} "
                f"({self.per_device_batch} per device), {self.steps} steps ({self.untimed_steps} untimed), {self.dtype}")


def defaults(acc: Accelerator) -> RunDefaults:
    if acc.kind == "cpu":
        return RunDefaults("mlp", {}, acc.devices, 32, 10, 2, "float32")
    # 33.6 M parameters (134 MB fp32 + SGD): fits a 16 GB v5e chip or one 8 GB v2 TensorCore many times over;
    # 2048 samples per device x 201 MFLOPs each is ~2 ms of a v5e's bf16 peak, well above per-step overheads.
    return RunDefaults("mlp", {"d_in": "2048", "hidden": "8192", "d_out": "2048"}, acc.devices, 2048, 30, 5, "bfloat16")


def torch_backend(acc: Accelerator) -> str:
    """torch-xla on TPU (and on CPU where torch_xla is installed); torch-ddp where it is not (GPU runtimes)."""
    if acc.kind == "tpu" or (acc.kind == "cpu" and importlib.util.find_spec("torch_xla") is not None):
        return "torch-xla"
    return "torch-ddp"


def podscale_exe() -> str:
    """The ``podscale`` of this interpreter's environment (a notebook kernel's PATH may lack it)."""
    beside = Path(sys.executable).with_name("podscale")
    if beside.is_file():
        return str(beside)
    return shutil.which("podscale") or f"{shlex.quote(sys.executable)} -m launchers.cli"


def run_args(acc: Accelerator, backend: str, d: RunDefaults, out: str = "runs") -> str:
    """Arguments of ``podscale run`` for one backend on every local device; result JSON and
    TensorBoard scalars go to ``out/<backend>.json`` and ``out/<backend>/``."""
    args = ["--backend", backend, *d.model_args(), "--devices", str(d.devices), "--global-batch", str(d.global_batch),
            "--steps", str(d.steps), "--untimed-steps", str(d.untimed_steps), "--dtype", d.dtype,
            "--json", f"{out}/{backend}.json", "--logdir", out, "--run-name", backend]
    if acc.hardware:
        args += ["--hardware", acc.hardware]
    return shlex.join(args)


#: the runtime the notebook is written for: Colab's TPU, one v5e chip
COLAB_TPU = Accelerator("tpu", "TPU v5e", 1, 1, "tpu-v5e", "v5e", "v5litepod-1", ("Colab's TPU runtime",))


def predict_args(acc: Accelerator, d: RunDefaults) -> str:
    """``podscale predict`` arguments: the same model and per-device batch on the full pod (weak
    scaling). Without a TPU here, it is the run this notebook makes on Colab's TPU (a v5e chip),
    on a v5e pod: the tiny CPU run would predict nothing worth reading."""
    if acc.kind != "tpu":
        acc, d = COLAB_TPU, defaults(COLAB_TPU)
    pod, n = acc.pod()
    args = [*d.model_args(), "--hardware", pod, "--devices", str(n), "--global-batch", str(d.per_device_batch * n),
            "--dtype", d.dtype, "--scaling", "weak"]
    return shlex.join(args)


def check_exit(code: Any, what: str) -> None:
    """Turn a ``!podscale`` exit status (IPython's ``_exit_code``) into a failed cell."""
    if code != 0:
        meaning = {2: "bad input", 3: "the run died or hung"}.get(code, "see the output above")
        raise RuntimeError(f"podscale {what} exited {code} ({meaning})")


# ---- results --------------------------------------------------------------------------------


def load_results(paths: Sequence[str | os.PathLike[str]]) -> list[dict[str, Any]]:
    out = []
    for p in paths:
        try:
            out.append(json.loads(Path(p).read_text()))
        except FileNotFoundError:
            raise FileNotFoundError(f"{p}: no result (did that run's cell fail?)") from None
    return out


def results_table(results: Sequence[Mapping[str, Any]]) -> Any:
    """Runs side by side: achieved TFLOPS and MFU against the peak of the hardware each ran on."""
    from rich.table import Table

    from scaling.report import mfu_text

    t = Table(title="podscale on this runtime: achieved TFLOPS and MFU", title_style="bold")
    for col in ("backend", "hardware", "devices", "global batch", "step time", "samples/s", "achieved TFLOPS",
                "peak TFLOPS", "MFU", "final loss"):
        t.add_column(col, justify="left" if col in ("backend", "hardware") else "right")
    for r in results:
        peak = r.get("peak_flops")
        mfu = r.get("mfu")
        t.add_row(r["backend"], str(r["hardware"]), str(r["devices"]), str(r["global_batch"]),
                  f"{r['step_time_s'] * 1e3:.3g} ms", f"{r['samples_per_s']:,.0f}", f"{r['achieved_flops'] / 1e12:.4g}",
                  f"{peak / 1e12:.4g} {r.get('peak_dtype', '')}" if peak else "n/a",
                  mfu_text(mfu), f"{r['losses'][-1]:.6g}")
    return t


def print_results(paths: Sequence[str | os.PathLike[str]]) -> list[dict[str, Any]]:
    from rich.console import Console

    results = load_results(paths)
    Console(width=160).print(results_table(results))
    return results


def logdir_summary(logdir: str | os.PathLike[str]) -> str:
    """Which runs TensorBoard will show: one line per run directory holding event files."""
    root = Path(logdir)
    runs = sorted({f.parent for f in root.rglob("events.out.tfevents.*")})
    if not runs:
        return f"{root}: no TensorBoard event files yet"
    return f"TensorBoard logdir {root}: " + ", ".join(
        f"{r.relative_to(root)} ({len(list(r.glob('events.out.tfevents.*')))} event file(s))" for r in runs)


def main() -> int:
    acc = detect()
    print(acc.describe())
    print("run defaults:", defaults(acc))
    print("pod for predict:", "%s x %d devices" % acc.pod())
    return 0


if __name__ == "__main__":
    sys.exit(main())
