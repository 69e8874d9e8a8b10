"""The conventions users bring from other CLIs: --version, each subcommand's own --help, "did you
mean", one spelling set for model names, no files written unasked."""

from __future__ import annotations

import contextlib
import io

import pytest

from launchers import cli
from scaling import __version__


def _cli(argv: list[str], cwd) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), contextlib.chdir(cwd):
        try:
            code = cli.main(argv)
        except SystemExit as e:
            code = int(e.code or 0)
    return code, out.getvalue(), err.getvalue()


def test_version(tmp_path):
    code, out, _ = _cli(["--version"], tmp_path)
    assert code == 0 and out.strip() == f"podscale {__version__}"


@pytest.mark.parametrize("argv, want", [
    (["run", "--devcies", "2"], "unrecognized arguments: --devcies (did you mean '--devices'?) (see podscale run --help)"),
    (["predict", "--hardwear", "h100-sxm"], "(did you mean '--hardware'?) (see podscale predict --help)"),
    (["rnu"], "(did you mean 'run'?) (see podscale --help)"),
    (["run", "--optimizer", "adamw"], "(did you mean 'adam'?) (see podscale run --help)"),
    (["run", "--backend", "jax_pmap"], "(did you mean 'jax-pmap'?)"),
    (["run", "--model", "resnet-51"], "(did you mean 'resnet50'?)"),
    (["predict", "--model", "mlp", "--hardware", "h100", "--devices", "8", "--global-batch", "64"], "closest: h100-sxm"),
    (["cluster"], "(see podscale cluster --help)"),
])
def test_near_misses_name_the_nearest_valid_spelling_and_the_subcommands_help(tmp_path, argv, want):
    code, _, err = _cli(argv, tmp_path)
    assert code == 2 and want in err and len(err.strip().splitlines()) == 1, err
    assert "cluster_command" not in err and "Traceback" not in err


def test_model_names_in_both_spellings(tmp_path):
    from scaling.config import RunConfig

    assert RunConfig(model="resnet-50").model == "resnet50" == RunConfig(model="ResNet50").model
    code, out, _ = _cli(["flops", "--model", "resnet-50", "--json"], tmp_path)
    assert code == 0 and '"model": "resnet50"' in out
    code, out, _ = _cli(["predict", "--model", "resnet-18", "--hardware", "h100-sxm", "--devices", "2",
                         "--global-batch", "64", "--json"], tmp_path)
    assert code == 0, out


def test_hardware_writes_a_png_only_when_asked(tmp_path):
    code, out, err = _cli(["hardware", "--json"], tmp_path)
    assert code == 0 and not list(tmp_path.iterdir()), list(tmp_path.iterdir())
    code, out, err = _cli(["hardware", "--out", "plots"], tmp_path)
    (png,) = (tmp_path / "plots").iterdir()
    assert code == 0 and png.suffix == ".png" and f"wrote plots/{png.name}" in out + err


@pytest.mark.parametrize("argv", [
    ["hardware"],
    ["models"],
    ["predict", "--model", "resnet50", "--hardware", "dgx-h100", "--devices", "8", "--global-batch", "256"],
])
def test_tables_are_readable_at_80_columns(tmp_path, monkeypatch, argv):
    from scaling.throughput import catalog

    monkeypatch.setenv("COLUMNS", "80")
    code, out, _ = _cli(argv, tmp_path)
    assert code == 0
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 80 and "…" not in out, out
    if argv == ["hardware"]:
        assert all(any(line.startswith(f"│ {h.id} ") for line in lines) for h in catalog.all_hardware())  # ids whole
    monkeypatch.setenv("COLUMNS", "200")
    code, wide, _ = _cli([*argv, "--wide"], tmp_path)
    assert code == 0 and len(wide.splitlines()[3]) > len(lines[3])  # --wide shows more columns
