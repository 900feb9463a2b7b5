"""Deviceless TPU compilation of the real train step (libtpu from PyPI, no TPU present).

`scripts/aot_report.py` (the command line of `pythia_jax.aot`) lowers `train.make_train_step`
for a `v5e:2x2` slice and compiles it with libtpu; these tests check what it reports, including
that the FLOPs / time extrapolated from 1- and 2-layer compiles match a compile of the whole
unrolled step, the library function in this process, and bad requests. They fail (never skip)
without libtpu.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from pythia_jax import aot, attention

REPO = pathlib.Path(__file__).resolve().parents[1]
SMALL = ["--model=pythia-14m", "--topology=v5e:2x2", "--mesh=data:2,fsdp:2,tensor:1",
         "--batch=8", "--seq_len=128", "--set=model.num_layers=3", "--set=model.vocab_size=1024"]


def _env():
    return dict(os.environ, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1",
                TF_CPP_MIN_LOG_LEVEL="3",
                PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")


def test_libtpu_is_installed():
    try:
        import libtpu  # noqa: F401
    except ImportError:
        pytest.fail("libtpu is not installed, so TPU compilation cannot be checked on this "
                    "machine: pip install 'pythia-jax[tpu]' (or pip install libtpu==0.0.52)")


@pytest.mark.slow
def test_small_train_step_compiles_for_v5e_2x2(tmp_path):
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "aot_report.py"), *SMALL,
                           "--cost=check", f"--json={out}"], env=_env(), cwd=REPO, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "-> fits" in proc.stdout and "MFU" in proc.stdout, proc.stdout
    r = json.loads(out.read_text())
    assert r["chips"] == 4 and r["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1}
    assert r["attention"] == "pallas" and r["scan_layers"] is True
    # the Pallas flash kernel went through Mosaic (forward and backward), not interpret mode
    assert r["mosaic_kernels"] >= 2
    # arguments hold the fp32 train state (params, Adam mu and nu), split at most 4 ways
    state_bytes = 12 * r["params"]
    args = r["memory"]["arguments_gib"] * 2**30
    assert state_bytes / 4 <= args <= state_bytes * 1.05 + 2**20
    assert r["memory"]["fits"] and 0 < r["memory"]["total_gib"] < r["memory"]["hbm_gib"]
    # compiler FLOPs (layer loop unrolled and extrapolated) agree with the analytic count
    assert 0.9 <= r["compiler_flops_per_step"] / r["model_flops_per_step"] <= 1.3, r
    assert r["estimated_step_s"] > 0 and r["estimated_step_s_cycles"] > 0
    # the JSON fields of an honest report: fits, both MFUs as fractions, causal counting
    assert r["fits"] is True and r["flops_convention"] == "causal"
    mfu = r["mfu"]
    assert 0 < mfu["roofline"] < 1 and 0 < mfu["cycles"] < 1, mfu
    # PaLM's count adds the masked half of attention: larger by exactly that share
    assert r["model_flops_per_step_palm"] - r["model_flops_per_step"] == \
        r["attention_flops_per_step_palm"] // 2
    assert mfu["roofline_palm"] / mfu["roofline"] == pytest.approx(
        r["model_flops_per_step_palm"] / r["model_flops_per_step"])
    # our flash kernels carry a pl.CostEstimate: priced, none unpriced
    assert r["unpriced_kernels"] == []
    priced = r["cost_parts"]["grads_1_layer"]["priced_kernels"]
    assert {"pythia_flash_fwd", "pythia_flash_dq", "pythia_flash_dkv"} <= set(priced), priced
    # data:2 x fsdp:2: gradients are reduced and fsdp weights gathered, and priced on ICI
    col = r["collectives"]
    assert col["by_kind"]["all-reduce"]["bytes"] > 0 and col["by_kind"]["all-gather"]["bytes"] > 0
    assert col["ici_gbps"] == aot.ICI_GBPS["v5e"]
    assert col["ici_lower_bound_s"] == pytest.approx(col["traffic_bytes"] / 200e9)
    # microbatch given? no: searched from the default, 8 / 4 = 2 rows per device fit whole
    assert r["microbatch_per_device"] == 2 and r["microbatch_tried"][0] == {
        "microbatch": 2, "fits": True, "total_gib": r["memory"]["total_gib"],
        "temporaries_gib": r["memory"]["temporaries_gib"]}
    assert "chosen: the largest power of two that fits" in proc.stdout
    assert r["remat_choice"] == "the training config's"
    # the extrapolation from 1- and 2-layer compiles reproduces the unrolled 3-layer step
    check = r["cost_check"]
    assert check["flops_ratio"] == pytest.approx(1.0, rel=0.01), check
    assert check["full_seconds"] > 0 and check["seconds_ratio"] == pytest.approx(1.0, rel=0.25)
    assert check["cycle_seconds_ratio"] == pytest.approx(1.0, rel=0.25), check


@pytest.mark.slow
def test_step_that_cannot_fit_is_reported_as_not_fitting(tmp_path):
    # 4096 x 2048 tokens of 50,304 fp32 logits per step on 4 v5e chips: far beyond 16 GiB
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "aot_report.py"),
                           "--model=pythia-14m", "--topology=v5e:2x2", "--mesh=data:4",
                           "--batch=4096", "--microbatch=0", "--remat=none", "--cost=none",
                           f"--json={out}"],
                          env=_env(), cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "DOES NOT FIT" in proc.stdout, proc.stdout
    r = json.loads(out.read_text())
    m = r["memory"]
    assert m["fits"] is False and m["temporaries_gib"] > 16
    assert r["fits"] is False and r["mfu"] == {"roofline": None, "cycles": None,
                                               "roofline_palm": None, "cycles_palm": None}


@pytest.mark.slow
def test_report_through_the_library_compiles_mosaic_kernels_in_this_process():
    """`aot.report` in this CPU process, no mock: the step is traced for the TPU
    (`attention.target_platform`), so the Pallas kernels are Mosaic custom calls."""
    r = aot.report("pythia-14m", "v5e:2x2", aot.parse_mesh("data:2,fsdp:2"), batch=8,
                   seq_len=128, cost="none",
                   overrides=["model.num_layers=1", "model.vocab_size=1024"])
    assert r["chips"] == 4 and r["attention"] == "pallas"
    assert r["mosaic_kernels"] >= 2, r
    assert r["memory"]["fits"] and 0 < r["memory"]["total_gib"] < r["memory"]["hbm_gib"] == 16
    assert "estimated_step_s" not in r  # cost="none": memory only
    text = aot.format_report(r)
    assert text.startswith("pythia-14m (") and "-> fits" in text and "MFU" not in text
    assert attention.current_platform() == "cpu"  # the TPU target ends with the compile


def test_bad_report_requests_name_the_flag_and_the_field():
    with pytest.raises(aot.ReportError, match=r"--topology=v9:2x2: unknown chip 'v9'"):
        aot.chip_of("v9:2x2")
    assert aot.parse_mesh("data:-1, fsdp:4") == {"data": -1, "fsdp": 4}
    with pytest.raises(aot.ReportError, match=r"--mesh=data:two: expected axis:size pairs"):
        aot.parse_mesh("data:two")
    with pytest.raises(aot.ReportError, match=r"--mesh=dta:2: unknown axis 'dta'"):
        aot.parse_mesh("dta:2")
    kw = dict(mesh={"data": 4}, batch=8, seq_len=128)
    c = aot.build_config("pythia-14m", **kw, overrides=[
        "model.num_layers=3", "optim.skip_nonfinite=False", "data.path=/x/document"])
    assert c.model.num_layers == 3 and c.optim.skip_nonfinite is False
    assert c.data.path == "/x/document" and c.train.batch_size == 8
    assert c.mesh.shape.to_dict() == {"data": 4, "fsdp": 1, "tensor": 1}
    for bad, msg in [("model.nope=1", r"no field 'model\.nope'"),
                     ("nope.x=1", r"no field 'nope'"),
                     ("model.num_layers", r"expected FIELD=VALUE"),
                     ("model.num_layers=abc", r"model\.num_layers=abc")]:
        with pytest.raises(aot.ReportError, match=msg):
            aot.build_config("pythia-14m", **kw, overrides=[bad])
    with pytest.raises(aot.ReportError, match=r"--model=pythia-3b: .*unknown size '3b'"):
        aot.build_config("pythia-3b", **kw)
    with pytest.raises(aot.ReportError, match=r"--cost=most: expected one of"):
        aot.report("pythia-14m", "v5e:2x2", {"data": 4}, cost="most")


def test_script_takes_config_overrides_and_fails_cleanly_on_bad_ones(tmp_path):
    """`--config.a.b=V` (as scripts/train.py spells overrides) is `--set=a.b=V`; a bad field,
    chip or --json path exits 2 with the error, before any compile, and writes no JSON."""
    out = tmp_path / "report.json"
    for args, msg in [(["--config.model.nope=1"], "no field 'model.nope'"),
                      (["--config.model.num_layers", "abc"], "model.num_layers=abc"),
                      (["--set=model.num_layers=3", "--topology=v9:2x2"], "unknown chip 'v9'"),
                      ([f"--json={tmp_path / 'no' / 'r.json'}"], "does not exist")]:
        proc = subprocess.run([sys.executable, str(REPO / "scripts" / "aot_report.py"),
                               "--model=pythia-14m", f"--json={out}", *args], env=_env(),
                              cwd=REPO, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, (args, proc.stdout[-2000:], proc.stderr[-4000:])
        assert msg in proc.stderr, (args, proc.stderr[-4000:])
        assert not out.exists()


def test_causal_and_palm_flops_against_a_hand_count():
    """pythia-70m at T=2048: 6 L layers' weights + embed_out, attention 12 L T d (PaLM) or half
    of it (causal), counted by hand."""
    from pythia_jax.config import get_preset
    cfg = get_preset("70m")
    d, L, f, V, T = 512, 6, 2048, 50304, 2048
    assert (cfg.hidden_size, cfg.num_layers, cfg.intermediate_size, cfg.vocab_size) == (d, L, f, V)
    weights = L * (4 * d * d + 2 * d * f) + V * d
    palm = 6 * weights + 12 * L * T * d
    causal = 6 * weights + 6 * L * T * d
    got = aot.model_flops_per_token(cfg, T)
    assert got == {"causal": causal, "palm": palm, "attention_palm": 12 * L * T * d}
    assert (causal, palm) == (305_528_832, 343_277_568)  # per token
    assert palm - causal == 6 * L * T * d == 37_748_736


_HLO = """HloModule m, entry_computation_layout={()->f32[]}

%cond (p: (s32[], f32[64])) -> pred[] {
  %p = (s32[], f32[64]) parameter(0)
  %c = s32[] constant(16)
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %lt = pred[] compare(%i, %c), direction=LT
}

%body (p.1: (s32[], f32[64])) -> (s32[], f32[64]) {
  %p.1 = (s32[], f32[64]) parameter(0)
  %g = f32[64]{0} get-tuple-element(%p.1), index=1
  %ar = f32[1024,256]{1,0} all-reduce(%g), channel_id=3, replica_groups={{0,1,2,3}}, to_apply=%add, backend_config={"estimated_cycles":"100"}
  %k = bf16[8,128]{1,0} custom-call(%g), custom_call_target="tpu_custom_call", metadata={op_name="jit(f)/my_kernel/pallas_call"}, backend_config={"custom_call_config":{"cost_estimate":{"flops":"197000000","transcendentals":"0","bytes_accessed":"10"}}}
  %s = bf16[8,128]{1,0} custom-call(%g), custom_call_target="tpu_custom_call", metadata={op_name="jit(f)/splash_mha_fwd/pallas_call"}, backend_config={"custom_call_config":{"body":"x"}}
  ROOT %t = (s32[], f32[64]) tuple(%i, %g), backend_config={"estimated_cycles":"50"}
}

%piece.1 (a: bf16[32]) -> bf16[64] {
  %a = bf16[32]{0} parameter(0)
  ROOT %ag.1 = bf16[64]{0} all-gather(%a), channel_id=9, replica_groups={{0,1}}, dimensions={0}
}

%piece.2 (b: bf16[32]) -> bf16[64] {
  %b = bf16[32]{0} parameter(0)
  ROOT %ag.2 = bf16[64]{0} all-gather(%b), channel_id=9, replica_groups={{0,1}}, dimensions={0}
}

ENTRY %main () -> f32[] {
  %init = (s32[], f32[64]) tuple()
  %f1 = bf16[64]{0} fusion(%a0), kind=kCustom, calls=%piece.1
  %f2 = bf16[64]{0} fusion(%a0), kind=kCustom, calls=%piece.2
  %ar2 = f32[1000]{0} all-reduce(%z), channel_id=3, replica_groups={{0,1,2,3}}, to_apply=%add
  %w = (s32[], f32[64]) while(%init), condition=%cond, body=%body
  %ag = bf16[4096,512]{1,0} all-gather(%x), channel_id=7, replica_groups=[2,2]<=[4], dimensions={0}, backend_config={"estimated_cycles":"3000"}
  %rs = f32[256,512]{1,0} reduce-scatter(%y), channel_id=8, replica_groups=mesh['axis_0'=2,'axis_1'=2] {'axis_0','axis_1'}, dimensions={0}, to_apply=%add
  ROOT %r = f32[] constant(0), backend_config={"estimated_cycles":"1500"}
}
"""


def test_hlo_cycles_kernels_and_collectives_with_trip_counts():
    """A hand-written module: a 16-trip loop holding an all-reduce, a priced kernel and an
    unpriced one (splash-like: no cost_estimate); outside it an all-gather, a reduce-scatter,
    a second all-reduce reusing the loop's channel id (counted: channel ids are not unique),
    and one async all-gather split over two fusions (one channel and shape: counted once)."""
    costs = aot.hlo_costs(_HLO, "v5e")
    assert costs["cycles"] == 16 * (100 + 50) + 3000 + 1500
    # my_kernel: 197e6 FLOPs at 197 TFLOP/s = 1 us, 16 times
    assert costs["priced_kernels"] == {"my_kernel": pytest.approx(16e-6)}
    assert costs["unpriced_kernels"] == {"splash_mha_fwd": 16}
    assert costs["cycle_seconds"] == pytest.approx((16 * 150 + 4500) / 1.5e9 + 16e-6)
    assert costs["unknown_trip_loops"] == []
    col = aot.collectives_of(_HLO, "v5e", 4)
    ar, ag, rs = (col["by_kind"][k] for k in ("all-reduce", "all-gather", "reduce-scatter"))
    ar_bytes = 16 * 1024 * 256 * 4 + 1000 * 4
    assert ar == {"count": 17, "bytes": ar_bytes, "traffic_bytes": pytest.approx(
        2 * 3 / 4 * ar_bytes)}
    assert ag == {"count": 2, "bytes": 4096 * 512 * 2 + 64 * 2,  # groups of 2
                  "traffic_bytes": pytest.approx(1 / 2 * (4096 * 512 * 2 + 64 * 2))}
    assert rs == {"count": 1, "bytes": 4 * 256 * 512 * 4,  # the input: 4 x the result
                  "traffic_bytes": pytest.approx(3 / 4 * 4 * 256 * 512 * 4)}
    total = ar["traffic_bytes"] + ag["traffic_bytes"] + rs["traffic_bytes"]
    assert col["ici_lower_bound_s"] == pytest.approx(total / 200e9)
    assert costs["uncycled_ops"] == {}
    # libtpu's "no estimate" (INT64_MAX, seen on v5p offload fusions) is named, not summed
    marked = _HLO.replace(
        '  ROOT %r = f32[] constant(0)',
        '  %gather_offload_custom_fusion.11 = f32[8]{0} fusion(%x), kind=kCustom, calls=%add, '
        'backend_config={"estimated_cycles":"9223372036854775807"}\n  ROOT %r = f32[] constant(0)')
    assert "9223372036854775807" in marked
    got = aot.hlo_costs(marked, "v5e")
    assert got["cycles"] == costs["cycles"]
    assert got["uncycled_ops"] == {"gather_offload_custom_fusion": 1}
    # a loop whose condition is not `i < N` is reported, counted once
    odd = _HLO.replace("direction=LT", "direction=NE")
    assert aot.hlo_costs(odd, "v5e")["unknown_trip_loops"] == ["w"]
    assert aot.collectives_of(odd, "v5e", 4)["by_kind"]["all-reduce"]["count"] == 2


def test_bad_microbatch_and_batch_flags_fail_before_compiling(tmp_path):
    """Negative --microbatch / --grad_accum, a zero --batch: exit 2 naming the flag, no JSON."""
    out = tmp_path / "report.json"
    for args, msg in [(["--microbatch=-1"], "--microbatch=-1: must be >= 0"),
                      (["--grad_accum=-2"], "--grad_accum=-2: must be >= 0"),
                      (["--batch=0"], "--batch=0: must be positive")]:
        proc = subprocess.run([sys.executable, str(REPO / "scripts" / "aot_report.py"),
                               "--model=pythia-14m", "--topology=v5e:2x2", f"--json={out}",
                               *args], env=_env(), cwd=REPO, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 2, (args, proc.stdout[-2000:], proc.stderr[-4000:])
        assert msg in proc.stderr, (args, proc.stderr[-4000:])
        assert not out.exists()


def test_report_without_hlo_text_says_not_available_instead_of_zero():
    """Where jaxlib cannot read libtpu's module back (seen on v5p), the cycles time and the
    unpriced kernels are unknown: printed as such, not as zeros or "none" (a crash before)."""
    r = {"model": "pythia-1b", "params": 1.0e9, "topology": "v5p:2x2x1", "chips": 4,
         "mesh": {"data": 4, "fsdp": 1, "tensor": 1}, "batch": 1024, "seq_len": 2048,
         "grad_accum": 2, "microbatch_per_device": 128,
         "microbatch_tried": [{"microbatch": 256, "fits": False}, {"microbatch": 128, "fits": True}],
         "remat": "full", "remat_choice": "the training config's", "scan_layers": True,
         "attention": "pallas", "dtype": "bfloat16", "compile_s": 49.0,
         "memory": {"arguments_gib": 11.3, "temporaries_gib": 73.8, "total_gib": 85.1,
                    "hbm_gib": 95, "fits": True},
         "model_flops_per_step": 1.2e16, "model_flops_per_step_palm": 1.3e16,
         "collectives": None, "compiler_flops_per_step": 1.5e16, "cost_method": "extrapolate",
         "cost_compile_s": 70.0, "estimated_step_s": 10.2, "estimated_step_s_cycles": None,
         "clock_ghz": 1.75, "peak_tflops_per_chip": 459.0, "unpriced_kernels": None,
         "mfu": {"roofline": 0.657, "cycles": None, "roofline_palm": 0.702, "cycles_palm": None}}
    text = aot.format_report(r)
    assert "tried 256 does not fit, 128 fits" in text
    assert "MFU 65.7 % (PaLM counting 70.2 %)" in text
    assert "summed op cycles: not available" in text and "MFU cycles: n/a" in text
    assert "collectives: not read" in text
    assert "cost estimate (priced at zero): not known" in text
    parts = [{"unpriced_kernels": {"splash_mha_fwd": 2}}, {"unpriced_kernels": {}}]
    assert aot._union_unpriced(parts) == ["splash_mha_fwd"]
    assert aot._union_unpriced(parts + [{"unpriced_kernels": None}]) is None
