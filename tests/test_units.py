"""Small pure pieces: config validation, the data rule, atomic checkpoints, meter arithmetic."""

from __future__ import annotations

import os

import numpy as np
import pytest

from models.spec import get_spec
from scaling import checkpoint
from scaling.config import RunConfig
from scaling.data import Dataset
from scaling.errors import UsageError
from scaling.meter import format_flops, run_peak, strong_efficiency, throughput, weak_efficiency


def test_config_rejects_bad_values_naming_them():
    with pytest.raises(UsageError, match=r"--global-batch 10 does not divide evenly over --devices 4"):
        RunConfig(devices=4, global_batch=10)
    with pytest.raises(UsageError, match=r"--optimizer 'rmsprop'.*valid: sgd, adam"):
        RunConfig(optimizer="rmsprop")
    with pytest.raises(UsageError, match="--checkpoint-dir"):
        RunConfig(resume=True)
    with pytest.raises(UsageError, match="unknown config key"):
        RunConfig.from_dict({"devics": 2})
    cfg = RunConfig(devices=4, global_batch=64)
    assert RunConfig.from_json(cfg.to_json()) == cfg and cfg.per_device_batch == 16


def test_shards_of_a_global_batch_tile_it_in_order():
    x = np.arange(10, dtype=np.float32)[:, None]
    ds = Dataset(x, x.copy(), "t")
    assert ds.indices(2, 4).tolist() == [8, 9, 0, 1]  # wraps around
    parts = [ds.shard(2, 4, r, 2)[0][:, 0].tolist() for r in range(2)]
    assert parts == [[8, 9], [0, 1]]


def test_synthetic_data_is_deterministic_per_seed():
    spec = get_spec("mlp", d_in=4, hidden=3, d_out=2)
    a, b, c = spec.synthetic_data(8, 0), spec.synthetic_data(8, 0), spec.synthetic_data(8, 1)
    assert np.array_equal(a[0], b[0]) and not np.array_equal(a[0], c[0])


def test_checkpoint_write_is_atomic(tmp_path):
    good = checkpoint.write_atomic(tmp_path / "ckpt-00000001.pt", lambda f: f.write(b"old"))

    def crash(f):
        f.write(b"half of the new one")
        raise RuntimeError("power cut")

    with pytest.raises(RuntimeError):
        checkpoint.write_atomic(good, crash)
    assert good.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["ckpt-00000001.pt"]  # no temp file left either
    checkpoint.write_atomic(tmp_path / "ckpt-00000004.pt", lambda f: f.write(b"new"))
    assert checkpoint.latest(tmp_path, "pt")[0] == 4


def test_meter_arithmetic():
    t = throughput(step_time_s=0.5, global_batch=64, flops_per_sample=1e9, devices=4, peak_flops=1e12)
    assert t.samples_per_s == 128 and t.achieved_flops == 128e9 and t.achieved_flops_per_device == 32e9
    assert t.mfu == pytest.approx(0.128)
    assert throughput(0.5, 64, 1e9, 4, None).mfu is None  # unknown chip: no MFU, never a guess
    assert run_peak(1e12, 8, shared_host=False) == 8e12 and run_peak(1e12, 8, shared_host=True) == 1e12
    assert weak_efficiency(300.0, 100.0, 4) == 0.75 and strong_efficiency(1.0, 0.5, 4) == 0.5
    assert format_flops(11.52e15) == "11.5 PFLOPS" and format_flops(16.3e12) == "16.3 TFLOPS"
