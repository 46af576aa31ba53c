"""benchmarks/bench_gpu.py: the logic on toy configs (``--smoke``, CPU), not the timings.

The real figures come from the device machine (benchmarks/results/gpu-h100.*); here we check that
every section runs, measures stock and ours, and writes the JSON and table it promises.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "bench_gpu.py"


def _module():
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _positive(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


def _smoke_run(out: Path, sections: str, *args: str) -> subprocess.CompletedProcess:
    """``bench_gpu.py --smoke --cpu`` with ``args``, its JSON at ``out``."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--cpu", "--sections", sections, "--out", str(out),
                           *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("bench") / "smoke.json"
    # every section; the fast path's step and sample for 5B alone (rotary, the larger case: the CPU
    # tests cover both), so the fast sections add seconds, not tens of seconds, to CI
    sections = "gemm,step,sample,train,step_fast:5b,sample_fast:5b,approx:5b,train_fast:2b+5b"
    proc = _smoke_run(out, sections, "--train-variants", "eager,compiled,fast,fast-nockpt")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), out


def test_smoke_run_measures_every_section_for_stock_and_ours(smoke):
    r, out = smoke
    assert r["settings"]["smoke"] and r["machine"]["versions"]["torch"]
    assert _positive(r["gemm"]["ceiling_tflops"])
    for arch in ("2b", "5b"):
        step = r["step"][arch]
        assert (step["stock"]["channels"], step["ours"]["channels"]) == (16, 32)
        for name in ("stock", "ours"):
            for key in ("median_s", "flops", "tflops", "mfu"):
                assert _positive(step[name][key]), (arch, name, key)
            assert "peak_gib" in step[name]  # None on the CPU
        assert math.isfinite(step["overhead_pct"])
        assert 0 < step["extra_flops_ours_pct"] < 10  # only the two projections widen (toy sizes: a few %)

        sample = r["sample"][arch]
        assert sample["steps"] == 2 and sample["scheduler"] == ("CogVideoXDPMScheduler" if arch == "5b"
                                                                 else "CogVideoXDDIMScheduler")
        for name in ("stock", "ours"):
            for key in ("total_s", "denoise_s", "denoise_per_step_s", "vae_decode_s"):
                assert _positive(sample[name][key]), (arch, name, key)
        # ours decodes the RGB and the dense half
        assert (sample["stock"]["vae_decodes"], sample["ours"]["vae_decodes"]) == (1, 2)

    train = r["train"]["2b_zero2_1gpu"]
    assert train["deepspeed_config"]["zero_optimization"]["stage"] == 2
    assert train["deepspeed_config"]["train_micro_batch_size_per_gpu"] == 1
    for name in ("stock", "ours"):
        row = train[name]
        for key in ("median_s", "tokens_per_s_per_gpu", "model_tflops", "mfu_3x", "mfu_4x"):
            assert _positive(row[key]), (name, key)
        assert row["loss_finite"]
    assert r["train"]["5b_zero2_2gpu"]["status"] == "not run" and r["train"]["5b_zero2_2gpu"]["reason"]
    fwd_bwd = r["train"]["5b_fwd_bwd_1gpu"]
    assert _positive(fwd_bwd["stock"]["median_s"]) and _positive(fwd_bwd["ours"]["median_s"])

    table = out.with_suffix(".md").read_text()
    assert "SMOKE RUN" in table and "ours (32 ch)" in table and "stock (16 ch)" in table


def test_smoke_run_measures_the_fast_path_against_eager(smoke):
    """step_fast / sample_fast / train_fast: ours eager against ours with compiled blocks (aot_eager on
    the CPU: the same graph capture, no code generation) and the batched decode; fp32 here, so
    the compiled outputs equal eager's and the decodes differ by at most a rounding level."""
    r, out = smoke
    assert r["settings"]["compile_backend"] == "aot_eager"
    for arch in ("5b",):
        step = r["step_fast"][arch]
        for name in ("eager", "compiled"):
            for key in ("median_s", "tflops", "mfu"):
                assert _positive(step[name][key]), (arch, name, key)
        assert _positive(step["first_call_s"]) and step["compile"]["fullgraph"] and step["compiled_rerun_identical"]
        assert step["compiled_vs_eager"]["max_abs"] <= 1e-5 and step["vs_fp32"]["compiled"]["rel_l2"] <= 1e-5

        sample = r["sample_fast"][arch]
        for name in ("eager", "fast"):
            row = sample[name]
            assert _positive(row["total_s"]) and _positive(row["vae_decode_s"]), (arch, name)
            assert (row["vae_decode_calls"], row["vae_decodes"]) == (1, 2)  # one call for video + colormap
        assert sample["eager"]["decode"].startswith("sequential") and sample["fast"]["decode"].startswith("batched")
        assert sample["fast"]["blocks"].startswith("compiled") and _positive(sample["fast"]["compile_warmup_s"])
        diff = sample["vs_eager"]
        assert diff["latents"]["rel_l2"] <= 1e-5
        assert diff["videos"]["max_abs"] <= 1 and diff["colormaps"]["max_abs"] <= 1

    train = r["train_fast"]["2b_zero2_1gpu"]["variants"]
    assert list(train) == ["eager", "compiled", "fast", "fast-nockpt"]
    assert train["fast"]["setting"] == {"compiled_blocks": True, "checkpointing": "selective", "fused_adamw": True,
                                        "optimizer": "torch AdamW"}
    for name in ("compiled", "fast", "fast-nockpt"):  # fp32: every variant computes eager's losses
        row = train[name]
        assert len(row["losses"]) == len(train["eager"]["losses"]) == row["loss_rel_diff"]["steps"] > 1
        assert row["loss_rel_diff"]["max"] <= 1e-5 and _positive(row["median_s"]), name
    assert r["train_fast"]["5b_zero2_2gpu"]["status"] == "not run"
    table = out.with_suffix(".md").read_text()
    assert "Fast path: denoising step" in table and "Fast path: full sample" in table and "Fast path: training" in table


def test_smoke_run_trains_with_8bit_adamw_states(smoke, tmp_path):
    """``--train-optimizer adamw8bit`` (torchao's 8-bit moments, here on fp32 weights: the CPU runs
    fp32) under a ZeRO-0 JSON: filed under its own key, the same first loss as AdamW's (same weights
    and batch: the forward is the same), then updates close to AdamW's at lr 1e-5."""
    pytest.importorskip("torchao")
    r_adamw, _ = smoke
    out = tmp_path / "eight.json"
    proc = _smoke_run(out, "train_fast:2b", "--train-variants", "eager", "--train-optimizer", "adamw8bit",
                      "--deepspeed-config", "infra/deepspeed/zero0.json")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    entry = json.loads(out.read_text())["train_fast"]["2b_zero0_1gpu_adamw8bit"]
    row = entry["variants"]["eager"]
    assert row["setting"]["optimizer"] == "torchao AdamW8bit" and not row["setting"]["fused_adamw"]
    reference = r_adamw["train_fast"]["2b_zero2_1gpu"]["variants"]["eager"]["losses"]
    assert row["losses"][0] == pytest.approx(reference[0], rel=1e-6)
    assert row["losses"] == pytest.approx(reference, rel=1e-2) and row["losses"] != reference
    # a JSON that partitions the weights is refused, as training refuses it
    proc = _smoke_run(tmp_path / "refused.json", "train_fast:2b", "--train-optimizer", "adamw8bit")
    assert proc.returncode != 0 and "adamw8bit needs stage 0" in proc.stderr


def test_smoke_run_measures_the_approximate_modes_against_the_lossless_path(smoke):
    """approx: every cache mode runs and is compared with the lossless fast path on the same seed;
    float8 (rowwise and tensorwise) cannot run on the CPU and says why."""
    r, out = smoke
    e = r["approx"]["5b"]
    assert e["lossless"]["status"] == "measured" and e["lossless"]["blocks"] == "compiled"
    assert e["steps"] == 2 and e["steps_note"] == "as asked"
    for mode in ("float8", "float8-tensorwise"):
        assert e["modes"][mode]["status"] == "skipped" and "CUDA" in e["modes"][mode]["reason"], mode
    assert "float8: tensorwise needs" in e["modes"]["float8-tensorwise"]["reason"]
    for mode in ("float8-attention", "float8-tensorwise-attention"):  # FA3's kernel: Hopper + fa3-fwd
        assert e["modes"][mode]["status"] == "skipped" and "fa3-fwd" in e["modes"][mode]["reason"], mode
    for mode in ("first-block", "faster", "pab"):
        row = e["modes"][mode]
        assert row["status"] == "measured" and row["cache"] == mode, mode
        assert _positive(row["denoise_per_step_s"]) and _positive(row["total_s"]), mode
        v = row["vs_lossless"]
        assert set(v) == {"latents", "videos", "colormaps"} and v["latents"]["psnr_db"] > 0, mode
        assert 0 <= v["videos"]["mean_abs"] <= v["videos"]["max_abs"] <= 255, mode
    assert e["modes"]["first-block"]["blocks"] == "compiled"  # beneath its hooks
    assert e["modes"]["pab"]["blocks"].startswith("eager")
    assert "Approximate sampling modes" in out.with_suffix(".md").read_text()


def test_approx_modes_map_to_their_settings():
    """float8 stays rowwise (results written before tensorwise keep their meaning); float8-tensorwise
    is one scale per tensor; the *-attention modes add float8 attention; the caches leave float8 off."""
    import types

    b = _module()
    bench = types.SimpleNamespace(args=types.SimpleNamespace(compile_mode="default", attention="sdpa"))
    approx = {m: b.approx_settings(bench, m).approximate for m in ("lossless", *b.APPROX_MODES)}
    assert {m: a.float8 for m, a in approx.items()} == {"lossless": "none", "float8": "rowwise",
                                                        "float8-tensorwise": "tensorwise", "float8-attention": "none",
                                                        "float8-tensorwise-attention": "tensorwise",
                                                        "first-block": "none", "faster": "none", "pab": "none"}
    assert [m for m, a in approx.items() if a.float8_attention] == ["float8-attention", "float8-tensorwise-attention"]
    assert [m for m, a in approx.items() if a.cache is not None] == ["first-block", "faster", "pab"]


def test_flop_count_matches_the_reference_figures():
    """5B, CFG batch 2 at 49x480x720: 1.85 s/step is quoted as about 48% MFU (against ~750 TFLOP/s)."""
    b = _module()
    cfg = b.ARCHS["5b"]["transformer"]
    stock = b.forward_flops(cfg, b.FULL_SIZE, 16, 16, batch=2)
    assert (stock["video_tokens"], stock["tokens"]) == (13 * 30 * 45, 13 * 30 * 45 + 226)
    assert stock["total"] == pytest.approx(6.64e14, rel=0.01)
    assert 0.45 < stock["total"] / 1.85 / 750e12 < 0.50
    ours = b.forward_flops(cfg, b.FULL_SIZE, 32, 32, batch=2)
    assert 0 < ours["total"] / stock["total"] - 1 < 1e-4


def test_section_plan_and_merge(tmp_path):
    b = _module()
    plan = b.parse_sections("train:2b+5b,gemm,sample:2b", ["5b", "2b"])
    assert plan == {"gemm": ["5b", "2b"], "sample": ["2b"], "train": ["2b", "5b"]}
    plan = b.parse_sections("train_fast:2b,gemm,sample_fast:5b,step_fast:5b", ["5b", "2b"])
    assert list(plan.items()) == [("gemm", ["5b", "2b"]), ("step_fast", ["5b"]), ("sample_fast", ["5b"]),
                                  ("train_fast", ["2b"])]
    with pytest.raises(SystemExit):
        b.parse_sections("steps", ["2b"])
    one = {"date": "d1", "settings": {"plan": {"step": ["5b"]}}, "gemm": {"ceiling_tflops": 700.0, "shapes": [],
                                                                        "ceiling_shape": [1, 1, 1]},
           "step": {"5b": {"x": 1}}}
    two = {"date": "d2", "settings": {"plan": {"train": ["2b"]}}, "gemm": {"ceiling_tflops": 710.0},
           "train": {"2b_zero2_1gpu": {"status": "not run", "reason": "test"}}}
    paths = []
    for i, r in enumerate((one, two)):
        paths.append(tmp_path / f"{i}.json")
        paths[-1].write_text(json.dumps(r))
    merged = b.merge(paths)
    assert merged["step"]["5b"] == {"x": 1} and "2b_zero2_1gpu" in merged["train"]
    assert merged["gemm"]["ceiling_tflops"] == 700.0 and [x["gemm"]["ceiling_tflops"] for x in merged["runs"]] == [
        700.0, 710.0]


@pytest.mark.slow
def test_two_rank_smoke_run_splits_one_sample_and_matches_one_gpu(tmp_path, torchrun, monkeypatch):
    """sample_parallel under torchrun (2 CPU ranks, gloo): every transformer call of the timed sample
    is split, rank 0 writes the JSON, and the split sample equals the one-rank sample to fp32 rounding."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    out = tmp_path / "parallel.json"
    torchrun(SCRIPT, "--smoke", "--cpu", "--sections", "sample_parallel:5b", "--out", out)
    e = json.loads(out.read_text())["sample_parallel"]["5b_2gpu"]
    # the timed steps, the 2 warm-up steps, and the warm-up and timed VAE decodes
    assert e["gpus"] == 2 and e["split"]["calls_split"] == e["steps"] + 2 + 2
    assert _positive(e["split"]["total_s"]) and _positive(e["one_gpu"]["total_s"])
    assert e["split"]["vae_decodes"] == 2 and e["vs_one_gpu"]["latents"]["rel_l2"] < 1e-4
    assert e["vs_one_gpu"]["videos"]["max_abs"] <= 1
    assert "CFG-parallel" in out.with_suffix(".md").read_text()


def test_train_fast_key_names_the_zero_stage_and_offload_the_config_sets():
    """A stage-1 or stage-0 JSON given to ``--deepspeed-config`` is not filed under ``zero2``."""
    train_fast_key = _module().train_fast_key
    shipped = json.loads((REPO / "infra/deepspeed/zero2.json").read_text())
    offload = json.loads((REPO / "infra/deepspeed/zero2-offload.json").read_text())
    assert train_fast_key("2b", 1, shipped, None) == "2b_zero2_1gpu"
    assert train_fast_key("2b", 1, {**shipped, "zero_optimization": {"stage": 1}}, None) == "2b_zero1_1gpu"
    assert train_fast_key("2b", 1, {"bf16": {"enabled": True}}, None) == "2b_zero0_1gpu"
    assert train_fast_key("5b", 1, offload, 80) == "5b_zero2_1gpu_offload-cpu_cap80gib"
    assert train_fast_key("5b", 1, {"zero_optimization": {"stage": 0}}, 79, "adamw8bit", "bf16") == \
        "5b_zero0_1gpu_adamw8bit_bf16-weights_cap79gib"
