"""The sample, evaluate and report steps.

- perfect dense predictions score perfectly, and videos that are their captions' clips show the
  captioned sky and ground; configured metric models (tiny random DINO/CLIP, a
  TorchScript I3D stand-in) add SC, BC and FVD; FVD of a set against itself is 0;
- streaming: chunk size does not change any number;
- the FVD reference statistics are cached per split and recomputed when a clip changes;
- the pseudo-ground-truth protocol (Tab 3): an annotator that agrees with the prediction scores 1;
- missing weights are one note each and the other metrics still run;
- the tables come out in the paper's layouts (markdown and HTML);
- the sample step resumes an interrupted run without regenerating finished samples, and times
  the stock architecture beside ours (Tab 4).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from udpdiff import pixelplanes
from udpdiff.config import load_params
from udpdiff.data.synthetic import synthesize_dataset
from udpdiff.evaluation.runner import MetricSuite, build_metric_suite
from udpdiff.io.dense import load_depth, load_ids
from udpdiff.io.manifest import read_manifest, resolve
from udpdiff.io.video import read_video
from udpdiff.paths import ProjectPaths
from udpdiff.stages import evaluate, report, sample

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


def _metric_models(tmp_path: Path) -> dict[str, str]:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection, ViTConfig, ViTModel

    from tests.conftest import _save_fake_i3d

    torch.manual_seed(0)
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       image_size=224, patch_size=16), add_pooling_layer=False).save_pretrained(tmp_path / "dino")
    CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                   num_attention_heads=2, image_size=224, patch_size=32,
                                                   projection_dim=16)).save_pretrained(tmp_path / "clip")
    _save_fake_i3d(tmp_path / "i3d.pt")
    return {"dino": str(tmp_path / "dino"), "clip": str(tmp_path / "clip"), "i3d": str(tmp_path / "i3d.pt")}


def _params(tmp_path: Path, evaluate: dict | None = None, **profile_overrides):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    tiny = raw["profiles"]["tiny"]
    tiny["evaluate"].update(evaluate or {})
    for section, values in profile_overrides.items():
        tiny[section].update(values)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    return load_params(tmp_path / "params.yaml")


def _perfect_samples(paths: ProjectPaths, num_clips: int = 4, clip_frames: int = 9) -> None:
    """Sample sets whose 'generated' videos are the real val clips and whose predictions are the GT
    (the clips' first 9 frames, the tiny profile's num_frames)."""
    synthesize_dataset(paths.clips, num_clips=num_clips, num_frames=clip_frames, height=48, width=48, fps=8,
                       seed=3, val_fraction=0.5)
    df = read_manifest(paths.manifest)
    index = []
    for task in ("segmentation", "depth"):
        for row in df[df.split == "val"].itertuples():
            video = read_video(resolve(paths.manifest, row.video_path))[:9]
            gt = (load_ids(resolve(paths.manifest, row.seg_path)) if task == "segmentation"
                  else load_depth(resolve(paths.manifest, row.depth_path)))[:9]
            colormap = (pixelplanes.encode_segmentation(gt, seed=0)[0] if task == "segmentation"
                        else pixelplanes.encode_depth(gt))
            npz = paths.samples / task / f"{row.clip_id}.npz"
            npz.parent.mkdir(parents=True, exist_ok=True)
            np.savez(npz, video=video, colormap=colormap, dense=gt, conditioned_colormap=colormap,
                     conditioned_dense=gt)
            index.append({"task": task, "clip_id": row.clip_id, "npz": f"{task}/{row.clip_id}.npz",
                          "prompt": row.caption_long})
    (paths.samples / "index.json").write_text(json.dumps(index))


def test_perfect_predictions_score_perfectly_and_configured_models_add_columns(tmp_path, markdown_rows):
    p = _params(tmp_path, _metric_models(tmp_path))
    paths = ProjectPaths(tmp_path, "tiny")
    _perfect_samples(paths)

    m = evaluate.run(p, paths).metrics
    assert m["depth/gt_delta1"] == pytest.approx(1.0) and m["depth/gt_rmse"] == pytest.approx(0.0, abs=1e-5)
    # synthetic clips: depth is exact, so the depth-space protocol is scored too
    assert m["depth/gt_delta1_depth"] == pytest.approx(1.0)
    assert m["depth/gt_abs_rel_depth"] == pytest.approx(0, abs=1e-6)
    assert "δ1, depth space" in (paths.evaluation / "tables.md").read_text()
    assert m["segmentation/gt_miou"] == pytest.approx(1.0)
    assert m["segmentation/gt_temporal_id_consistency"] == pytest.approx(1.0)
    for task in ("segmentation", "depth"):
        assert 0.0 < m[f"{task}/subject_consistency"] <= 1.0
        assert 0.0 < m[f"{task}/background_consistency"] <= 1.0
        # the generated set *is* the val split the reference statistics come from
        assert m[f"{task}/fvd"] == pytest.approx(0.0, abs=1e-3)
        assert m[f"{task}/fvd_num_videos"] == 2 and m[f"{task}/fvd_reference_videos"] == 2
        assert m[f"{task}/fvd_num_frames"] == 9
        # generated videos are the real ones: the same scores as the reference row
        for key in ("pixel_frame_consistency", "motion_smoothness_flow", "subject_consistency"):
            assert m[f"{task}/{key}"] == pytest.approx(m[f"real/{key}"], rel=1e-6)
    ev = json.loads((paths.evaluation / "metrics.json").read_text())
    assert not any(n.startswith(("dino", "clip", "i3d")) for n in ev["notes"])
    assert "OpenCV" in ev["models"]["motion_smoothness_flow"]
    per_video = (paths.evaluation / "per_video.csv").read_text().splitlines()
    assert len(per_video) == 1 + 2 * 2 + 2  # header, 2 videos per set, 2 real clips

    md = (paths.evaluation / "tables.md").read_text()
    rows = markdown_rows(md)
    assert ["Model", "SC (↑)", "BC (↑)", "MS† (↑)", "FVD (↓)", "sky as captioned (↑)", "ground as captioned (↑)",
            "videos", "frames"] in rows
    # the "generated" videos are the clips their prompts describe: every sky and ground as captioned
    for s in ("segmentation", "depth", "real"):
        assert m[f"{s}/caption_sky"] == 1.0 and m[f"{s}/caption_ground"] == 1.0
    assert next(r for r in rows if r[0] == "UDPDiff (depth)")[4] == "0.00"  # FVD with two decimals
    html = (paths.evaluation / "tables.html").read_text()
    assert html.startswith("<!doctype html>") and "<th>SC (↑)</th>" in html and "not comparable" in html
    assert (paths.evaluation / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report.run(p, paths)
    assert any(r[0] == "UDPDiff (seg)" for r in markdown_rows((paths.report / "report.md").read_text()))
    assert (paths.report / "report.html").exists()


def test_chunk_size_does_not_change_the_numbers_and_fvd_reference_is_cached(tmp_path):
    models = _metric_models(tmp_path)
    paths = ProjectPaths(tmp_path, "tiny")
    _perfect_samples(paths, num_clips=6)
    one = evaluate.run(_params(tmp_path, {**models, "batch_size": 1}), paths).metrics
    cache = sorted(paths.fvd_reference.glob("val-*.npz"))
    assert len(cache) == 1
    stamp = cache[0].stat().st_mtime_ns
    three = evaluate.run(_params(tmp_path, {**models, "batch_size": 3}), paths).metrics
    assert one.keys() == three.keys()
    for k in one:
        assert one[k] == pytest.approx(three[k], rel=1e-5, abs=1e-6), k
    assert cache[0].stat().st_mtime_ns == stamp, "the reference statistics were reused, not recomputed"
    # a changed clip is a different reference: recomputed under a new key
    df = read_manifest(paths.manifest)
    clip = resolve(paths.manifest, df[df.split == "val"].video_path.iloc[0])
    os.utime(clip, ns=(stamp + 10**9, stamp + 10**9))
    evaluate.run(_params(tmp_path, {**models, "batch_size": 3}), paths)
    assert len(list(paths.fvd_reference.glob("val-*.npz"))) == 2


def test_pseudo_ground_truth_protocol():
    """Tab 3: the annotator runs on the generated video; the decoded prediction is scored against it."""
    rng = np.random.default_rng(0)
    videos = rng.integers(0, 256, (2, 5, 16, 16, 3), dtype=np.uint8)
    depth = rng.random((2, 5, 16, 16)).astype(np.float32)
    ids = rng.integers(0, 4, (2, 5, 16, 16)).astype(np.int32)
    seen = []

    def depth_annotator(video):
        seen.append(video)
        return depth[len(seen) - 1]  # agrees exactly with the prediction of this video

    suite = MetricSuite(depth_annotator=depth_annotator, depth_baseline=lambda v: depth[1] ** 3,
                        segmentation_annotator=lambda v: ids[0])
    d = suite.score_pseudo_gt("depth", videos, depth)
    assert all(np.array_equal(s, v) for s, v in zip(seen, videos, strict=True)) and len(seen) == 2
    assert d["pseudo_delta1"] == pytest.approx([1.0, 1.0]) and d["pseudo_rmse"] == pytest.approx([0, 0], abs=1e-6)
    assert d["baseline_delta1"][0] < 0.9  # an unrelated (non-affine) baseline disagrees
    s = suite.score_pseudo_gt("segmentation", videos, ids[[0, 1]])
    assert s["pseudo_miou"][0] == pytest.approx(1.0) and s["pseudo_miou"][1] < 1.0
    assert MetricSuite().score_pseudo_gt("depth", videos, depth) == {}  # nothing configured, nothing scored


def test_missing_metric_weights_are_a_note_and_the_rest_still_runs(tmp_path):
    p = _params(tmp_path, {"dino": str(tmp_path / "absent-dino"), "clip": None, "i3d": str(tmp_path / "absent.pt"),
                           "amt": str(tmp_path / "absent-amt.pth"),
                           "depth_annotator": {"type": "depth-anything-v2", "path": str(tmp_path / "absent-da")}})
    suite = build_metric_suite(p.active.evaluate, where="profiles.tiny.evaluate")
    assert suite.dino is None and suite.clip is None and suite.i3d is None and suite.depth_annotator is None
    assert suite.motion is not None and suite.motion_key == "motion_smoothness_flow"  # falls back to the prior
    notes = "\n".join(suite.notes)
    for missing in ("absent-dino", "absent.pt", "absent-amt.pth", "absent-da"):
        assert missing in notes
    assert "profiles.tiny.evaluate.clip" in notes
    assert set(suite.names) == {"motion_smoothness_flow"}  # only models that produce numbers are named
    paths = ProjectPaths(tmp_path, "tiny")
    _perfect_samples(paths)
    m = evaluate.run(p, paths).metrics
    assert m["depth/gt_delta1"] == pytest.approx(1.0) and "depth/fvd" not in m
    assert 0.0 < m["depth/motion_smoothness_flow"] <= 1.0


def test_bad_sample_file_names_the_file(tmp_path):
    p = _params(tmp_path)
    paths = ProjectPaths(tmp_path, "tiny")
    _perfect_samples(paths)
    bad = next((paths.samples / "depth").glob("*.npz"))
    bad.write_bytes(b"not an npz")
    with pytest.raises(ValueError, match=bad.name):
        evaluate.run(p, paths)


# -- the sample step -------------------------------------------------------------------------------


@pytest.fixture
def tiny_project(tmp_path, tiny_pipeline):

    p = _params(tmp_path, data={"height": 32, "width": 32}, text_encoder={"max_length": 16},
                sample={"num_samples": 2, "num_inference_steps": 2, "runtime_trials": 1, "gallery_size": 1})
    paths = ProjectPaths(tmp_path, "tiny")
    synthesize_dataset(paths.clips, num_clips=4, num_frames=9, height=32, width=32, fps=8, seed=3, val_fraction=0.5)
    tiny_pipeline().save_pretrained(paths.pipeline)
    return p, paths


def test_sample_resumes_an_interrupted_run_and_times_the_stock_baseline(tiny_project, monkeypatch):
    from udpdiff.pipeline import UDPDiffPipeline

    p, paths = tiny_project
    calls = []
    real_call = UDPDiffPipeline.__call__

    def counting(self, *args, **kwargs):
        calls.append(kwargs.get("task"))
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed half-way: one sample of the first set is done
        return real_call(self, *args, **kwargs)

    monkeypatch.setattr(UDPDiffPipeline, "__call__", counting)
    with pytest.raises(KeyboardInterrupt):
        sample.run(p, paths)
    assert not paths.samples.exists()  # nothing half-written where the next stage reads
    calls.clear()
    monkeypatch.setattr(UDPDiffPipeline, "__call__", lambda self, *a, **k: calls.append(k.get("task")) or
                        real_call(self, *a, **k))
    result = sample.run(p, paths)
    # 2 sets x 2 prompts x (generate + conditioned) = 8 calls; the finished sample is not redone;
    # then 2 runtime runs (warm-up + timed) per set of ours
    assert len(calls) == 8 - 2 + 2 * 2
    index = json.loads((paths.samples / "index.json").read_text())
    assert [(e["task"], e["seed"]) for e in index] == [("segmentation", p.seed), ("segmentation", p.seed + 1),
                                                      ("depth", p.seed), ("depth", p.seed + 1)]
    for e in index:
        with np.load(paths.samples / e["npz"]) as z:
            assert z["video"].shape == (9, 32, 32, 3) and z["dense"].shape == (9, 32, 32)
    runtime = json.loads((paths.metrics / "runtime.json").read_text())  # a metric beside the samples, not in them
    assert not any(paths.samples.rglob("*.txt")) and not (paths.samples / "runtime.json").exists()
    assert set(runtime) == {"stock", "segmentation", "depth"}
    assert all(r["seconds_per_sample"] > 0 for r in runtime.values())
    # acceleration.compile_blocks: auto leaves the CPU path eager, for ours and the baseline alike
    assert result.metrics["compiled_blocks"] == 0.0 and all(r["compiled_blocks"] == 0.0 for r in runtime.values())
    assert result.metrics["runtime/stock/seconds_per_step"] == pytest.approx(
        runtime["stock"]["seconds_per_sample"] / 2)
    assert not any(paths.samples.parent.glob(".partial-*"))


def test_annotators_from_local_folders_run_through_the_evaluate_step(tmp_path, tiny_depth_anything_dir, tiny_sam2_dir,
                                                                     markdown_rows):
    """The pseudo-GT protocol end to end with the real annotator classes (tiny random weights, loaded
    from folders like the hub repos). The baseline *is* the annotator here, so it agrees perfectly."""
    da = {"type": "depth-anything-v2", "path": str(tiny_depth_anything_dir)}
    p = _params(tmp_path, {"depth_annotator": da, "depth_baseline": da,
                           "segmentation_annotator": {"type": "sam2", "path": str(tiny_sam2_dir)}})
    paths = ProjectPaths(tmp_path, "tiny")
    _perfect_samples(paths)
    m = evaluate.run(p, paths).metrics
    assert m["depth/baseline_delta1"] == pytest.approx(1.0) and m["depth/baseline_rmse"] == pytest.approx(0, abs=1e-6)
    assert 0.0 <= m["depth/pseudo_delta1"] <= 1.0 and m["depth/pseudo_rmse"] >= 0.0
    assert "segmentation/pseudo_miou" in m  # random SAM2 weights: any value, or NaN when it finds no entity
    ev = json.loads((paths.evaluation / "metrics.json").read_text())
    assert ev["models"]["depth_annotator"].startswith("depth-anything-v2")
    assert not any(n.startswith(("depth_annotator", "segmentation_annotator")) for n in ev["notes"])
    md = (paths.evaluation / "tables.md").read_text()
    assert "Depth of generated videos vs pseudo ground truth (paper Tab 3)" in md
    assert [f"depth-anything-v2 ({tiny_depth_anything_dir})", "1.0000", "0.0000"] in markdown_rows(md)


def test_depth_alignment_per_video_or_per_frame():
    """A prediction whose scale flickers from frame to frame is perfect per frame, not per video."""
    from udpdiff.evaluation.depth import depth_scores

    gt = np.random.default_rng(1).uniform(0.1, 1.0, (4, 8, 8)).astype(np.float32)
    flicker = gt * np.array([1.0, 0.5, 2.0, 0.8], dtype=np.float32)[:, None, None] + 0.1
    per_frame = depth_scores(flicker, gt, per_frame=True)
    assert per_frame["delta1"] == pytest.approx(1.0) and per_frame["rmse"] == pytest.approx(0.0, abs=1e-5)
    per_video = depth_scores(flicker, gt)
    assert per_video["rmse"] > 0.05 and per_video["delta1"] < 1.0


def test_a_depth_read_backwards_scores_but_is_flagged():
    """The scale-and-shift fit may take a negative scale, so near and far swapped (linearly) still
    scores δ1 1 in both protocols; ``fit_reversed`` says so, per video or per frame."""
    from udpdiff.evaluation.depth import depth_scores

    gt = np.random.default_rng(2).uniform(0.1, 0.9, (4, 8, 8)).astype(np.float32)
    backwards = 1.0 - gt
    for per_frame in (False, True):
        right, wrong = depth_scores(gt, gt, per_frame=per_frame), depth_scores(backwards, gt, per_frame=per_frame)
        assert right["fit_reversed"] == 0.0 and wrong["fit_reversed"] == 1.0
        assert wrong["delta1"] == pytest.approx(1.0)  # what the flag is for: the score alone cannot tell
    half = np.concatenate([gt[:2], backwards[2:]])  # the last two frames backwards
    assert depth_scores(half, gt, per_frame=True)["fit_reversed"] == 0.5


def test_clips_longer_than_num_frames_are_scored_on_their_first_frames(tmp_path):
    """Curated clips may be longer than the profile's num_frames: generation, ground truth, the real row
    and the FVD reference all use the same first num_frames frames."""
    p = _params(tmp_path, _metric_models(tmp_path))
    paths = ProjectPaths(tmp_path, "tiny")
    _perfect_samples(paths, clip_frames=13)
    m = evaluate.run(p, paths).metrics
    assert m["depth/gt_delta1"] == pytest.approx(1.0) and m["segmentation/gt_miou"] == pytest.approx(1.0)
    assert m["depth/fvd"] == pytest.approx(0.0, abs=1e-3) and m["depth/fvd_num_frames"] == 9
    assert m["real/num_frames"] == 9


def test_annotator_options_reach_the_class_and_bad_ones_are_named(tmp_path, tiny_depth_anything_dir):
    from udpdiff.annotators import build_annotator
    from udpdiff.config import AnnotatorParams

    ref = AnnotatorParams(type="depth-anything-v2", path=str(tiny_depth_anything_dir), options={"batch_size": 2})
    assert build_annotator(ref, "cpu").batch_size == 2
    bad = AnnotatorParams(type="depth-anything-v2", path=str(tiny_depth_anything_dir), options={"points_per_side": 8})
    with pytest.raises(ValueError, match="points_per_side"):
        build_annotator(bad, "cpu")
    with pytest.raises(ValueError, match="dtype must be one of"):
        build_annotator(AnnotatorParams(type="sam2", path="x", options={"dtype": "fp8"}), "cpu")
