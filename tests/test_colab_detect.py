"""Accelerator detection for the Colab notebook, with TPU, GPU and CPU runtimes faked at the boundary:
environment variables, a fake root holding /dev and /sys files, and a fake ``nvidia-smi`` on PATH.
The code under test runs unchanged (it reads files and runs the program like on a real runtime).
Plus the notebook's own promises that can be checked without running it.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest

from launchers import colab
from scaling.throughput import catalog

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "colab_tpu.ipynb"


def fake_root(tmp: Path, files: list[str], pci: dict[str, tuple[str, str, str]] | None = None) -> Path:
    """A tree with the given /dev files and PCI devices {slot: (vendor, device, subsystem_device)}."""
    root = tmp / "root"
    for f in files:
        p = root / f.lstrip("/")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.touch()
    for slot, (vendor, device, sub) in (pci or {}).items():
        d = root / "sys/bus/pci/devices" / slot
        d.mkdir(parents=True)
        (d / "vendor").write_text(vendor + "\n")
        (d / "device").write_text(device + "\n")
        (d / "subsystem_device").write_text(sub + "\n")
    root.mkdir(exist_ok=True)
    return root


def fake_nvidia_smi(tmp: Path, names: list[str], rc: int = 0) -> str:
    """A bin dir whose nvidia-smi answers ``--query-gpu=name --format=csv,noheader`` like the real one."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    exe = bin_dir / "nvidia-smi"
    lines = "".join(f"{n}\n" for n in names)
    exe.write_text(f"#!/bin/sh\n[ \"$1\" = --query-gpu=name ] && [ \"$2\" = --format=csv,noheader ] || exit 9\n"
                   f"printf '%s' '{lines}'\nexit {rc}\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return str(bin_dir)


# ---- TPU ------------------------------------------------------------------------------------


def test_colab_v5e_one_chip(tmp_path):
    root = fake_root(tmp_path, ["dev/vfio/0", "dev/vfio/vfio"])
    acc = colab.detect(root, {"TPU_ACCELERATOR_TYPE": "v5litepod-1", "PATH": ""})
    assert (acc.kind, acc.generation, acc.chips, acc.devices, acc.hardware) == ("tpu", "v5e", 1, 1, "tpu-v5e")
    assert acc.pod() == ("tpu-v5e", 256)
    text = acc.describe()
    assert "TPU v5e: 1 chip(s) on this host = 1 device(s)" in text and "197 TFLOPS bf16" in text
    assert "TPU_ACCELERATOR_TYPE=v5litepod-1" in text and "/dev/vfio/0" in text and "vfio/vfio" not in text


@pytest.mark.parametrize("acc_type, files, want", [
    ("v6e-1", ["dev/vfio/0"], ("v6e", 1, 1, "tpu-v6e", ("tpu-v6e", 256))),
    ("v5e-4", ["dev/vfio/0", "dev/vfio/1", "dev/vfio/2", "dev/vfio/3"], ("v5e", 4, 4, "tpu-v5e", ("tpu-v5e", 256))),
    ("v2-8", ["dev/accel0", "dev/accel1", "dev/accel2", "dev/accel3"], ("v2", 4, 8, "tpu-v2-board", ("tpu-v2-pod", 512))),
    ("v3-8", ["dev/accel0", "dev/accel1", "dev/accel2", "dev/accel3"], ("v3", 4, 8, "tpu-v3-board", ("tpu-v3-pod", 2048))),
    ("v4-8", ["dev/accel0", "dev/accel1", "dev/accel2", "dev/accel3"], ("v4", 4, 4, "tpu-v4", ("tpu-v4", 4096))),
    ("v5p-8", ["dev/vfio/0", "dev/vfio/1", "dev/vfio/2", "dev/vfio/3"], ("v5p", 4, 4, "tpu-v5p", ("tpu-v5p", 8960))),
    # one host of a 32-core v4 slice: the host's 4 chips, not the slice's 16, are what a run uses
    ("v4-32", ["dev/accel0", "dev/accel1", "dev/accel2", "dev/accel3"], ("v4", 4, 4, "tpu-v4", ("tpu-v4", 4096))),
])
def test_tpu_types(tmp_path, acc_type, files, want):
    acc = colab.detect(fake_root(tmp_path, files), {"TPU_ACCELERATOR_TYPE": acc_type, "PATH": ""})
    assert (acc.generation, acc.chips, acc.devices, acc.hardware, acc.pod()) == want


def test_tpu_v2_8_without_device_files_counts_chips_from_the_slice_name(tmp_path):
    acc = colab.detect(fake_root(tmp_path, []), {"TPU_ACCELERATOR_TYPE": "v2-8", "PATH": ""})
    assert (acc.chips, acc.devices, acc.hardware) == (4, 8, "tpu-v2-board")
    assert "assumed from the slice name" in acc.describe()


def test_tpu_generation_from_pci_ids_when_the_variable_is_missing(tmp_path):
    pci = {"0000:00:04.0": ("0x1ae0", "0x0063", "0x0000"), "0000:00:05.0": ("0x8086", "0x1234", "0x0000")}
    acc = colab.detect(fake_root(tmp_path, ["dev/vfio/0"], pci), {"PATH": ""})
    assert (acc.kind, acc.generation, acc.hardware, acc.chips) == ("tpu", "v5e", "tpu-v5e", 1)
    v3 = {f"0000:00:0{i}.0": ("0x1ae0", "0x0027", "0x004f") for i in range(4)}
    acc = colab.detect(fake_root(tmp_path / "v3", [], v3), {"PATH": ""})
    assert (acc.generation, acc.chips, acc.devices, acc.hardware) == ("v3", 4, 8, "tpu-v3-board")


def test_tpu_of_unknown_generation_gets_no_catalog_id(tmp_path):
    acc = colab.detect(fake_root(tmp_path, ["dev/accel0"]), {"PATH": ""})
    assert acc.kind == "tpu" and acc.hardware is None and acc.generation is None
    assert "MFU stays empty" in acc.describe() and "TPU_ACCELERATOR_TYPE" in acc.name
    assert acc.pod() == (colab.DEFAULT_POD, 256)
    assert "--hardware" not in colab.run_args(acc, "jax-pmap", colab.defaults(acc))


def test_vfio_groups_alone_are_not_a_tpu(tmp_path):
    acc = colab.detect(fake_root(tmp_path, ["dev/vfio/0", "dev/vfio/1"]), {"PATH": ""})
    assert acc.kind == "cpu"


# ---- GPU ------------------------------------------------------------------------------------


@pytest.mark.parametrize("names, hw", [
    (["Tesla T4"], None),  # Colab's free GPU is not in the catalog: no borrowed peak
    (["NVIDIA L4"], None),
    (["NVIDIA A100-SXM4-40GB"], "a100-sxm4"),
    (["NVIDIA H100 80GB HBM3"] * 8, "h100-sxm"),
    (["NVIDIA H100 PCIe"], None),
    (["NVIDIA H200"], "h200"),
    (["Tesla V100-SXM2-16GB"], "v100-sxm2"),
    (["Tesla P100-PCIE-16GB"], "p100-pcie"),
])
def test_gpu_runtimes(tmp_path, names, hw):
    path = fake_nvidia_smi(tmp_path, names)
    acc = colab.detect(fake_root(tmp_path, []), {"PATH": path})
    assert (acc.kind, acc.chips, acc.devices, acc.hardware, acc.name) == ("gpu", len(names), len(names), hw, names[0])
    assert f"nvidia-smi: {names[0]}" in acc.describe()
    assert colab.torch_backend(acc) == "torch-ddp"


def test_gpu_ids_exist_in_the_catalog():
    for _, hw_id in colab.GPU_NAMES:
        assert catalog.get(hw_id).kind == "gpu"
    for one, board, pod in colab.TPU_CATALOG.values():
        for hw_id in (one, board, pod):
            if hw_id:
                assert catalog.get(hw_id).family == "tpu"


def test_failing_nvidia_smi_falls_back_to_device_nodes(tmp_path):
    path = fake_nvidia_smi(tmp_path, [], rc=9)
    acc = colab.detect(fake_root(tmp_path, ["dev/nvidia0", "dev/nvidia1", "dev/nvidiactl"]), {"PATH": path})
    assert (acc.kind, acc.chips, acc.hardware) == ("gpu", 2, None)
    assert "nvidia-smi exited 9" in acc.describe()


# ---- CPU ------------------------------------------------------------------------------------


def test_cpu_runtime(tmp_path):
    acc = colab.detect(fake_root(tmp_path, []), {"PATH": str(tmp_path)}, cpu_devices=4)
    assert (acc.kind, acc.chips, acc.devices, acc.hardware) == ("cpu", 0, 4, "host-cpu")
    assert "no nvidia-smi on PATH" in acc.describe() and "4 emulated device(s)" in acc.describe()
    assert acc.pod() == ("tpu-v5e", 256)
    # off-TPU the prediction is for the run the notebook makes on Colab's v5e, not the tiny CPU run
    pred = colab.predict_args(acc, colab.defaults(acc))
    on_tpu = colab.predict_args(colab.COLAB_TPU, colab.defaults(colab.COLAB_TPU))
    assert pred == on_tpu and "--hardware tpu-v5e --devices 256" in pred and "--dtype bfloat16" in pred
    with pytest.raises(ValueError, match="cpu_devices=0"):
        colab.detect(fake_root(tmp_path, []), {"PATH": ""}, cpu_devices=0)


def test_setup_env_cpu_sets_device_counts_for_both_frameworks(tmp_path):
    acc = colab.detect(fake_root(tmp_path, []), {"PATH": ""}, cpu_devices=3)
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_dump_to=/x", "COLUMNS": "100"}
    new = colab.setup_env(acc, env)
    assert env["XLA_FLAGS"] == "--xla_dump_to=/x --xla_force_host_platform_device_count=3"
    assert (env["CPU_NUM_DEVICES"], env["PJRT_DEVICE"], env["JAX_PLATFORMS"], env["COLUMNS"]) == ("3", "CPU", "cpu", "100")
    assert new["CPU_NUM_DEVICES"] == "3"


def test_setup_env_warns_when_a_framework_already_started(tmp_path, monkeypatch):
    acc = colab.detect(fake_root(tmp_path, []), {"PATH": ""})
    for k in ("XLA_FLAGS", "JAX_PLATFORMS", "PJRT_DEVICE", "CPU_NUM_DEVICES", "COLUMNS", "TF_CPP_MIN_LOG_LEVEL"):
        monkeypatch.setenv(k, "")  # recorded, so the values setup_env writes are undone after the test
        monkeypatch.delenv(k)
    monkeypatch.setitem(sys.modules, "jax", type(sys)("jax"))
    with pytest.warns(UserWarning, match="jax already imported"):
        colab.setup_env(acc)
    assert os.environ["CPU_NUM_DEVICES"] == "2"


def test_setup_env_tpu_keeps_a_users_choice(tmp_path):
    acc = colab.detect(fake_root(tmp_path, ["dev/vfio/0"]), {"TPU_ACCELERATOR_TYPE": "v6e-1", "PATH": ""})
    env: dict[str, str] = {}
    colab.setup_env(acc, env)
    assert env["PJRT_DEVICE"] == "TPU" and env["TPU_ACCELERATOR_TYPE"] == "v6e-1" and "XLA_FLAGS" not in env
    env = {"PJRT_DEVICE": "CPU"}
    colab.setup_env(acc, env)
    assert env["PJRT_DEVICE"] == "CPU"


def test_run_and_predict_args_on_a_tpu(tmp_path):
    acc = colab.detect(fake_root(tmp_path, ["dev/vfio/0"]), {"TPU_ACCELERATOR_TYPE": "v5litepod-1", "PATH": ""})
    d = colab.defaults(acc)
    args = colab.run_args(acc, "torch-xla", d).split()
    assert args[args.index("--hardware") + 1] == "tpu-v5e" and args[args.index("--devices") + 1] == "1"
    assert args[args.index("--dtype") + 1] == "bfloat16" and args[args.index("--json") + 1] == "runs/torch-xla.json"
    pred = colab.predict_args(acc, d).split()
    assert pred[pred.index("--devices") + 1] == "256"
    assert int(pred[pred.index("--global-batch") + 1]) == 256 * d.per_device_batch
    assert colab.torch_backend(acc) == "torch-xla"


def test_check_exit_and_missing_results(tmp_path):
    colab.check_exit(0, "run")
    with pytest.raises(RuntimeError, match="exited 3 .the run died or hung"):
        colab.check_exit(3, "run --backend jax-pmap")
    with pytest.raises(FileNotFoundError, match="did that run's cell fail"):
        colab.load_results([tmp_path / "nope.json"])


def test_module_prints_what_it_found():
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "TPU_ACCELERATOR_TYPE"}
    p = subprocess.run([sys.executable, "-m", "launchers.colab"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "found by:" in p.stdout and "pod for predict:" in p.stdout


# ---- the notebook's promises ------------------------------------------------------------------


def test_notebook_shape():
    nb = json.loads(NOTEBOOK.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    src = {c["id"]: "".join(c["source"]) for c in code}
    for c in code:
        cid, s = c["id"], src[c["id"]]
        assert s.startswith("# "), f"cell {cid} does not open with its one-line reason"
        assert len(s.splitlines()) <= 9, f"cell {cid} is not short"
        assert not any(ln.startswith(("import jax", "import torch", "from jax", "from torch")) for ln in s.splitlines())
        assert not c.get("outputs") and c.get("execution_count") is None, f"cell {cid} was committed with outputs"
    params = next(c for c in code if "parameters" in c.get("metadata", {}).get("tags", []))
    assert "SKIP_INSTALL" in "".join(params["source"]) and "PODSCALE_NOTEBOOK_CI" in "".join(params["source"])
    install = src["install"]
    assert "\nif not SKIP_INSTALL:\n" in install and install.count("\n    !") == 3  # everything else indented under it
    assert "--no-deps" in install and "-c /tmp/podscale-pins.txt" in install and "--upgrade" not in install
    assert "!{PODSCALE} run" in src["run-jax"] and "!{PODSCALE} run" in src["run-torch"]
    assert "%tensorboard --logdir runs --host 127.0.0.1" in src["tensorboard"]
    assert nb["metadata"]["accelerator"] == "TPU"
