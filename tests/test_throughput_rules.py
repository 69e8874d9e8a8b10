"""The throughput model on real hardware (#14): compute by execution unit, the per-layer roofline,
topology-aware collectives (torus per dimension, hierarchical ring, multislice), nodes x count, named
workloads with exact FLOPs, sources for every catalog figure, MFU above 100% always flagged, and
one-line errors for a dtype or a count the hardware does not have."""

from __future__ import annotations

import json
import math
import statistics

import pytest

from launchers import cli
from models.named_spec import BERTSpec, named_spec, train_flops_closed_form
from scaling.throughput import catalog, collectives, compute, estimate, roofline

MB = 1 << 20


# ---- collectives: closed forms computed here -------------------------------------------------


def test_torus_allreduce_per_dimension_closed_form():
    a, bw, B = 5e-6, 50e9, 100 * MB
    for shape in ((4, 4), (16, 16), (32, 32), (4, 4, 8), (16, 16, 16)):
        c, d = math.prod(shape), len(shape)
        expect = sum(2 * (k - 1) * a for k in shape) + 2 * (1 - 1 / c) * B / (2 * d * bw)
        assert collectives.torus_allreduce_time(B, shape, a, bw) == pytest.approx(expect)
    assert collectives.torus_shape(256, 2) == (16, 16) and collectives.torus_shape(4096, 3) == (16, 16, 16)
    assert collectives.torus_shape(1024, 2) == (32, 32) and collectives.torus_shape(8, 3) == (2, 2, 2)
    # a torus beats one flat ring over a single link direction by 2 x D in bandwidth
    flat = collectives.ring_allreduce_time(B, 256, 0.0, bw)
    assert flat / collectives.torus_allreduce_time(B, (16, 16), 0.0, bw) == pytest.approx(2 * 2, rel=1e-9)


def test_v3_pod_resnet50_allreduce_is_the_torus_form_per_chip():
    hw, wl = catalog.get("tpu-v3-pod"), estimate.workload("resnet50")
    B = wl.grad_bytes
    on_chip = 2 * (2 - 1) / 2 * B / hw.memory_bw  # the two cores of a chip: a 2-ring at memory bandwidth
    torus = sum(2 * 31 * 5e-6 for _ in range(2)) + 2 * (1 - 1 / 1024) * B / (2 * 2 * 82e9)  # 32 x 32 chips
    assert collectives.allreduce_time(B, 2048, hw) == pytest.approx(on_chip + torus)
    flat_ring_cores = collectives.ring_allreduce_time(B, 2048, 5e-6, 82e9)  # the first release's rule
    assert collectives.allreduce_time(B, 2048, hw) < flat_ring_cores / 5


def test_hierarchical_ring_and_nodes_times_count():
    B = estimate.workload("resnet50").grad_bytes
    hw = catalog.get("dgx-a100")
    assert hw.devices == 8 and hw.max_devices is None  # a node is multiplied over its fabric
    hw.check_devices(256)
    nv, net = compute.LINK_FRACTION["nvlink"].value, compute.LINK_FRACTION["network"].value
    intra, inter = (8e-6, 300e9 * nv), (5e-6, 200e9 * net)
    expect = collectives.ring_allreduce_time(B, 8, *intra) + collectives.ring_allreduce_time(B, 32, *inter)  # 32 nodes
    assert collectives.allreduce_time(B, 256, hw) == pytest.approx(expect)
    assert collectives.allreduce_time(B, 8, hw) == pytest.approx(collectives.ring_allreduce_time(B, 8, *intra))
    # the papers' clusters are node x count with their networks
    g = catalog.get("goyal-2017-cluster")
    assert (g.part_of, g.devices, g.devices_per_node, g.inter_bw) == ("big-basin-p100", 256, 8, 50e9 / 8)


def test_multislice_beyond_the_largest_slice():
    hw = catalog.get("tpu-v5p")
    assert hw.max_slice_devices == 6144
    with pytest.raises(Exception, match="largest slice of 6144.*--slices"):
        hw.check_devices(8192)
    hw.check_devices(8192, slices=2)
    B = 100 * MB
    one = collectives.allreduce_time(B, 4096, hw)
    two = collectives.allreduce_time(B, 8192, hw, slices=2)
    dcn = collectives.ring_allreduce_time(B / 4096, 2, hw.inter_latency, hw.dcn_bw * compute.LINK_FRACTION["network"].value)
    assert two == pytest.approx(one + dcn)


def test_ici_per_link_figures_derive_from_googles_per_chip_and_per_pod_figures():
    v5e = catalog.get("tpu-v5e")
    assert v5e.ici_link_bw == pytest.approx(400e9 / (2 * 4))  # bidirectional 400 GB/s per chip over 4 ports
    assert 256 * v5e.ici_links * v5e.ici_link_bw == pytest.approx(51.2e12)  # all-reduce bandwidth per pod
    v4 = catalog.get("tpu-v4")
    assert 4096 * v4.ici_links * v4.ici_link_bw == pytest.approx(1.1e15, rel=0.01)
    v3 = catalog.get("tpu-v3-chip")
    assert v3.ici_link_bw == pytest.approx(656e9 / 8) and 1024 * 4 * v3.ici_link_bw == pytest.approx(340e12, rel=0.02)
    for tpu in ("tpu-v5p", "tpu7x"):
        assert catalog.get(tpu).ici_link_bw == pytest.approx(1200e9 / (2 * 6))
    assert catalog.get("tpu-v6e").ici_link_bw == pytest.approx(800e9 / (2 * 4))


# ---- compute by execution unit --------------------------------------------------------------


def test_each_dtype_runs_on_its_unit_and_mfu_is_against_it():
    a100 = {d: estimate.predict_step("resnet50", "a100-sxm4", 1, 256, d) for d in ("float32", "tf32", "float16", "bfloat16")}
    assert [a100[d].peak_dtype for d in a100] == ["fp32", "tf32", "fp16", "bf16"]
    assert a100["tf32"].unit == "gpu-tensor-tf32" and a100["float16"].unit == "gpu-tensor-16bit"
    for d, est in a100.items():
        assert est.peak_flops == catalog.get("a100-sxm4").peak_flops[est.peak_dtype]
        assert 0 < est.mfu < 1, (d, est.mfu)
    assert a100["float32"].samples_per_s < a100["tf32"].samples_per_s < a100["float16"].samples_per_s
    v100 = estimate.predict_step("resnet50", "v100-sxm2", 1, 256, "float16")  # AMP on V100: the fp16 tensor peak
    assert v100.peak_dtype == "fp16" and v100.peak_flops == 125e12
    for unit, a in compute.COMPUTE_FRACTION.items():
        assert 0 < a.value <= 1 and a.source, unit
        assert a.basis in ("fitted", "assumed", "sourced")
    # before Volta there are no tensor cores: P100's fp16 is SIMT half2, and fp32 runs its era's kernels
    p100 = catalog.get("p100-sxm2")
    assert compute.unit_for(p100, "fp16") == "gpu-fp16-simt-pre-volta" and compute.unit_for(p100, "fp32") == "gpu-fp32-simt-pre-volta"
    assert all(h.arch for h in catalog.all_hardware() if h.family == "gpu"), "every GPU names its architecture"


def test_roofline_layer_is_max_of_compute_and_memory_plus_launch():
    r = roofline.Rates(flops=1e12, mem_bw=1e11, launch_s=1e-5, act_bytes=2)
    w = roofline.LayerWork("bn", "bn", 0.0, 0.0, 3.0, 5.0, 0, 1, 1)
    parts = roofline.step_parts([w], 1000, r, 0.0, lambda b: 0.0, 0.5)
    assert parts.forward_s == pytest.approx(3 * 1000 * 2 / 1e11 + 1e-5)
    assert parts.backward_s == pytest.approx(5 * 1000 * 2 / 1e11 + 1e-5)
    mm = roofline.LayerWork("fc", "dense", 2e9, 4e9, 1.0, 2.0, 0, 1, 2)  # compute-bound
    parts = roofline.step_parts([mm], 10, r, 0.0, lambda b: 0.0, 0.5)
    assert parts.forward_s == pytest.approx(10 * 2e9 / 1e12 + 1e-5) and parts.memory_bound_s == 0
    # ResNet-50's norms, activations and adds are memory-bound work with no model FLOPs
    works = estimate.workload("resnet50").works
    assert {w.kind for w in works if not w.matmul} >= {"bn", "relu", "add", "maxpool"}
    assert all(w.fwd_flops == 0 for w in works if not w.matmul)
    est = estimate.predict_step("resnet50", "v100-sxm2", 1, 256, "float16")
    assert 0 < est.memory_bound_s < est.compute_s and est.launch_s > 0


def test_a_measured_workload_without_layers_still_all_reduces_its_gradients():
    w = estimate.Workload("script", 0, 1e9, 100 * MB, ())  # a user's script: FLOPs and gradient bytes only
    est = estimate.predict_step(w, "dgx-a100", 16, 512, "bfloat16")
    assert est.allreduce_s == pytest.approx(collectives.allreduce_time(100 * MB, 16, catalog.get("dgx-a100")))
    assert est.comm_s > 0


def test_a_jax_scripts_gradient_tensors_come_from_its_all_reduce():
    """A jax run records how many arrays its compiled step all-reduces (its gradients and its loss);
    the predictor's tensors are those less the loss. A torch run records none: one message."""
    from scaling.run import measured_workload

    raw = {"model_flops_per_step": 1e9, "comm_bytes_per_step": [4000], "params": 1000,
           "op_record": {"gemm_flops": [1e6], "allreduce_operands": 9}}
    assert measured_workload(raw, 32).leaves == 8
    del raw["op_record"]["allreduce_operands"]
    assert measured_workload(raw, 32).leaves == 0


def test_bucketed_overlap_hides_at_most_the_stated_share():
    est = estimate.predict_step("resnet50", "goyal-2017-cluster", 256, 256 * 32)
    assert est.comm_s >= (1 - compute.OVERLAP_HIDDEN.value) * est.allreduce_s - 1e-12
    assert est.step_time_s == pytest.approx(est.compute_s + est.comm_s + est.overhead_s)


@pytest.mark.parametrize("hw_id,devices,peers", [("dgx-1", 1, 0), ("dgx-1", 2, 1), ("dgx-1", 8, 7), ("dgx-1", 32, 7),
                                                 ("dgx-2", 16, 15), ("v100-sxm2", 4, 3), ("horovod-2017-cluster", 128, 3),
                                                 ("tpu-v3-board", 8, 0), ("tpu-v5e", 4, 0)])
def test_a_gpu_step_pays_for_the_other_gpus_of_its_node(hw_id, devices, peers):
    """The fitted per-GPU overhead: once for every other GPU in the node (nodes in parallel), none on TPUs."""
    est = estimate.predict_step("resnet50", hw_id, devices, 32 * devices, "bfloat16" if "tpu" in hw_id else "float32")
    assert est.overhead_s == pytest.approx(peers * compute.PEER_STEP_S.value)
    assert est.step_time_s == pytest.approx(est.compute_s + est.comm_s + est.overhead_s)


def test_the_per_gpu_overhead_is_the_fit_its_source_states():
    """Recomputed from the published FP32 and TF32 steps (DeepLearningExamples, 1 vs 8 GPUs) less the
    rule's own exposed all-reduce: the per-GPU remainder must be the constant's value, within 15%."""
    from scaling.throughput import validation

    per_peer = []
    for case_id in ("dle-dgx1-fp32-8", "dle-dgxa100-tf32-8"):  # the calibration set's published figures
        c = validation.cases()[case_id]
        b, n = c["per_device_batch"], c["devices"]
        grown = b / (c["samples_per_s"] / n) - b / c["base_samples_per_s"]  # published step at N GPUs minus at 1 (s)
        comm = estimate.predict_step(c["model"], c["hardware"], n, n * b, c["dtype"]).comm_s
        per_peer.append((grown - comm) / (n - 1))
    assert statistics.mean(per_peer) == pytest.approx(compute.PEER_STEP_S.value, rel=0.15)
    assert "fitted" in compute.PEER_STEP_S.source


# ---- workloads ------------------------------------------------------------------------------


def test_bert_and_gpt_sizes_have_exact_flops():
    for name, (L, d) in {"bert-base": (12, 768), "bert-large": (24, 1024)}.items():
        s = named_spec(name)
        assert isinstance(s, BERTSpec) and (s.layers, s.d_model) == (L, d)
        assert s.train_flops_per_sample == train_flops_closed_form(s)
    assert named_spec("bert-base").param_count == pytest.approx(110e6, rel=0.01)
    assert named_spec("bert-large").param_count == pytest.approx(340e6, rel=0.02)
    assert named_spec("bert-base", seq_len=512).seq_len == 512
    for name, (L, d, T) in {"gpt2-small": (12, 768, 1024), "gpt3-175b": (96, 12288, 2048), "gpt3-1.3b": (24, 2048, 2048)}.items():
        s = named_spec(name)
        n = s.matmul_params
        assert s.train_flops_per_sample == 6 * n * T + 12 * L * T * d * T  # PaLM's 6N + 12 L d T per token, x T tokens
    assert named_spec("gpt3-175b").param_count == pytest.approx(175e9, rel=0.01)
    est = estimate.predict_step("bert-large", "dgx-a100", 8, 256, "float16")
    assert est.model == "bert-large" and 0 < est.mfu < 1
    assert estimate.workload("bert-base", seq_len="512").train_flops_per_sample == train_flops_closed_form(named_spec("bert-base", seq_len=512))


# ---- the catalog: sources, derivations ------------------------------------------------------


def test_the_host_dtype_check_the_run_command_can_use():
    """run/scale may call compute.check_dtype(catalog.get(hw_id, measure=False), dtype): one line, exit 2."""
    host = catalog.get("host-cpu", measure=False)
    for bad in ("tf32", "float16"):
        with pytest.raises(Exception, match="valid on host-cpu: float32, bfloat16"):
            compute.check_dtype(host, bad)
    assert compute.check_dtype(catalog.get("a100-sxm4"), "tf32") == ("tf32", 156e12)


def test_every_catalog_figure_has_a_source():
    raw = catalog._raw_catalog()
    for hw_id in catalog.ids():
        own = raw[hw_id]
        hw = catalog.get(hw_id, measure=False)
        assert hw.source, hw_id
        if any(k in own for k in ("intra_bw", "inter_bw", "ici_link_bw")):
            assert hw.link_source, hw_id
        if any(k in own for k in ("intra_latency", "inter_latency")):
            assert hw.latency_source, hw_id
        if hw.ici_link_bw:
            assert hw.link_source and hw.slice_source and hw.torus_dims in (2, 3) and hw.ici_links, hw_id
        if hw.dcn_bw:
            assert hw.dcn_source, hw_id
        if own.get("price_usd") or own.get("price_usd_per_hour"):
            assert own.get("price_source"), hw_id
        for key, spec in own.get("derive", {}).items():  # derived = the product of its factors, as text says
            assert catalog.get(hw_id, measure=False).derived[key].value == pytest.approx(math.prod(spec["factors"]))
            assert spec["text"]
    for new in ("a100-sxm4-40gb", "dgx-a100", "dgx-2", "b200", "dgx-b200", "tpu7x", "t4", "l4"):
        assert new in raw, new


def test_derived_peaks_are_cores_times_clock_times_flops_per_cycle():
    t4, l4 = catalog.get("t4"), catalog.get("l4")
    assert t4.derived["fp32"].value == pytest.approx(40 * 64 * 2 * 1.59e9) and abs(t4.derived["fp32"].value / 8.1e12 - 1) < 0.01
    assert t4.derived["fp16"].value == pytest.approx(320 * 128 * 1.59e9) and abs(t4.derived["fp16"].value / 65e12 - 1) < 0.01
    assert l4.derived["fp32"].value == pytest.approx(58 * 128 * 2 * 2.04e9) and abs(l4.derived["fp32"].value / 30.3e12 - 1) < 0.01
    assert catalog.get("tpu-v3-pod").derived["bf16"].value == pytest.approx(1024 * 123e12)
    # NVLink per direction: V100 150, A100 300, H100 450, B200 900 GB/s
    assert [catalog.get(h).intra_bw for h in ("v100-sxm2", "a100-sxm4", "h100-sxm", "b200")] == [150e9, 300e9, 450e9, 900e9]
    # Google's memory sizes are GiB
    assert catalog.get("tpu-v4").memory_bytes == 32 * 2**30 and catalog.get("tpu7x").memory_bytes == 192 * 2**30


# ---- MFU and bad input ----------------------------------------------------------------------


def test_mfu_above_100_is_never_printed_unflagged(monkeypatch, capsys):
    monkeypatch.setitem(compute.COMPUTE_FRACTION, "gpu-fp32-simt", compute.Attainable(3.0, "a broken fraction (test)"))
    args = ["predict", "--model", "resnet50", "--hardware", "v100-sxm2", "--devices", "1", "--global-batch", "256"]
    assert cli.main([*args, "--json"]) == 0
    row = json.loads(capsys.readouterr().out)[0]
    assert row["mfu"] > 1 and "above 100%" in row["mfu_flag"]
    monkeypatch.setenv("COLUMNS", "200")
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "(above peak!)" in out and "above 100% of peak" in out
    pct = f"{row['mfu'] * 100:.1f}%"
    assert all("(above peak!)" in line for line in out.splitlines() if pct in line)


@pytest.mark.parametrize("args,needle", [
    (["--hardware", "tpu-v3-pod", "--devices", "8", "--global-batch", "256", "--dtype", "float16"], "valid on tpu-v3-pod: float32, bfloat16"),
    (["--hardware", "v100-sxm2", "--devices", "8", "--global-batch", "256", "--dtype", "tf32"], "valid on v100-sxm2: float32, float16"),
    (["--hardware", "tpu-v5p", "--devices", "8192", "--global-batch", "8192"], "largest slice of 6144"),
    (["--hardware", "tpu-v4", "--devices", "8192", "--global-batch", "8192", "--slices", "2"], "no data-center network"),
    (["--hardware", "tpu-v3-pod", "--devices", "4096", "--global-batch", "4096"], "2048"),
    (["--hardware", "h100-sxm", "--devices", "8", "--global-batch", "256", "--dtype", "float8"], "float8"),
    (["--hardware", "host-cpu", "--devices", "2", "--global-batch", "64", "--dtype", "tf32"], "valid on host-cpu: float32, bfloat16"),
    (["--hardware", "h100-sxm", "--devices", "8", "--global-batch", "256", "--algorithm", "torus"], "no ICI torus"),
    (["--hardware", "host-cpu", "--devices", "2", "--global-batch", "64", "--dtype", "float16"], "valid on host-cpu: float32, bfloat16"),
])
def test_bad_input_exits_2_with_one_line(args, needle, capsys):
    try:
        rc = cli.main(["predict", "--model", "resnet50", *args])
    except SystemExit as e:  # argparse's own choices check
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
