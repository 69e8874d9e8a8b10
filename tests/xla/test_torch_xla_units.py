"""torch-xla pieces that need no device: HLO text arithmetic, launcher checks, the pinned environment."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from scaling.backends import torch_xla as bx
from scaling.backends import xla_hlo
from scaling.config import RunConfig
from scaling.errors import UsageError
from tests.conftest import ROOT

HLO = """
HloModule m, entry_computation_layout={()->f32[]}

%fused (param_0.1: f32[8,3,3,16]) -> f32[8,3,3,16] {
  %param_0.1 = f32[8,3,3,16]{3,2,1,0} parameter(0)
  ROOT %neg = f32[8,3,3,16]{3,2,1,0} negate(%param_0.1)
}

ENTRY %main {
  %p0 = f32[8,32]{1,0} parameter(0)
  %p1 = f32[32,5]{1,0} parameter(1)
  %img = f32[8,6,6,4]{3,2,1,0} parameter(2)
  %k = f32[3,3,4,16]{3,2,1,0} parameter(3)
  %dot.1 = f32[8,5]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %conv = f32[8,4,4,16]{3,2,1,0} convolution(%img, %k), window={size=3x3}, dim_labels=b01f_01io->b01f
  %ar = (f32[32,5]{1,0}, bf16[7]{0}) all-reduce(%p1, %x), channel_id=1, replica_groups={{0,1}}, to_apply=%add
  %ars = f32[10]{0} all-reduce-start(%y), channel_id=2, replica_groups={{0,1}}, to_apply=%add
  %ard = f32[10]{0} all-reduce-done(%ars)
  %ag = f32[64,16,4,4]{3,2,1,0} all-gather(%img), channel_id=3, replica_groups={{0,1,2,3}}, dimensions={0}
  %ags = (f32[2,8]{1,0}, f32[8,8]{1,0}) all-gather-start(%z), channel_id=4, replica_groups={{0,1,2,3}}, dimensions={0}
  %agd = f32[8,8]{1,0} all-gather-done(%ags)
  ROOT %r = f32[] constant(0)
}
"""


def test_hlo_counts_tuple_and_async_collectives_and_matmul_flops() -> None:
    c = xla_hlo.analyse(HLO)
    assert c.all_reduce_bytes == [32 * 5 * 4 + 7 * 2, 10 * 4]  # tuple = sum of parts; -done not counted twice
    assert c.dot_flops == 2 * 8 * 5 * 32 + 2 * (8 * 4 * 4 * 16) * (3 * 3 * 4)
    # what each gather delivers: an async start's (operand, result) counts its result once
    assert c.all_gather_bytes == (64 * 16 * 4 * 4 * 4, 8 * 8 * 4)


def test_user_dump_dir_is_kept_and_ours_added_otherwise(tmp_path: Path) -> None:
    flags, d = xla_hlo.flags_with_dump("--xla_cpu_enable_fast_math=false", tmp_path)
    assert d == tmp_path and f"--xla_dump_to={tmp_path}" in flags and "fast_math=false" in flags
    assert xla_hlo.flags_with_dump("--xla_dump_to=/x/y", tmp_path) == ("--xla_dump_to=/x/y", Path("/x/y"))
    assert xla_hlo.train_step_cost(tmp_path / "missing") is None


@pytest.mark.parametrize("kw, words", [
    ({"launcher": "xmp", "devices": 4}, ["pytorch/xla#9089", "--launcher spmd"]),
    ({"launcher": "spmd", "devices": 4, "processes": 4}, ["--processes 4", "every host"]),
    ({"launcher": "torchrun", "devices": 4, "processes": 2}, ["--processes 2", "one process per device"]),
    ({"launcher": "torchrun", "devices": 2, "checkpoint_dir": "/tmp/x", "checkpoint_every": 1},
     ["--checkpoint-dir", "--launcher spmd", "torchrun"]),
])
def test_validate_names_the_bad_flag(monkeypatch: pytest.MonkeyPatch, kw: dict, words: list[str]) -> None:
    monkeypatch.setenv("PJRT_DEVICE", "CPU")
    with pytest.raises(UsageError) as e:
        bx.validate(RunConfig(backend="torch-xla", global_batch=64, **kw))
    assert all(w in str(e.value) for w in words), str(e.value)


def test_layout_cpu_and_tpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PJRT_DEVICE", "CPU")
    (env,) = bx.layout(RunConfig(backend="torch-xla", devices=4))
    assert env["PJRT_DEVICE"] == "CPU" and env["CPU_NUM_DEVICES"] == "4"
    ranks = bx.layout(RunConfig(backend="torch-xla", devices=2, launcher="torchrun"))
    assert [e["CPU_NUM_DEVICES"] for e in ranks] == ["1", "1"]
    monkeypatch.setenv("PJRT_DEVICE", "TPU")
    (env,) = bx.layout(RunConfig(backend="torch-xla", devices=8))
    assert "PJRT_DEVICE" not in env  # the user's TPU choice stands; PJRT discovers the slice
    bx.validate(RunConfig(backend="torch-xla", devices=8, launcher="xmp"))  # xmp is fine on TPU
    with pytest.raises(UsageError, match="CPU path"):
        bx.validate(RunConfig(backend="torch-xla", devices=8, launcher="torchrun"))


def test_pinned_versions_satisfy_the_xla_extra() -> None:
    """constraints-xla.txt pins; pyproject's xla extra states ranges Colab's torch 2.9.0 must meet."""
    from importlib.metadata import version

    torch_v, xla_v = version("torch"), version("torch_xla")
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["xla"]
    reqs = {Requirement(r).name.replace("_", "-"): Requirement(r) for r in extra}
    assert reqs["torch"].specifier.contains(torch_v.split("+")[0])
    assert reqs["torch-xla"].specifier.contains(xla_v)
    assert reqs["torch"].specifier.contains("2.9.0")  # Colab's TPU image
    pins = dict(line.split("==") for line in (ROOT / "constraints-xla.txt").read_text().splitlines() if "==" in line)
    assert pins["torch"] == torch_v.split("+")[0] and pins["torch-xla"] == xla_v



def test_hardware_id_from_the_tpu_vm_type(monkeypatch: pytest.MonkeyPatch) -> None:
    assert bx.hardware_id("CPU") == "host-cpu"
    for acc, hw in (("v5litepod-8", "tpu-v5e"), ("v4-32", "tpu-v4"), ("v6e-16", "tpu-v6e"), ("", "tpu")):
        monkeypatch.setenv("TPU_ACCELERATOR_TYPE", acc)
        assert bx.hardware_id("TPU") == hw
