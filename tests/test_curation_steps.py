"""Tests for the Panda-Dense curation steps: udpdiff.data.cut, udpdiff.data.filters and their params.

Every video here is really encoded (H.264 through udpdiff.io.video.write_video) and decoded again.
"""

from __future__ import annotations

from pathlib import Path

import av
import cv2
import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from udpdiff.data.curation_params import (
    CurationParams,
    FilterParams,
    MotionFilterParams,
    QualityWeights,
    SceneCutParams,
    SourceFilterParams,
)
from udpdiff.data.cut import (
    ClipCutter,
    ClipRejected,
    ClipSpec,
    centre_crop_box,
    parse_timestamp,
    read_panda_csv,
    select_clips,
)
from udpdiff.data.filters import (
    ClassicalQualityScorer,
    ContentCutDetector,
    HistogramCutDetector,
    MotionFilter,
    QualityScorer,
    SceneCutFilter,
    SourceFilter,
    build_filters,
    curate_clips,
)
from udpdiff.io.video import probe_video, read_video, write_video

SRC_FPS = 24


def _index_video(path: Path, n: int = 60, h: int = 48, w: int = 64) -> None:
    """Frame i is flat grey at level 4*i: a decoded frame tells which source frame it was. A keyframe
    every 5 frames and B-frames, as downloaded videos have, so cutting really seeks."""
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=SRC_FPS, options={"qp": "10", "g": "5", "bf": "2"})
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(np.full((h, w, 3), 4 * i, np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def _clip_of(cutter: ClipCutter, path: Path, start: float, end: float, cid: str = "v_00000"):
    spec = ClipSpec(cid, path.stem, start, end, "a caption")
    return cutter.cut(cutter.plan(spec, path))


# --------------------------------------------------------------------------------------------
# CSV and subset
# --------------------------------------------------------------------------------------------


def test_timestamps_parse() -> None:
    assert parse_timestamp("0:00:05.500") == 5.5
    assert parse_timestamp("1:02:03.250") == 3723.25
    assert parse_timestamp("02:03") == 123.0
    assert parse_timestamp("7.25") == 7.25
    with pytest.raises(ValueError, match="not H:MM:SS"):
        parse_timestamp("five seconds")


def test_csv_rows_explode_bad_rows_are_rejects_and_the_subset_is_seeded(tmp_path: Path) -> None:
    rows = [
        {"videoID": f"vid{i}", "url": f"https://youtu.be/vid{i}",
         "timestamp": str([["0:00:00.000", "0:00:05.000"], ["0:00:06.000", "0:00:09.500"]]),
         "caption": str([f"clip a of {i}", f"clip b of {i}"]), "caption_long": ""}
        for i in range(15)
    ]
    rows.append({"videoID": "bad", "url": "", "timestamp": "[['0:00:03', '0:00:01']]", "caption": "['x']",
                 "caption_long": ""})
    rows.append({"videoID": "mism", "url": "", "timestamp": "[['0:00:00', '0:00:01'], ['0:00:01', '0:00:02']]",
                 "caption": "['only one']", "caption_long": ""})
    rows.append({"videoID": "music", "url": "", "timestamp": "[['0:00:00', '0:00:04']]",
                 "caption": "[Music] a man sings", "caption_long": ""})
    csv = tmp_path / "panda.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    specs, rejects = read_panda_csv(csv)
    assert specs.pop().caption == "[Music] a man sings"
    assert len(specs) == 30
    s = next(x for x in specs if x.clip_id == "vid3_00001")
    assert (s.start_s, s.end_s, s.caption, s.caption_long, s.video_id) == (6.0, 9.5, "clip b of 3", "", "vid3")
    reasons = {r["clip_id"]: r["reason"] for r in rejects}
    assert set(reasons) == {"bad", "mism"}
    assert reasons["bad"].startswith("bad_row: line 17 of") and "panda.csv" in reasons["bad"]
    assert "before it starts" in reasons["bad"]
    assert "caption has 1 entries but timestamp has 2" in reasons["mism"]

    a = select_clips(specs, 8, seed=1)
    assert len(a) == 8 and a == select_clips(specs, 8, seed=1)
    assert select_clips(specs[::-1], 8, seed=1) == a  # independent of the CSV's row order
    assert select_clips(specs, 12, seed=1)[:8] == a  # a larger subset extends a smaller one
    assert {x.clip_id for x in select_clips(specs, 8, seed=2)} != {x.clip_id for x in a}
    with pytest.raises(ValueError, match="more than once"):
        select_clips(specs + specs[:1], 3, seed=0)
    with pytest.raises(ValueError, match="missing required columns"):
        pd.DataFrame({"videoID": ["x"]}).to_csv(tmp_path / "bad.csv", index=False)
        read_panda_csv(tmp_path / "bad.csv")


# --------------------------------------------------------------------------------------------
# cut and normalise
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("window, first", [("start", 12), ("center", 18)])
def test_cut_takes_exact_frames_at_the_target_rate(tmp_path: Path, window: str, first: int) -> None:
    src = tmp_path / "idx.mp4"
    _index_video(src)  # 60 frames at 24 fps = 2.5 s
    cutter = ClipCutter(num_frames=9, fps=8, height=32, width=32, window=window)
    clip = _clip_of(cutter, src, 0.5, 2.0)  # source frames 12..47
    assert clip.frames.shape == (9, 32, 32, 3) and clip.frames.dtype == np.uint8
    expected = first + 3 * np.arange(9)  # 24 fps -> 8 fps: every third frame
    got = np.round(clip.frames.reshape(9, -1).mean(axis=1) / 4).astype(int)
    assert got.tolist() == expected.tolist()
    assert np.allclose(clip.frame_times, expected / SRC_FPS, atol=1e-3)
    assert clip.quality_frames.shape == (4, 48, 64, 3)  # source resolution, uncropped

    out = cutter.write(clip, tmp_path / "clip.mp4")
    info = probe_video(out)
    assert (info.num_frames, info.height, info.width, info.fps) == (9, 32, 32, 8.0)
    again = tmp_path / "again.mp4"
    cutter.write(_clip_of(cutter, src, 0.5, 2.0), again)
    assert again.read_bytes() == out.read_bytes()  # deterministic bytes


def test_resize_and_centre_crop_geometry(tmp_path: Path) -> None:
    assert centre_crop_box((720, 1280), (480, 720)) == (0, 100, 720, 1080)
    assert centre_crop_box((480, 480), (32, 48)) == (80, 0, 320, 480)
    src = tmp_path / "wide.mp4"
    frames = np.zeros((12, 48, 96, 3), np.uint8)
    frames[:, :, :24] = 255  # white left quarter: cropped away by a centre square crop
    write_video(src, frames, fps=SRC_FPS)
    clip = _clip_of(ClipCutter(num_frames=3, fps=12, height=16, width=16, window="start"), src, 0.0, 0.5)
    assert clip.frames.shape == (3, 16, 16, 3) and clip.frames.max() < 10
    assert clip.plan.crop == (0, 24, 48, 48) and clip.plan.scale == pytest.approx(1 / 3)


def test_short_and_out_of_range_clips_are_rejected_with_the_file(tmp_path: Path) -> None:
    src = tmp_path / "idx.mp4"
    _index_video(src)
    cutter = ClipCutter(num_frames=9, fps=8, height=32, width=32)
    with pytest.raises(ClipRejected, match=r"too_short: .*idx\.mp4.*lasts 0\.500 s but 9 frames at 8 fps") as e:
        _clip_of(cutter, src, 0.5, 1.0)
    assert e.value.code == "too_short"
    with pytest.raises(ClipRejected, match=r"too_short: .*idx\.mp4: the last frame decoded is at 2\.458 s"):
        _clip_of(cutter, src, 1.5, 4.0)  # the timestamp runs past the end of the file
    with pytest.raises(ClipRejected, match="missing_source: no source video for nope"):
        cutter.locate(ClipSpec("nope_00000", "nope", 0, 1, "c"), tmp_path)


def test_corrupt_sources_do_not_stop_the_run_and_drops_are_counted(tmp_path: Path, panning_video) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    write_video(raw / "good.mp4", panning_video(0, 36, 64, 96), fps=SRC_FPS)
    data = (raw / "good.mp4").read_bytes()
    (raw / "trunc.mp4").write_bytes(data[: len(data) // 2])
    (raw / "junk.mp4").write_bytes(b"not a video at all" * 100)
    specs = [ClipSpec(f"{v}_00000", v, 0.0, 1.5, f"caption {v}") for v in ("good", "trunc", "junk", "gone")]
    specs.append(ClipSpec("good_00001", "good", 0.0, 0.4, "too short"))
    cutter = ClipCutter(num_frames=9, fps=8, height=32, width=48)
    filters = build_filters(FilterParams(quality=None))
    result = curate_clips(specs, raw, tmp_path / "out", cutter, filters)
    assert [r["clip_id"] for r in result.records] == ["good_00000"]
    rec = result.records[0]
    assert {"motion", "scene_cut_score", "scene_cuts", "duration_s", "resize_scale"} <= set(rec)
    assert read_video(tmp_path / "out" / rec["video_path"]).shape == (9, 32, 48, 3)
    reasons = {r["clip_id"]: r["reason"] for r in result.rejects}
    assert reasons["trunc_00000"].startswith("unreadable") and "trunc.mp4" in reasons["trunc_00000"]
    assert reasons["junk_00000"].startswith("unreadable") and "junk.mp4" in reasons["junk_00000"]
    assert reasons["gone_00000"].startswith("missing_source") and "gone" in reasons["gone_00000"]
    assert reasons["good_00001"].startswith("too_short")
    assert result.drops == {"unreadable": 2, "missing_source": 1, "too_short": 1}


# --------------------------------------------------------------------------------------------
# filters
# --------------------------------------------------------------------------------------------


def test_classical_quality_ranks_a_degraded_copy_below_the_original(tmp_path: Path, panning_video) -> None:
    orig = tmp_path / "orig.mp4"
    write_video(orig, panning_video(3, 24, 144, 192), fps=SRC_FPS)
    decoded = read_video(orig)
    blurred = np.stack([cv2.GaussianBlur(f, (0, 0), 2.0) for f in decoded])
    bad = tmp_path / "bad.mp4"
    write_video(bad, blurred, fps=SRC_FPS, qp=48)  # blurred and heavily quantised: blocky
    cutter = ClipCutter(num_frames=5, fps=8, height=64, width=64)
    scorer = ClassicalQualityScorer()
    good_d = scorer.details(_clip_of(cutter, orig, 0.0, 1.0).quality_frames)
    bad_d = scorer.details(_clip_of(cutter, bad, 0.0, 1.0).quality_frames)
    assert 0 <= bad_d["quality"] < good_d["quality"] <= 1
    assert bad_d["quality_sharpness"] < good_d["quality_sharpness"]
    assert bad_d["quality_block_ratio"] > good_d["quality_block_ratio"]
    # each component moves the right way on a synthetic defect
    frame = decoded[0]
    noisy = np.clip(frame + np.random.default_rng(0).normal(0, 12, frame.shape), 0, 255).astype(np.uint8)
    assert scorer.details(noisy)["quality_noise"] < scorer.details(frame)["quality_noise"]
    blown = np.clip(frame.astype(np.int32) * 3, 0, 255).astype(np.uint8)
    assert scorer.details(blown)["quality_exposure"] < scorer.details(frame)["quality_exposure"]
    assert scorer.score(np.zeros((2, 64, 64, 3), np.uint8)) < 0.1  # black


def test_quality_scorer_is_an_interface() -> None:
    class Constant(QualityScorer):
        name = "constant"

        def score(self, frames: np.ndarray) -> float:
            return 0.25

    assert Constant().details(np.zeros((1, 8, 8, 3), np.uint8)) == {"quality": 0.25}
    with pytest.raises(TypeError):
        QualityScorer()  # type: ignore[abstract]


def test_motion_filter_drops_a_frozen_clip_and_keeps_a_moving_one(tmp_path: Path, panning_video) -> None:
    moving = panning_video(1, 36, 64, 96, dx=2)
    write_video(tmp_path / "moving.mp4", moving, fps=SRC_FPS)
    write_video(tmp_path / "frozen.mp4", np.repeat(moving[:1], 36, axis=0), fps=SRC_FPS)
    write_video(tmp_path / "wild.mp4", panning_video(2, 36, 64, 96, dx=6), fps=SRC_FPS)
    cutter = ClipCutter(num_frames=9, fps=8, height=64, width=96)
    filt = MotionFilter.from_params(MotionFilterParams())
    res = {name: filt.evaluate(_clip_of(cutter, tmp_path / f"{name}.mp4", 0.0, 1.5))
           for name in ("moving", "frozen", "wild")}
    assert res["moving"].passed, res["moving"].reason
    # 3 source frames per output frame x 2 px = 6 px per frame over a 115 px diagonal
    assert res["moving"].scores["motion"] == pytest.approx(6 / np.hypot(64, 96), rel=0.25)
    assert res["frozen"].code == "static" and res["frozen"].scores["motion"] < 1e-4
    assert res["wild"].code == "extreme_motion"


@pytest.mark.parametrize("detector", [ContentCutDetector, HistogramCutDetector])
def test_a_scene_cut_is_detected(tmp_path: Path, detector, panning_video) -> None:
    a = panning_video(4, 18, 64, 96, tint=(1.0, 0.8, 0.6))
    b = panning_video(5, 18, 64, 96, tint=(0.3, 0.6, 1.0))
    write_video(tmp_path / "cut.mp4", np.concatenate([a, b]), fps=SRC_FPS)
    write_video(tmp_path / "one.mp4", panning_video(4, 36, 64, 96), fps=SRC_FPS)
    cutter = ClipCutter(num_frames=9, fps=8, height=64, width=96, window="start")
    filt = SceneCutFilter(detector())
    cut = filt.evaluate(_clip_of(cutter, tmp_path / "cut.mp4", 0.0, 1.5))
    assert cut.code == "scene_cut" and cut.scores["scene_cuts"] == 1
    assert "frame 6" in cut.reason  # source frame 18 is output frame 6 (every third frame)
    one = filt.evaluate(_clip_of(cutter, tmp_path / "one.mp4", 0.0, 1.5))
    assert one.passed and one.scores["scene_cut_score"] < filt.detector.threshold


def test_source_filter_duration_and_resolution(tmp_path: Path) -> None:
    src = tmp_path / "idx.mp4"
    _index_video(src)  # 48x64
    spec = ClipSpec("idx_00000", "idx", 0.0, 2.0, "c")
    filt = SourceFilter.from_params(SourceFilterParams(max_duration_s=1.5))
    assert filt.evaluate(ClipCutter(9, 8, 32, 32).plan(spec, src)).code == "duration"
    big = ClipCutter(9, 8, 64, 96).plan(spec, src)  # would enlarge the 48 px tall source 1.5x
    assert SourceFilter(max_upscale=1.0).evaluate(big).code == "resolution"
    assert SourceFilter(max_upscale=1.5).evaluate(big).passed


# --------------------------------------------------------------------------------------------
# params
# --------------------------------------------------------------------------------------------


def test_params_are_strict_with_clear_messages() -> None:
    p = CurationParams.model_validate({"cut": {"seed": 3, "window": "start"},
                                       "filters": {"scene_cut": {"detector": "histogram"}, "quality": None}})
    assert p.cut.seed == 3 and p.filters.quality is None
    assert [f.name for f in build_filters(p.filters)] == ["source", "scene_cut", "motion"]
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        CurationParams.model_validate({"cut": {"sed": 3}})
    with pytest.raises(ValidationError, match=r"max_motion \(0.001\) must be greater than min_motion \(0.01\)"):
        MotionFilterParams(min_motion=0.01, max_motion=0.001)
    with pytest.raises(ValidationError, match="out of range for the histogram detector"):
        SceneCutParams(detector="histogram", threshold=27)
    with pytest.raises(ValidationError, match="all 0"):
        QualityWeights(sharpness=0, blockiness=0, noise=0, exposure=0)
    with pytest.raises(ValidationError, match="max_duration_s"):
        SourceFilterParams(min_duration_s=5, max_duration_s=2)
    with pytest.raises(ValidationError, match="video_extensions must look like"):
        CurationParams.model_validate({"cut": {"video_extensions": ["mp4"]}})
    with pytest.raises(ValidationError):
        p.cut.seed = 4  # frozen
