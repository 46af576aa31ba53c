"""The sample stage: which guidance each of its pipeline calls gets."""

from __future__ import annotations

from udpdiff.pipeline import UDPDiffPipeline
from udpdiff.stages import sample


def test_text_to_video_keeps_guidance_scale_and_real_clips_get_dense_guidance_scale(inference_project, monkeypatch):
    p, paths = inference_project
    p = p.with_overrides({"sample.guidance_scale": 3.0, "sample.dense_guidance_scale": 1.0, "sample.num_samples": 1})
    calls: list[tuple[bool, float]] = []
    original = UDPDiffPipeline.__call__

    def recording(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        calls.append((kwargs.get("video") is not None, kwargs["guidance_scale"]))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(UDPDiffPipeline, "__call__", recording)
    sample.run(p, paths)
    # one text-to-video sample and one dense prediction of its real clip, per task
    assert sorted(calls) == [(False, 3.0), (False, 3.0), (True, 1.0), (True, 1.0)]


def test_dense_ensemble_keeps_its_first_member_and_the_evaluation_scores_both(inference_project):
    """sample.dense_ensemble_size: each real clip's dense map from N seeds, the first the sample's own (what
    one sample gives: the prediction of a run without ensemble), fused. The evaluation scores the ensemble
    and its first member, and both tasks' tables show both."""
    import json

    import numpy as np

    from udpdiff.evaluation.segmentation import hungarian_miou
    from udpdiff.stages import evaluate

    p, paths = inference_project
    p = p.with_overrides({"sample.num_samples": 2})
    sample.run(p, paths)
    single = {f"{f.parent.name}/{f.stem}": np.load(f)["conditioned_dense"] for f in paths.samples.glob("*/*.npz")}
    single_colormaps = {f"{f.parent.name}/{f.stem}": np.load(f)["conditioned_colormap"]
                        for f in paths.samples.glob("*/*.npz")}
    ensembled = p.with_overrides({"sample.dense_ensemble_size": 3})
    sample.run(ensembled, paths)
    for f in (paths.samples / "depth").glob("*.npz"):
        with np.load(f) as z:
            assert np.abs(z["conditioned_dense_single"] - single[f"depth/{f.stem}"]).mean() < 0.01
            assert z["conditioned_uncertainty"].shape == z["conditioned_dense"].shape
            assert np.abs(z["conditioned_dense"] - single[f"depth/{f.stem}"]).mean() > 0.01  # fused from 3 seeds
    for f in (paths.samples / "segmentation").glob("*.npz"):
        with np.load(f) as z:  # entity ids: the first member names its entities as the single run does
            assert hungarian_miou(z["conditioned_dense_single"], single[f"segmentation/{f.stem}"])["miou"] > 0.95
            # and the colormap the model made for it, which the decode-tolerance sweep reads
            assert np.abs(z["conditioned_colormap_single"].astype(int)
                          - single_colormaps[f"segmentation/{f.stem}"]).mean() < 1
            assert 0 <= z["conditioned_uncertainty"].min() and z["conditioned_uncertainty"].max() <= 1
    evaluate.run(ensembled, paths)
    metrics = json.loads((paths.evaluation / "metrics.json").read_text())["metrics"]
    depth, seg = metrics["depth"], metrics["segmentation"]
    assert {"gt_delta1_single", "gt_delta1_depth_single", "ensemble_uncertainty"} <= set(depth)
    assert depth["gt_delta1_single"] != depth["gt_delta1"]
    assert {"gt_miou_single", "gt_temporal_id_consistency_single", "ensemble_uncertainty"} <= set(seg)
    tables = (paths.evaluation / "tables.md").read_text()
    assert all(f"UDPDiff ({t}), {row}" in tables for t in ("depth", "seg") for row in ("ensemble", "one sample"))
