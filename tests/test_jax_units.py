"""The JAX backends' pure parts, without starting JAX: HLO parsing, layout, hardware ids, checks."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from scaling.backends import jax_dp, jax_env, jax_hlo
from scaling.config import RunConfig
from scaling.errors import UsageError

# lines as jax 0.10's CPU compiler prints them (pmap: a tuple all-reduce of grads and loss)
HLO = """
  %all-reduce = (f32[20,16]{1,0}, f32[16]{0}, f32[16,3]{1,0}, f32[3]{0}, f32[]) all-reduce(%a, %b, %c, %d, %e), channel_id=1, replica_groups={{0,1}}, to_apply=%region_0.0
  %get-tuple-element.2 = f32[20,16]{1,0} get-tuple-element(%all-reduce), index=0
  %all-reduce.1 = bf16[8]{0} all-reduce(bf16[8]{0} %x), replica_groups=[1,2]<=[2], to_apply=%add
  %ars = f32[10]{0} all-reduce-start(f32[10]{0} %y), replica_groups={{0,1}}
  %ard = f32[10]{0} all-reduce-done(f32[10]{0} %ars)
  %all-gather = f32[40]{0} all-gather(f32[20]{0} %z), dimensions={0}
"""


def test_allreduce_bytes_from_hlo_text() -> None:
    assert jax_hlo.allreduce_ops(HLO) == [(320 + 16 + 48 + 3 + 1) * 4, 16, 40]
    assert jax_hlo.allreduce_bytes(HLO) == 1552 + 16 + 40
    assert jax_hlo.allreduce_operands(HLO) == 5 + 1 + 1  # the tuple's five, and two single arrays
    assert jax_hlo.shape_bytes("(s32[2,3], pred[4])") == 28
    with pytest.raises(ValueError, match="unknown HLO element type"):
        jax_hlo.shape_bytes("q7[3]")


def test_cost_flops_accepts_dict_and_list() -> None:
    assert jax_hlo.cost_flops({"flops": 12.0}) == 12.0
    assert jax_hlo.cost_flops([{"flops": 3}]) == 3.0
    assert jax_hlo.cost_flops([]) is None and jax_hlo.cost_flops({"bytes accessed": 1.0}) is None


def test_layout_cpu_gives_each_process_its_share_of_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jax_dp, "accelerator", lambda: None)
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=3 --xla_dump_to=/tmp/x")
    envs = jax_dp.layout(RunConfig(backend="jax-pmap", devices=8, processes=2, global_batch=64))
    assert len(envs) == 2
    for e in envs:
        assert e["JAX_PLATFORMS"] == "cpu"
        flags = e["XLA_FLAGS"].split()
        assert "--xla_force_host_platform_device_count=4" in flags and "--xla_force_host_platform_device_count=3" not in flags
        assert "--xla_dump_to=/tmp/x" in flags and "--xla_cpu_multi_thread_eigen=false" in flags
    assert len(jax_dp.layout(RunConfig(backend="jax-sharded", devices=4))) == 1


def test_layout_gpu_splits_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jax_dp, "accelerator", lambda: "gpu")
    envs = jax_dp.layout(RunConfig(backend="jax-pmap", devices=4, processes=2, global_batch=64))
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["0,1", "2,3"]


def test_validate_rejects_models_without_flax_module_and_tpu_multiprocess(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jax_dp.mflax, "MODULES", {"mlp": "models.flax.mlp"})
    with pytest.raises(UsageError, match="has no flax module"):
        jax_dp.validate(RunConfig(backend="jax-pmap", model="gpt-tiny"))
    monkeypatch.setattr(jax_dp, "accelerator", lambda: "tpu")
    with pytest.raises(UsageError, match="--processes 2"):
        jax_dp.validate(RunConfig(backend="jax-pmap", devices=2, processes=2))


@pytest.mark.parametrize("platform,kind,want", [
    ("cpu", "cpu", "host-cpu"), ("gpu", "NVIDIA H100 80GB HBM3", "h100-sxm"), ("gpu", "NVIDIA H200", "h200"),
    ("tpu", "TPU v3", "tpu-v3-chip"), ("tpu", "TPU v4", "tpu-v4"), ("tpu", "TPU v5 lite", "tpu-v5e"),
    ("tpu", "TPU v5", "tpu-v5p"), ("tpu", "TPU v6 lite", "tpu-v6e"), ("gpu", "Tesla T4", "unknown-gpu"),
])
def test_hardware_id(platform: str, kind: str, want: str) -> None:
    assert jax_env.hardware_id(SimpleNamespace(platform=platform, device_kind=kind)) == want
