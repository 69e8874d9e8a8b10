"""The hardware catalog: the lecture's figures come out exactly, derived and quoted figures agree
where they should (and disagreements are shown, with the MFU basis named), devices are counted as
framework-visible devices, and `podscale hardware` reports it all."""

from __future__ import annotations

import json
import math

import pytest

from launchers import cli
from scaling.throughput import catalog
from scaling.errors import UsageError


def rel(a: float, b: float) -> float:
    return abs(a / b - 1)


def test_lecture_pod_figures_derive_from_boards():
    # lecture: TPU v2 board 180 TFLOPS, pod of 64 = 11.5 PFLOPS; v3 board 420, pod of 256 = 107 PFLOPS
    # the v3 pod's derivation is 1024 chips x 123 TFLOPS (Jouppi et al. 2020), not 256 x the lecture's
    # 2018 board figure: the lecture's 107 PFLOPS is shown beside it, not hidden
    v2, v3 = catalog.get("tpu-v2-pod"), catalog.get("tpu-v3-pod")
    assert v2.derived["bf16"].value == pytest.approx(64 * 180e12, rel=1e-12) == pytest.approx(11.52e15)
    assert v3.derived["bf16"].value == pytest.approx(1024 * 123e12, rel=1e-12)
    assert v3.chips == 1024 and rel(v3.total_peak("bf16"), 1024 * 123e12) < 0.01
    assert v2.quoted["bf16"] == 11.5e15 and v3.quoted["bf16"] == 107e15
    assert rel(v2.derived["bf16"].value, v2.quoted["bf16"]) < 0.005
    assert rel(v3.derived["bf16"].value, v3.quoted["bf16"]) > 0.1
    assert catalog.get("tpu-v2-board").quoted["bf16"] == 180e12
    assert catalog.get("tpu-v3-board").quoted["bf16"] == 420e12
    # Google's memory sizes are GiB: the lecture's "64 GB" / "128 GB" boards are 64 / 128 GiB
    assert catalog.get("tpu-v2-board").memory_bytes * 8 == 64 * 2**30
    assert catalog.get("tpu-v3-board").memory_bytes * 8 == 128 * 2**30
    assert catalog.get("tpu-v2-board").price_usd_per_hour == 4.50
    assert catalog.get("tpu-v3-board").price_usd_per_hour == 8.00


def test_titan_rtx_from_first_principles():
    t = catalog.get("titan-rtx")
    assert t.derived["fp32"].value == pytest.approx(72 * 64 * 2 * 1.77e9)
    assert t.derived["fp16"].value == pytest.approx(576 * 128 * 1.77e9)
    assert round(t.derived["fp32"].value / 1e12, 1) == 16.3
    assert rel(t.derived["fp16"].value, 130e12) < 0.005
    assert t.quoted == {"fp32": 16.3e12, "fp16": 130e12}
    assert "72 SMs" in t.derived["fp32"].text and "576 tensor cores" in t.derived["fp16"].text
    assert t.price_usd == 2499 and t.memory_bytes == 24e9


def test_dgx1_is_eight_v100s_about_one_petaflops():
    d = catalog.get("dgx-1")
    assert d.devices == 8 and d.part_of == "v100-sxm2" and d.peak_flops == catalog.get("v100-sxm2").peak_flops
    assert rel(d.derived["fp16"].value, d.quoted["fp16"]) < 0.01 and d.quoted["fp16"] == 1e15


def test_devices_chips_and_boards_are_kept_apart():
    for board in ("tpu-v2-board", "tpu-v3-board"):
        b = catalog.get(board)
        assert (b.chips, b.devices) == (4, 8)  # a v2-8/v3-8 board: 4 chips, 8 JAX devices (one per core)
    for chip in ("tpu-v4", "tpu-v5e", "tpu-v5p", "tpu-v6e", "tpu7x"):
        c = catalog.get(chip)
        assert (c.chips, c.devices) == (1, 1)  # from v4 on, JAX sees one device per chip
    pod = catalog.get("tpu-v3-pod")
    assert (pod.chips, pod.devices, pod.max_devices) == (1024, 2048, 2048)
    pod.check_devices(2048)
    with pytest.raises(UsageError, match="2049.*2048"):
        pod.check_devices(2049)
    with pytest.raises(UsageError):
        pod.check_devices(0)


def test_disagreements_are_shown_and_mfu_basis_named():
    ryzen = catalog.get("ryzen9-3950x")
    assert ryzen.quoted["fp32"] == 4.8e12 and rel(ryzen.derived["fp32"].value, 2.4e12) < 0.01
    assert ryzen.peak("fp32") == pytest.approx(ryzen.derived["fp32"].value, rel=1e-3)  # MFU uses the derivation
    assert "4.8" in ryzen.peak_note and "MFU" in ryzen.peak_note and ryzen.price_usd == 749
    v3 = catalog.get("tpu-v3-chip")
    assert v3.derived["bf16"].value == pytest.approx(2 * 2 * 128 * 128 * 2 * 0.94e9)
    assert rel(v3.total_peak("bf16"), 123e12) < 0.01 and "420" in v3.peak_note and "123" in v3.peak_note
    board = catalog.get("tpu-v3-board")
    assert rel(board.total_peak("bf16"), board.quoted["bf16"]) > 0.1  # 492 vs 420: shown, not hidden


def test_tpus_have_no_fp32_peak_and_say_so():
    for hw_id in ("tpu-v3-board", "tpu-v4", "tpu-v6e", "tpu7x"):
        hw = catalog.get(hw_id)
        assert hw.peak("fp32") is None
        assert hw.peak_for("float32") == ("bf16", hw.peak("bf16"))
    assert catalog.get("h100-sxm").peak_for("float32") == ("fp32", 66.9e12)


def test_every_entry_is_well_formed():
    raw = catalog._raw_catalog()
    for hw_id in catalog.ids():
        assert set(raw[hw_id]) <= catalog.FIELDS, (hw_id, set(raw[hw_id]) - catalog.FIELDS)
        hw = catalog.all_hardware()[catalog.ids().index(hw_id)]
        assert hw.source and hw.device and hw.family in ("cpu", "gpu", "tpu") and hw.kind
        if hw_id == "host-cpu":
            continue
        assert hw.peak_flops, hw_id
        assert all(k in ("fp32", "tf32", "fp16", "bf16") for k in hw.peak_flops)
        for key, der in hw.derived.items():  # a chip's derivation is its MFU basis (within 1%)
            if hw.part_of is None and key in hw.peak_flops:
                assert rel(der.value, hw.total_peak(key)) < 0.01, (hw_id, key)
        if hw.part_of:
            part = catalog.get(hw.part_of)
            assert hw.devices == part.devices * raw[hw_id]["count"]
            for key, der in hw.derived.items():
                if key not in raw[hw_id].get("derive", {}):  # an explicit derivation stands on its own
                    assert der.value == pytest.approx(raw[hw_id]["count"] * part.headline(key))
    h100 = catalog.get("h100-sxm")
    assert h100.peak("bf16") == 989.4e12  # dense, never the 2:4-sparse 1979


def test_required_entries_present():
    need = {"ryzen9-3950x", "titan-rtx", "geforce-8800-gtx", "gtx-580", "v100-sxm2", "dgx-1", "a100-sxm4", "h100-sxm",
            "h200", "tpu-v2-board", "tpu-v2-pod", "tpu-v3-board", "tpu-v3-pod", "tpu-v4", "tpu-v5e", "tpu-v5p",
            "tpu-v6e", "big-basin-p100", "goyal-2017-cluster", "horovod-2017-server", "horovod-2017-cluster", "host-cpu"}
    assert need <= set(catalog.ids())
    goyal = catalog.get("big-basin-p100")
    assert goyal.devices == 8 and goyal.inter_bw == 50e9 / 8
    horovod = catalog.get("horovod-2017-server")
    assert horovod.devices == 4 and horovod.inter_bw == 25e9 / 8


def test_gflops_per_dollar_trend_rises():
    g = {k: catalog.get(k).gflops_per_dollar() for k in ("geforce-8800-gtx", "gtx-580", "gtx-1080-ti", "rtx-4090", "i7-980x")}
    assert g["geforce-8800-gtx"] < g["gtx-580"] < g["gtx-1080-ti"] < g["rtx-4090"]
    assert g["gtx-580"] > 10 * g["i7-980x"]  # the 2010 GPU vs the 2010 CPU


def test_unknown_id_lists_closest(capsys):
    with pytest.raises(UsageError, match="closest: titan-rtx"):
        catalog.get("titan-rtxx")
    assert cli.main(["hardware", "h100"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "h100-sxm" in err


def test_cli_json_sort_and_png(tmp_path, capsys):
    assert cli.main(["hardware", "--json", "--sort", "gflops-per-dollar", "--out", str(tmp_path)]) == 0
    rows = json.loads(capsys.readouterr().out)
    gpd = [r["gflops_per_dollar"] for r in rows if r["gflops_per_dollar"]]
    assert gpd == sorted(gpd, reverse=True) and rows[0]["gflops_per_dollar"] == max(gpd)
    titan = next(r for r in rows if r["id"] == "titan-rtx")
    assert math.isclose(titan["derived"]["fp32"]["flops"], 16.31e12, rel_tol=1e-3)
    png = tmp_path / "hardware_gflops_per_dollar.png"
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert cli.main(["hardware", "tpu-v3-pod"]) == 0
    out = capsys.readouterr().out
    assert "107" in out and "MFU uses" in out and "2048" in out
