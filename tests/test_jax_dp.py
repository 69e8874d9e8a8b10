"""jax-pmap and jax-sharded end to end, on emulated CPU devices and on 2 processes.

Every multi-device run is a fresh process tree (the XLA device count is fixed at JAX start-up),
started through the real launcher. The runs are independent, so a module fixture starts them two
at a time (the machine has two cores) and each test reads the ones it needs:

- data-parallel equivalence: 1, 2, 4, 8 devices and 2 processes × 2 devices give the losses and
  final parameters of the single-device run (rtol 1e-5), replicas bitwise identical;
- cross-framework: the same --init/--data on torch-ddp gives the same per-step losses (rtol 1e-4);
- a SIGKILLed process in a 2-process run ends the run with exit 3, and --resume from its
  checkpoint reproduces the uninterrupted run's parameters exactly;
- the compiled HLO all-reduces exactly the spec's gradient bytes plus the scalar loss, and XLA's
  FLOPs of the forward + backward match the spec's model FLOPs within 2%.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from scaling.world import run_local
from models.spec import get_spec
from scaling.config import RunConfig
from scaling.run import RESULT_KEYS
from tests.conftest import ROOT, podscale

pytestmark = pytest.mark.slow

D_IN, H, D_OUT = 20, 16, 3
OPTS = {"d_in": D_IN, "hidden": H, "d_out": D_OUT}
GLOBAL_BATCH, STEPS, N_SAMPLES = 32, 50, 80
LR = {"sgd": 0.05, "adam": 0.01}

#: run name -> (backend, devices, processes, optimizer, loss reduction)
RUNS: dict[str, tuple[str, int, int, str, str]] = {
    "pmap-2x2": ("jax-pmap", 4, 2, "sgd", "mean"),
    "sharded-2x2": ("jax-sharded", 4, 2, "sgd", "mean"),
    "sharded-2x2-adam": ("jax-sharded", 4, 2, "adam", "mean"),
    **{f"pmap-{n}": ("jax-pmap", n, 0, "sgd", "mean") for n in (1, 2, 4, 8)},
    **{f"sharded-{n}": ("jax-sharded", n, 0, "sgd", "mean") for n in (1, 2, 4, 8)},
    "shardmap-4": ("jax-sharded", 4, 0, "sgd", "mean"),
    "pmap-2-adam": ("jax-pmap", 2, 0, "adam", "mean"),
    "sharded-2-adam": ("jax-sharded", 2, 0, "adam", "mean"),
    "pmap-2-sum": ("jax-pmap", 2, 0, "sgd", "sum"),
    "sharded-4-sum": ("jax-sharded", 4, 0, "sgd", "sum"),
    "torch-sgd": ("torch-ddp", 1, 0, "sgd", "mean"),
    "torch-adam": ("torch-ddp", 1, 0, "adam", "mean"),
    "torch-sum": ("torch-ddp", 1, 0, "sgd", "sum"),
}
#: the explicit-collective variant of jax-sharded (shard_map + psum, check_vma=False)
EXTRA_ENV = {"shardmap-4": {"PODSCALE_JAX_STEP": "shard_map"}}


def _lr(optimizer: str, reduction: str) -> float:
    # a summed loss has GLOBAL_BATCH * D_OUT times the gradient of the mean: same step size
    return LR[optimizer] / (GLOBAL_BATCH * D_OUT) if reduction == "sum" else LR[optimizer]


def _cli_args(tmp: Path, backend: str, devices: int, processes: int, optimizer: str, reduction: str) -> list[str]:
    args = ["run", "--backend", backend, "--devices", str(devices), "--global-batch", str(GLOBAL_BATCH),
            "--steps", str(STEPS), "--untimed-steps", "1", "--lr", str(_lr(optimizer, reduction)),
            "--optimizer", optimizer, "--loss-reduction", reduction,
            "--data", str(tmp / "data.npz"), "--init", str(tmp / "init.npz"), "--step-timeout", "60", "--quiet"]
    if processes:
        args += ["--processes", str(processes)]
    for k, v in OPTS.items():
        args += ["--model-opt", f"{k}={v}"]
    return args


def _one(tmp: Path, name: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    backend, devices, processes, optimizer, reduction = RUNS[name]
    cfg = RunConfig(backend=backend, devices=devices, processes=processes, global_batch=GLOBAL_BATCH, steps=STEPS,
                    untimed_steps=1, lr=_lr(optimizer, reduction), optimizer=optimizer, loss_reduction=reduction,
                    data=str(tmp / "data.npz"), init=str(tmp / "init.npz"), model_opts=OPTS,
                    params_out=str(tmp / f"{name}.npz"), step_timeout=60, startup_timeout=240)
    raw = run_local(cfg, extra_env=EXTRA_ENV.get(name))
    with np.load(tmp / f"{name}.npz") as z:
        return raw, {k: z[k] for k in z.files}


def _fault_then_resume(tmp: Path) -> dict[str, Any]:
    """Kill process 1 of a 2-process adam run at step 30 (checkpoints every 8), then resume."""
    args = _cli_args(tmp, "jax-sharded", 4, 2, "adam", "mean") + ["--checkpoint-dir", str(tmp / "ckpt"), "--checkpoint-every", "8"]
    t0 = time.monotonic()
    killed = podscale(*args, env={"PODSCALE_FAULT": "1:30"}, check=False, timeout=240)
    killed_s = time.monotonic() - t0
    checkpoints = sorted(p.name for p in (tmp / "ckpt").iterdir())
    resumed = podscale(*args, "--resume", "--json", str(tmp / "resumed.json"), "--params-out", str(tmp / "resumed.npz"), timeout=240)
    with np.load(tmp / "resumed.npz") as z:
        params = {k: z[k] for k in z.files}
    return {"killed": killed, "killed_s": killed_s, "resumed": resumed, "json": json.loads((tmp / "resumed.json").read_text()),
            "params": params, "checkpoints": checkpoints}


STATS_SCRIPT = r"""
import json
from scaling.config import RunConfig
from scaling.backends import jax_dp
out = []
for backend in ("jax-pmap", "jax-sharded"):
    for n in (2, 4, 8):
        small = RunConfig(backend=backend, devices=n, global_batch=32, model_opts={"d_in": 20, "hidden": 16, "d_out": 3})
        full = RunConfig(backend=backend, devices=n, global_batch=64)  # the default mlp 1000-100-10
        out.append({"backend": backend, "devices": n, "small": jax_dp.compiled_stats(small), "full": jax_dp.compiled_stats(full),
                    "allreduce_bytes": jax_dp.allreduce_bytes(small)})
print("STATS " + json.dumps(out))
"""


def _compiled_stats() -> list[dict[str, Any]]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-c", STATS_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    line = next(l for l in p.stdout.splitlines() if l.startswith("STATS "))
    return json.loads(line[len("STATS "):])


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("jaxdp")
    rng = np.random.default_rng(7)
    np.savez(tmp / "data.npz", x=rng.standard_normal((N_SAMPLES, D_IN)).astype(np.float32),
             y=rng.standard_normal((N_SAMPLES, D_OUT)).astype(np.float32))
    init = {"w1": rng.standard_normal((D_IN, H)) * 0.3, "b1": rng.standard_normal(H) * 0.1,
            "w2": rng.standard_normal((H, D_OUT)) * 0.3, "b2": rng.standard_normal(D_OUT) * 0.1}
    np.savez(tmp / "init.npz", **{k: v.astype(np.float32) for k, v in init.items()})
    jobs: dict[str, Any] = {}
    with ThreadPoolExecutor(max_workers=2) as pool:  # two cores: two runs at a time
        jobs["fault"] = pool.submit(_fault_then_resume, tmp)
        jobs["stats"] = pool.submit(_compiled_stats)
        for name in RUNS:
            jobs[name] = pool.submit(_one, tmp, name)
        out: dict[str, Any] = {}
        for name, fut in jobs.items():
            try:
                out[name] = fut.result()
            except Exception as e:  # noqa: BLE001 - reported by the tests that need this run
                out[name] = e
    return out


def get(results: dict[str, Any], name: str) -> Any:
    r = results[name]
    if isinstance(r, Exception):
        raise AssertionError(f"run {name!r} failed: {type(r).__name__}: {r}")
    return r


@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", [n for n, r in RUNS.items() if r[0] != "torch-ddp" and r[3] == "sgd" and r[4] == "mean"])
def test_data_parallel_equals_single_device(results: dict[str, Any], name: str) -> None:
    ref_raw, ref_params = get(results, "pmap-1")
    raw, params = get(results, name)
    backend, devices, processes, _, _ = RUNS[name]
    assert raw["processes"] == (processes or 1)
    assert raw["backend_info"]["devices_per_process"] == devices // (processes or 1)
    assert len(raw["losses"]) == STEPS
    np.testing.assert_allclose(raw["losses"], ref_raw["losses"], rtol=1e-5)
    for k in ref_params:
        np.testing.assert_allclose(params[k], ref_params[k], rtol=1e-5, atol=1e-7, err_msg=f"{name}: {k}")
    assert raw["replicas_identical"] is True
    assert raw["losses"][-1] < 0.8 * raw["losses"][0]  # it trained
    assert raw["backend_info"]["program"] == ("pmap" if backend == "jax-pmap" else "shard_map" if name in EXTRA_ENV else "jit")


@pytest.mark.timeout(900)
def test_two_process_adam_equals_single_process(results: dict[str, Any]) -> None:
    (a, pa), (b, pb) = get(results, "sharded-2x2-adam"), get(results, "pmap-2-adam")
    np.testing.assert_allclose(a["losses"], b["losses"], rtol=1e-5)
    for k in pa:
        np.testing.assert_allclose(pa[k], pb[k], rtol=1e-5, atol=1e-7)
    assert a["replicas_identical"] is True


@pytest.mark.timeout(900)
@pytest.mark.parametrize("torch_run,jax_runs", [
    ("torch-sgd", ["pmap-2", "sharded-2", "pmap-8"]),
    ("torch-adam", ["pmap-2-adam", "sharded-2-adam", "sharded-2x2-adam"]),
    ("torch-sum", ["pmap-2-sum", "sharded-4-sum"]),
])
def test_cross_framework_losses(results: dict[str, Any], torch_run: str, jax_runs: list[str]) -> None:
    t_raw, t_params = get(results, torch_run)
    for name in jax_runs:
        raw, params = get(results, name)
        np.testing.assert_allclose(raw["losses"], t_raw["losses"], rtol=1e-4, err_msg=f"{name} vs {torch_run}")
        for k in t_params:
            np.testing.assert_allclose(params[k], t_params[k], rtol=1e-3, atol=1e-5, err_msg=f"{name} vs {torch_run}: {k}")


@pytest.mark.timeout(900)
def test_killed_process_exits_3_and_resume_reproduces(results: dict[str, Any]) -> None:
    r = get(results, "fault")
    killed = r["killed"]
    assert killed.returncode == 3, killed.stderr[-2000:]
    assert "rank 1 was killed by SIGKILL at step 30" in killed.stderr
    assert r["killed_s"] < 120  # the watchdog ended it; a hang would sit until the test timeout
    assert r["checkpoints"] == ["ckpt-00000016.npz", "ckpt-00000024.npz"]  # atomic, pruned, no temp files
    res = r["json"]
    assert res["resumed_from_step"] == 24
    assert set(RESULT_KEYS) <= set(res)
    ref_raw, ref_params = get(results, "sharded-2x2-adam")
    assert res["losses"] == ref_raw["losses"]
    for k in ref_params:
        np.testing.assert_array_equal(r["params"][k], ref_params[k], err_msg=k)


@pytest.mark.timeout(900)
def test_hlo_allreduce_bytes_equal_gradient_bytes(results: dict[str, Any]) -> None:
    small = get_spec("mlp", **OPTS)
    full = get_spec("mlp")
    stats = get(results, "stats")
    assert {(s["backend"], s["devices"]) for s in stats} == {(b, n) for b in ("jax-pmap", "jax-sharded") for n in (2, 4, 8)}
    for s in stats:
        assert s["small"]["comm_bytes_per_step"] == small.grad_bytes() + 4, s  # + the f32 loss
        assert s["allreduce_bytes"] == small.grad_bytes() + 4
        assert s["full"]["comm_bytes_per_step"] == full.grad_bytes() + 4, s
        # each gradient tensor and the loss is an array of its own in the all-reduce (the predictor
        # prices each one's latency: XLA-CPU reduces them one after another)
        assert s["small"]["allreduce_operands"] == len(small.param_shapes()) + 1, s
    # the runs report the bytes of the program they ran; one device communicates nothing
    for name in ("pmap-2x2", "sharded-8", "pmap-4", "shardmap-4"):
        assert get(results, name)[0]["comm_bytes_per_step"] == small.grad_bytes() + 4
    assert get(results, "sharded-1")[0]["comm_bytes_per_step"] == 0


@pytest.mark.timeout(900)
def test_xla_flops_match_model_flops(results: dict[str, Any]) -> None:
    full = get_spec("mlp")
    for s in get(results, "stats"):
        model = full.train_flops_per_sample * 64
        xla = s["full"]["xla_flops_per_step"]
        assert abs(xla / model - 1) < 0.02, (s["backend"], s["devices"], xla, model)
        # the whole step on one device also runs the (replicated) optimizer update
        assert s["full"]["xla_flops_per_device"] > xla / s["devices"]


def test_jax_dp_module_does_not_import_jax() -> None:
    code = "import sys, scaling.backends.jax_dp as m; import models.flax; assert 'jax' not in sys.modules, 'jax imported'"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)
