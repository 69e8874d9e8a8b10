"""`podscale run` as a user meets it: outputs, bad input, dead and stuck ranks, kill-and-resume."""

from __future__ import annotations

import json
import re
import time

import numpy as np
import pytest

from scaling.run import RESULT_KEYS
from scaling.tensorboard import read_scalars
from tests.conftest import podscale

SMALL = ("--model-opt", "d_in=32", "--model-opt", "hidden=16", "--model-opt", "d_out=4", "--global-batch", "16", "--quiet")

ISSUE_KEYS = {"backend", "model", "devices", "global_batch", "steps", "dtype", "losses", "step_time_s", "samples_per_s",
              "model_flops_per_step", "achieved_flops", "achieved_pflops", "peak_flops", "peak_dtype", "mfu",
              "predicted_step_time_s", "final_params_l2", "replicas_identical", "hardware", "versions"}


@pytest.mark.slow
def test_json_and_tensorboard_outputs(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text('steps = 6\nuntimed-steps = 1\noptimizer = "adam"\nlr = 0.5\n[model_opts]\nhidden = 8\n')
    podscale("run", "--config", str(cfg), "--devices", "2", "--lr", "0.01", "--json", str(tmp_path / "r.json"),
             "--logdir", str(tmp_path / "tb"), "--model-opt", "d_in=32", "--global-batch", "16", "--quiet")
    r = json.loads((tmp_path / "r.json").read_text())
    assert ISSUE_KEYS <= set(r) and set(RESULT_KEYS) <= set(r)
    # the file set steps/optimizer/hidden; the flag overrode lr
    assert r["steps"] == 6 and r["optimizer"] == "adam" and r["config"]["lr"] == 0.01
    assert r["config"]["model_opts"] == {"hidden": 8, "d_in": "32"}
    assert len(r["losses"]) == 6 and len(r["step_times_s"]) == 6
    assert r["model_flops_per_step"] == 16 * (2 * (32 * 8 + 8 * 10) + (2 * 32 * 8 + 4 * 8 * 10))
    assert r["achieved_flops"] == pytest.approx(r["model_flops_per_step"] / r["step_time_s"])
    assert r["step_time_s"] == pytest.approx(float(np.median(r["step_times_s"][1:])))
    assert r["hardware"] == "host-cpu" and r["peak_dtype"] == "fp32"
    # two emulated devices share the host's one measured peak
    assert r["mfu"] == pytest.approx(r["achieved_flops"] / r["peak_flops"])
    assert r["replicas_identical"] is True and r["versions"]["torch"]
    (run,) = (tmp_path / "tb").iterdir()  # each run in its own subfolder, TensorBoard's "run"
    assert re.fullmatch(r"torch-ddp-mlp-2dev-\d{8}-\d{6}", run.name), run.name
    scalars = read_scalars(run)
    assert {"loss", "step_time_s", "samples_per_s", "achieved_tflops", "mfu"} <= set(scalars)
    assert [v for _, v in scalars["loss"]] == pytest.approx(r["losses"], rel=1e-6)
    assert [s for s, _ in scalars["step_time_s"]] == list(range(2, 7))  # untimed step 1 has no timing
    # a second run into the same --logdir, named: its own TensorBoard run beside the first
    p = podscale("run", "--steps", "2", "--untimed-steps", "0", "--logdir", str(tmp_path / "tb"), "--run-name", "again",
                 "--json", str(tmp_path / "r2.json"), *SMALL)
    assert sorted(d.name for d in (tmp_path / "tb").iterdir()) == sorted([run.name, "again"])
    assert len(read_scalars(tmp_path / "tb" / "again")["loss"]) == 2
    assert f"wrote {tmp_path / 'r2.json'}" in p.stdout and f"wrote {tmp_path / 'tb' / 'again'}" in p.stdout


BAD_INPUTS = [
    (("--devices", "0"), "--devices 0"),
    (("--devices", "3", "--global-batch", "16"), "--global-batch 16 does not divide evenly over --devices 3"),
    (("--backend", "torch-dpp"), "unknown backend 'torch-dpp' (did you mean 'torch-ddp'?); valid: torch-ddp"),
    (("--model", "resnet9000"), "unknown model 'resnet9000'"),
    (("--devices", "two"), "invalid int value: 'two'"),
    (("--steps", "3", "--untimed-steps", "3"), "--untimed-steps 3"),
]


@pytest.mark.parametrize("args,message", BAD_INPUTS)
def test_bad_input_exits_2_with_one_line(args, message):
    p = podscale("run", "--steps", "3", *SMALL[:-3], *args, check=False, timeout=60)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], p.stderr
    assert "Traceback" not in p.stderr


def test_malformed_and_misshaped_npz(tmp_path):
    (tmp_path / "garbage.npz").write_bytes(b"not a zip file at all")
    np.savez(tmp_path / "shape.npz", x=np.zeros((10, 31), np.float32), y=np.zeros((10, 4), np.float32))
    np.savez(tmp_path / "names.npz", inputs=np.zeros((10, 32), np.float32))
    np.savez(tmp_path / "init.npz", w1=np.zeros((32, 15), np.float32), b1=np.zeros(16, np.float32),
             w2=np.zeros((16, 4), np.float32), b2=np.zeros(4, np.float32))
    cases = [
        (("--data", str(tmp_path / "garbage.npz")), "is not a readable .npz"),
        (("--data", str(tmp_path / "shape.npz")), "x has sample shape (31,), model 'mlp' expects (32,)"),
        (("--data", str(tmp_path / "names.npz")), "expected arrays 'x' and 'y'"),
        (("--data", str(tmp_path / "missing.npz")), "no such file"),
        (("--init", str(tmp_path / "init.npz")), "parameter 'w1' has shape (32, 15), expected (32, 16)"),
    ]
    for args, message in cases:
        p = podscale("run", "--steps", "3", *SMALL, *args, check=False, timeout=60)
        assert p.returncode == 2 and message in p.stderr and len(p.stderr.strip().splitlines()) == 1, (args, p.stderr)


def _since_fault(stderr: str) -> float:
    """Seconds from the injected fault (its own timestamp) to now, when the launcher has exited."""
    m = re.search(r"PODSCALE_FAULT injected: .*\(unix time ([0-9.]+)\)", stderr)
    assert m, stderr
    return time.time() - float(m.group(1))


@pytest.mark.slow
def test_killed_rank_ends_run_with_exit_3_naming_it():
    p = podscale("run", "--devices", "4", "--steps", "200", "--step-timeout", "20", *SMALL,
                 env={"PODSCALE_FAULT": "1:3"}, check=False, timeout=120)
    assert p.returncode == 3, p.stderr
    assert "rank 1 was killed by SIGKILL at step 3 of 200" in p.stderr
    assert _since_fault(p.stderr) < 20 + 10  # --step-timeout + 10 s, from the kill itself


@pytest.mark.slow
def test_stuck_rank_is_killed_by_the_watchdog():
    p = podscale("run", "--devices", "2", "--steps", "200", "--step-timeout", "3", *SMALL,
                 env={"PODSCALE_FAULT": "0:4:hang"}, check=False, timeout=120)
    assert p.returncode == 3, p.stderr
    assert "no progress for 3s" in p.stderr and "stuck at step 4" in p.stderr
    assert _since_fault(p.stderr) < 3 + 10


@pytest.mark.slow
def test_kill_and_resume_matches_uninterrupted(tmp_path):
    common = ("--devices", "2", "--steps", "10", "--optimizer", "adam", "--lr", "0.01", *SMALL)
    podscale("run", *common, "--params-out", str(tmp_path / "full.npz"), "--json", str(tmp_path / "full.json"))
    ck = str(tmp_path / "ckpt")
    p = podscale("run", *common, "--checkpoint-dir", ck, "--checkpoint-every", "3", env={"PODSCALE_FAULT": "1:7"}, check=False)
    assert p.returncode == 3
    names = sorted(x.name for x in (tmp_path / "ckpt").iterdir())
    assert names == ["ckpt-00000003.pt", "ckpt-00000006.pt"]  # no temp files left behind
    podscale("run", *common, "--checkpoint-dir", ck, "--checkpoint-every", "3", "--resume",
             "--params-out", str(tmp_path / "resumed.npz"), "--json", str(tmp_path / "resumed.json"))
    full, resumed = np.load(tmp_path / "full.npz"), np.load(tmp_path / "resumed.npz")
    for k in full.files:
        assert np.array_equal(full[k], resumed[k]), k  # bit for bit
    rf, rr = json.loads((tmp_path / "full.json").read_text()), json.loads((tmp_path / "resumed.json").read_text())
    assert rr["resumed_from_step"] == 6
    assert rr["losses"] == rf["losses"]


@pytest.mark.slow
def test_sigterm_to_the_launcher_kills_its_ranks(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    import psutil

    from tests.conftest import ROOT

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("PODSCALE_FAULT", None)
    p = subprocess.Popen([sys.executable, "-m", "launchers.cli", "run", "--devices", "2", "--steps", "100000", *SMALL],
                         cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    ranks = []
    while time.monotonic() < deadline and len(ranks) < 2:
        ranks = [c for c in psutil.Process(p.pid).children(recursive=True) if "scaling.worker" in " ".join(c.cmdline())]
        time.sleep(0.2)
    assert len(ranks) == 2
    time.sleep(1.0)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=30)
    assert p.returncode == 143 and "all ranks were killed" in err
    gone, alive = psutil.wait_procs(ranks, timeout=10)
    assert not alive
