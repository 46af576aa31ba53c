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
