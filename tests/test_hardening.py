"""What a careless or unlucky user does, and what podscale must do then (issue: hardening).

Each case of the issue's table is a test here; the fuzz test at the end generates bad input from
this file's own table of RunConfig's fields, types and ranges (never from RunConfig's validators).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from launchers import cli
from tests.conftest import ROOT, podscale

SMALL = ("--model-opt", "d_in=32", "--model-opt", "hidden=16", "--model-opt", "d_out=4", "--global-batch", "16", "--quiet")


def _cli(argv: list[str], cwd: Path) -> tuple[int, str]:
    """``podscale ARGV`` in this process, with any start of a run turned into a test failure: bad
    input must be refused before anything starts. Returns (exit code, stderr)."""
    err = io.StringIO()
    started = AssertionError("a run started: the input was not refused up front")
    with mock.patch("launchers.cmd_run.run_local", side_effect=started), contextlib.redirect_stderr(err), \
            contextlib.redirect_stdout(io.StringIO()), contextlib.chdir(cwd):
        try:
            code = cli.main(argv)
        except SystemExit as e:  # argparse's own refusals
            code = int(e.code or 0)
    return code, err.getvalue()


def _one_line(stderr: str) -> bool:
    lines = stderr.strip().splitlines()
    return len(lines) == 1 and "Traceback" not in stderr


# ---- the table, row by row ---------------------------------------------------------


@pytest.mark.parametrize("toml, bad", [
    ('devices = "two"', "--devices 'two'"),
    ("lr = [1, 2]", "--lr [1, 2]"),
    ('model-opt = ["hidden=50"]', "--model-opt ['hidden=50']"),
    ("steps = 5.5", "--steps 5.5"),
    ("seed = -1", "--seed -1"),
    ("compile = 1", "--compile 1"),
])
def test_bad_config_file_values_exit_2_naming_them(tmp_path, toml, bad):
    (tmp_path / "f.toml").write_text(toml + "\n")
    code, err = _cli(["run", "--config", str(tmp_path / "f.toml")], tmp_path)
    assert code == 2 and _one_line(err) and bad in err, err


def test_unwritable_outputs_are_refused_before_training(tmp_path):
    (tmp_path / "file").write_text("x")
    cases = [("--json", "/proc/x.json", "cannot write"), ("--json", str(tmp_path), "is a folder"),
             ("--logdir", str(tmp_path / "file"), "is a file"), ("--params-out", "/proc/p.npz", "cannot write"),
             ("--checkpoint-dir", str(tmp_path / "file" / "sub"), "is a file")]
    for flag, path, why in cases:
        code, err = _cli(["run", flag, path], tmp_path)
        assert code == 2 and _one_line(err) and flag in err and why in err, (flag, path, err)
    code, err = _cli(["hardware", "--out", "/proc/x"], tmp_path)
    assert code == 2 and _one_line(err) and "--out" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # nothing written


def test_hardware_must_be_a_catalog_id_of_what_the_ranks_run_on(tmp_path):
    code, err = _cli(["run", "--hardware", "h100"], tmp_path)
    assert code == 2 and _one_line(err) and "closest: h100-sxm" in err, err
    code, err = _cli(["run", "--hardware", "tpu-v3-pod"], tmp_path)
    assert code == 2 and _one_line(err) and "CPU" in err and "podscale predict" in err, err
    code, err = _cli(["run", "--backend", "jax-pmap", "--hardware", "h200"], tmp_path)
    assert code == 2 and _one_line(err) and "not on a GPU" in err, err


def test_predict_refuses_a_batch_that_does_not_split(tmp_path):
    code, err = _cli(["predict", "--model", "mlp", "--hardware", "h100-sxm", "--devices", "3", "--global-batch", "64"], tmp_path)
    assert code == 2 and _one_line(err) and "does not divide evenly over 3" in err, err
    code, err = _cli(["predict", "--model", "mlp", "--hardware", "h100-sxm", "--devices", "4", "--global-batch", "6",
                      "--scaling", "strong"], tmp_path)
    assert code == 2 and _one_line(err) and "over 4 devices" in err, err


def test_more_devices_than_the_host_can_emulate(tmp_path):
    code, err = _cli(["run", "--devices", "512", "--global-batch", "512"], tmp_path)
    assert code == 2 and _one_line(err) and "--devices 512" in err and "use at most" in err, err


def test_data_smaller_than_the_global_batch(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((10, 32), np.float32), y=np.zeros((10, 4), np.float32))
    code, err = _cli(["run", "--data", str(tmp_path / "d.npz"), *SMALL[:6], "--global-batch", "64"], tmp_path)
    assert code == 2 and _one_line(err) and "10 samples" in err and "--global-batch 64" in err, err


def _strict_json(path: Path) -> dict:
    def refuse(name: str) -> None:
        raise AssertionError(f"{path}: bare {name} is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.mark.parametrize("backend", ["torch-ddp", "jax-pmap"])
def test_divergence_exits_4_naming_the_step_with_valid_json(tmp_path, backend):
    out = tmp_path / "r.json"
    p = podscale("run", "--backend", backend, "--devices", "2", "--optimizer", "sgd", "--lr", "1e9", "--steps", "8",
                 "--json", str(out), *SMALL, check=False, timeout=120)
    assert p.returncode == 4, p.stderr
    assert "non-finite loss" in p.stderr and "at step" in p.stderr and _one_line(p.stderr), p.stderr
    doc = _strict_json(out)
    assert doc["status"] == "diverged" and isinstance(doc["diverged_at_step"], int)
    assert f"at step {doc['diverged_at_step']}" in p.stderr
    losses = doc["losses"]
    assert len(losses) == doc["diverged_at_step"] + 1 and losses[-1] is None  # non-finite as null
    assert all(v is not None and math.isfinite(v) for v in losses[:-1])


def test_default_run_learns(tmp_path):
    """The default synthetic data comes from a teacher network: the loss of the default run falls."""
    out = tmp_path / "r.json"
    podscale("run", "--devices", "2", "--json", str(out), "--quiet", timeout=120)
    losses = _strict_json(out)["losses"]
    assert losses[-1] <= 0.5 * losses[0], losses


def test_noise_data_keeps_pure_noise_targets():
    """--data noise: targets independent of the inputs; the default: targets the inputs predict."""
    from models.spec import get_spec
    from scaling.data import load_dataset

    spec = get_spec("mlp", d_in=32, d_out=4)
    noise, teacher = load_dataset(spec, "noise", 512, 0), load_dataset(spec, None, 512, 0)  # 2048 samples each
    np.testing.assert_array_equal(noise.x, teacher.x)

    def held_out_r2(x: np.ndarray, y: np.ndarray) -> float:
        """R^2 on the last quarter of a least-squares fit (with a bias) on the first three quarters."""
        a = np.hstack([x, np.ones((len(x), 1), x.dtype)])
        cut = 3 * len(x) // 4
        coef, *_ = np.linalg.lstsq(a[:cut], y[:cut], rcond=None)
        return 1 - float(((a[cut:] @ coef - y[cut:]) ** 2).mean() / y[cut:].var())

    assert held_out_r2(teacher.x, teacher.y) > 0.5
    assert held_out_r2(noise.x, noise.y) < 0.05


def test_ranks_die_with_a_killed_launcher(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("PODSCALE_FAULT", None)
    launcher = subprocess.Popen([sys.executable, "-m", "launchers.cli", "run", "--devices", "2", "--steps", "1000000",
                                 "--step-timeout", "10", *SMALL], cwd=tmp_path, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ranks: list[psutil.Process] = []
    try:
        parent = psutil.Process(launcher.pid)
        deadline = time.monotonic() + 120
        while len(ranks) < 2 and time.monotonic() < deadline:
            ranks = [c for c in parent.children() if "scaling.worker" in " ".join(c.cmdline())]
            time.sleep(0.2)
        assert len(ranks) == 2, "the ranks never started"
        time.sleep(3)  # training, not starting up
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        gone, alive = psutil.wait_procs(ranks, timeout=10 + 5)  # --step-timeout + 5 s
        assert not alive, f"ranks {[p.pid for p in alive]} outlived their launcher"
    finally:  # orphans are no longer our children: kill the ranks by pid too
        for c in [*psutil.Process().children(recursive=True), *ranks]:
            with contextlib.suppress(psutil.Error):
                c.kill()


# ---- the fuzz test -------------------------------------------------------------------------

#: this test's own table of RunConfig's fields: name -> (flag, kind, is-valid predicate)
FIELDS: dict[str, tuple[str, str]] = {
    "devices": ("--devices", "int>=1"), "global_batch": ("--global-batch", "int>=1"), "steps": ("--steps", "int>=1"),
    "untimed_steps": ("--untimed-steps", "int>=0"), "lr": ("--lr", "float>0"), "seed": ("--seed", "int>=0"),
    "step_timeout": ("--step-timeout", "float>0"), "startup_timeout": ("--startup-timeout", "float>0"),
    "checkpoint_every": ("--checkpoint-every", "int>=0"), "optimizer": ("--optimizer", "sgd|adam"),
    "loss_reduction": ("--loss-reduction", "mean|sum"), "dtype": ("--dtype", "float32|bfloat16"),
    "backend": ("--backend", "torch-ddp|jax-pmap|jax-sharded|torch-xla"), "model": ("--model", "mlp|alexnet|vgg16|resnet18"),
    "launcher": ("--launcher", "spmd|torchrun|xmp"), "compile": ("--compile", "bool"), "sync_bn": ("--sync-bn", "bool"),
}

_words = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-_0123456789.", min_size=1, max_size=12)


def _bad_values(kind: str) -> st.SearchStrategy:
    """Values a TOML file can hold that ``kind`` does not allow (by this test's table alone)."""
    wrong_type = st.one_of(_words, st.lists(st.integers(), min_size=1, max_size=3), st.booleans())
    if kind.startswith("int"):
        low = 1 if kind.endswith(">=1") else 0
        return st.one_of(st.integers(max_value=low - 1), st.floats(allow_nan=False).filter(lambda v: v != int(v) if math.isfinite(v) else True),
                         wrong_type)
    if kind == "float>0":
        return st.one_of(st.floats(max_value=0.0), st.just(float("inf")), st.just(float("-inf")), wrong_type)
    if kind == "bool":
        return st.one_of(st.integers(), _words, st.floats(allow_nan=False))
    choices = kind.split("|")
    return st.one_of(_words.filter(lambda w: w not in choices), st.integers(), st.booleans())


def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return str(v)


@st.composite
def bad_toml(draw: st.DrawFn) -> tuple[str, str]:
    name = draw(st.sampled_from(sorted(FIELDS)))
    value = draw(_bad_values(FIELDS[name][1]))
    return f"{name.replace('_', '-')} = {_toml_value(value)}\n", (FIELDS[name][0], str(value))


@st.composite
def bad_flags(draw: st.DrawFn) -> tuple[list[str], str]:
    """One bad flag among good ones; values as a shell would pass them."""
    name = draw(st.sampled_from(sorted(k for k, (_, kind) in FIELDS.items() if kind != "bool")))
    flag, kind = FIELDS[name]
    if kind.startswith("int"):
        low = 1 if kind.endswith(">=1") else 0
        value = draw(st.one_of(st.integers(max_value=low - 1).map(str), _words.filter(lambda w: not _parses(int, w))))
    elif kind == "float>0":
        value = draw(st.one_of(st.floats(max_value=0.0, allow_nan=False).map(repr), st.sampled_from(["nan", "inf", "-inf", "1e999"]),
                               _words.filter(lambda w: not _is_positive_number(w))))
    else:
        value = draw(_words.filter(lambda w: w not in kind.split("|")))
    return [f"{flag}={value}"], (flag, value)


def _parses(kind: type, w: str) -> bool:
    try:
        kind(w)
    except ValueError:
        return False
    return True


def _is_positive_number(w: str) -> bool:
    try:
        return math.isfinite(float(w)) and float(w) > 0
    except ValueError:
        return False


@st.composite
def bad_npz(draw: st.DrawFn) -> tuple[dict[str, np.ndarray], str]:
    """--data files the mlp (d_in 32, d_out 4) cannot take: wrong names, shapes or sizes."""
    n = draw(st.integers(1, 40))
    case = draw(st.sampled_from(["names", "x-shape", "y-shape", "lengths", "small"]))
    x, y = np.zeros((n, 32), np.float32), np.zeros((n, 4), np.float32)
    if case == "names":
        return {draw(st.sampled_from(["X", "inputs", "data"])): x, "y": y}, ("--data",)
    if case == "x-shape":
        return {"x": np.zeros((n, draw(st.integers(1, 64).filter(lambda d: d != 32))), np.float32), "y": y}, ("--data",)
    if case == "y-shape":
        return {"x": x, "y": np.zeros((n, draw(st.integers(1, 9).filter(lambda d: d != 4))), np.float32)}, ("--data",)
    if case == "lengths":
        return {"x": x, "y": np.zeros((n + draw(st.integers(1, 5)), 4), np.float32)}, ("--data",)
    return {"x": x[: min(n, 15)], "y": y[: min(n, 15)]}, ("--data",)  # fewer samples than the global batch of 16


def _check_refused(code: int, err: str, names: tuple[str, ...], cwd: Path, before: set[str]) -> None:
    """Exit 2, one line naming the flag or the bad value, no traceback, nothing written."""
    assert code == 2, (code, err)
    assert _one_line(err), err
    assert any(n in err for n in names), (names, err)
    assert {p.name for p in cwd.iterdir()} == before, "a refused input wrote something"


FUZZ = settings(max_examples=110, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                         HealthCheck.too_slow])


@FUZZ
@given(case=bad_toml())
def test_fuzz_config_files(tmp_path, case):
    text, names = case
    (tmp_path / "c.toml").write_text(text)
    before = {p.name for p in tmp_path.iterdir()}
    code, err = _cli(["run", "--config", "c.toml", "--json", "out/r.json", "--logdir", "out/tb"], tmp_path)
    _check_refused(code, err, names, tmp_path, before)


@FUZZ
@given(case=bad_flags())
def test_fuzz_flags(tmp_path, case):
    argv, names = case
    before = {p.name for p in tmp_path.iterdir()}
    code, err = _cli(["run", *argv, "--json", "out/r.json", "--logdir", "out/tb"], tmp_path)
    _check_refused(code, err, names, tmp_path, before)


@FUZZ
@given(case=bad_npz())
def test_fuzz_data_files(tmp_path, case):
    arrays, names = case
    np.savez(tmp_path / "d.npz", **arrays)
    before = {p.name for p in tmp_path.iterdir()}
    code, err = _cli(["run", "--data", "d.npz", *SMALL, "--json", "out/r.json"], tmp_path)
    _check_refused(code, err, names, tmp_path, before)


@pytest.mark.parametrize("argv, flag", [
    (["run", "--devices", "two"], "--devices"),
    (["run", "--lr", "nan"], "--lr"),
    (["run", "--backend", "torch_ddp"], "torch_ddp"),
    (["predict", "--model", "mlp", "--hardware", "h100-sxm", "--devices", "3", "--global-batch", "64"], "--global-batch"),
])
def test_spot_checks_as_a_shell_runs_them(tmp_path, argv, flag):
    p = podscale(*argv, check=False, timeout=60, cwd=tmp_path)
    assert p.returncode == 2 and _one_line(p.stderr) and flag in p.stderr, p.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("backend, ext", [("torch-ddp", "pt"), ("jax-pmap", "npz")])
def test_checkpoint_dir_alone_saves_the_final_state(tmp_path, backend, ext):
    ck = tmp_path / "ck"
    common = ("--backend", backend, "--devices", "2", "--untimed-steps", "1", "--checkpoint-dir", str(ck), *SMALL)
    podscale("run", *common, "--steps", "4", timeout=120)
    assert sorted(p.name for p in ck.iterdir()) == [f"ckpt-00000004.{ext}"], list(ck.iterdir())
    podscale("run", *common, "--steps", "6", "--resume", "--json", str(tmp_path / "r.json"), timeout=120)
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["resumed_from_step"] == 4 and len(r["losses"]) == 6


@pytest.mark.parametrize("var, value, names", [
    ("PODSCALE_FAULT", "x", "PODSCALE_FAULT='x'"), ("PODSCALE_FAULT", "0:2:explode", "mode must be kill, hang or hold"),
    ("PODSCALE_JAX_STEP", "pm", "valid: jit, shard_map"), ("PODSCALE_CACHE_DIR", "/proc/c", "PODSCALE_CACHE_DIR"),
])
def test_bad_environment_variables_exit_2_before_anything_starts(tmp_path, monkeypatch, var, value, names):
    monkeypatch.setenv(var, value)
    code, err = _cli(["run", "--steps", "2", "--untimed-steps", "0"], tmp_path)
    assert code == 2 and _one_line(err) and names in err, err
