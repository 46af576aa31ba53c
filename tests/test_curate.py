"""Tests for udpdiff.data.curate (Panda-70M ingestion with rejects)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from udpdiff.data.curate import ingest_panda70m, motion_score_from_frames
from udpdiff.data.synthetic import render_clip
from udpdiff.data.validation import validate_manifest
from udpdiff.io.dense import load_depth, load_ids, save_depth, save_ids
from udpdiff.io.manifest import read_manifest, resolve
from udpdiff.io.video import read_video, write_video

H, W = 32, 48


def _make_clip(path: Path, seed: int, num_frames: int) -> None:
    clip = render_clip(seed, num_frames, H, W)
    write_video(path, clip.frames, fps=8)


@pytest.fixture
def panda(tmp_path: Path) -> tuple[Path, Path]:
    """3 good clips, 1 corrupt, 1 too short; per-clip CSV rows."""
    videos = tmp_path / "raw"
    videos.mkdir()
    for i in range(3):
        _make_clip(videos / f"good{i}.mp4", i, 12)
    _make_clip(videos / "short.mp4", 9, 4)
    data = (videos / "good0.mp4").read_bytes()
    (videos / "corrupt.mp4").write_bytes(data[: len(data) // 2])
    rows = [
        ("good0", "a red ball rolls", "A long, detailed description of a rolling red ball."),
        ("good1", "two shapes move", ""),
        ("good2", "a ring floats", ""),
        ("corrupt", "a broken clip", ""),
        ("short", "a short clip", ""),
    ]
    df = pd.DataFrame(
        {
            "videoID": [r[0] for r in rows],
            "url": [f"https://www.youtube.com/watch?v={r[0]}" for r in rows],
            "timestamp": ["['0:00:00.000', '0:00:01.500']"] * len(rows),
            "caption": [r[1] for r in rows],
            "matching_score": ["0.5"] * len(rows),
            "caption_long": [r[2] for r in rows],
        }
    )
    csv = tmp_path / "panda.csv"
    df.to_csv(csv, index=False)
    return csv, videos


def test_good_corrupt_and_short(panda: tuple[Path, Path], tmp_path: Path) -> None:
    csv, videos = panda
    manifest, rejects = ingest_panda70m(csv, videos, tmp_path / "out", min_frames=8)
    df = read_manifest(manifest)
    assert sorted(df["clip_id"]) == ["good0", "good1", "good2"]
    assert set(df["source"]) == {"panda70m"}
    assert (df["num_frames"] == 12).all() and (df["height"] == H).all() and (df["width"] == W).all()
    row = df.set_index("clip_id").loc["good0"]
    assert row["caption_short"] == "a red ball rolls"
    assert row["caption_long"].startswith("A long, detailed")
    assert df.set_index("clip_id").loc["good1", "caption_long"] == "two shapes move"  # fallback
    assert (df["seg_path"] == "").all() and (df["num_entities"] == 0).all()
    assert (df["motion_score"] > 0).all() and df["aesthetic_score"].between(0, 1).all()
    for rel in df["video_path"]:
        assert resolve(manifest, rel).is_file()

    rej = pd.read_csv(rejects)
    assert list(rej.columns) == ["clip_id", "path", "reason"]
    assert len(rej) == 2
    reasons = dict(zip(rej["clip_id"], rej["reason"], strict=True))
    assert reasons["corrupt"].startswith("unreadable") and "corrupt.mp4" in reasons["corrupt"]
    assert reasons["short"].startswith("too_short") and "4 frames" in reasons["short"]
    assert rej.set_index("clip_id").loc["short", "path"].endswith("short.mp4")

    # the curated manifest satisfies the contract when dense maps are not required yet
    result = validate_manifest(manifest, 8, (H, W), tmp_path / "r.json", require_dense=False)
    assert result.success, result.failures


def test_dense_maps_validated(panda: tuple[Path, Path], tmp_path: Path) -> None:
    csv, videos = panda
    seg, depth = tmp_path / "seg", tmp_path / "depth"
    ids = np.zeros((12, H, W), np.int32)
    ids[:, 4:10, 4:10] = 1
    ids[:, 20:30, 20:40] = 2
    for i in range(3):
        save_depth(depth / f"good{i}.npz", np.full((12, H, W), 0.5, np.float32))
    save_ids(seg / "good0.npz", ids)
    save_ids(seg / "good1.npz", ids[:10])  # wrong frame count
    save_ids(seg / "good2.npz", ids[:, :, :32])  # wrong width
    manifest, rejects = ingest_panda70m(
        csv, videos, tmp_path / "out", min_frames=8, seg_dir=seg, depth_dir=depth
    )
    df = read_manifest(manifest)
    assert df["clip_id"].tolist() == ["good0"]
    assert df.loc[0, "num_entities"] == 2
    assert np.array_equal(load_ids(resolve(manifest, df.loc[0, "seg_path"])), ids)
    reasons = dict(pd.read_csv(rejects)[["clip_id", "reason"]].itertuples(index=False))
    assert reasons["good1"].startswith("seg_mismatch") and "(10, 32, 48)" in reasons["good1"]
    assert reasons["good2"].startswith("seg_mismatch") and "(12, 32, 32)" in reasons["good2"]
    assert validate_manifest(manifest, 8, (H, W), tmp_path / "r.json").success


def test_per_source_video_rows_are_exploded(tmp_path: Path) -> None:
    videos = tmp_path / "raw"
    videos.mkdir()
    _make_clip(videos / "abc_00000.mp4", 1, 9)
    _make_clip(videos / "abc_00001.mp4", 2, 9)
    df = pd.DataFrame(
        {
            "videoID": ["abc"],
            "url": ["https://www.youtube.com/watch?v=abc"],
            "timestamp": [
                "[['0:00:00.000', '0:00:01.000'], ['0:00:02.000', '0:00:03.000'], "
                "['0:00:04.000', '0:00:05.000']]"
            ],
            "caption": ["['first clip', 'second clip', 'third clip']"],
            "matching_score": ["[0.5, 0.4, 0.45]"],
        }
    )
    df.to_csv(tmp_path / "p.csv", index=False)
    manifest, rejects = ingest_panda70m(
        tmp_path / "p.csv", videos, tmp_path / "out", min_frames=8, val_fraction=0.5
    )
    out = read_manifest(manifest)
    assert out["clip_id"].tolist() == ["abc_00000", "abc_00001"]
    assert out["caption_short"].tolist() == ["first clip", "second clip"]
    assert sorted(out["split"]) == ["train", "val"]
    rej = pd.read_csv(rejects)
    assert rej["clip_id"].tolist() == ["abc_00002"]
    assert rej["reason"][0].startswith("missing_video")


def test_motion_score_sees_motion() -> None:
    still = np.zeros((2, 32, 32, 3), np.uint8)
    still[:, 8:16, 8:16] = 255
    moving = still.copy()
    moving[1] = np.roll(still[1], 3, axis=1)
    assert motion_score_from_frames(still) == pytest.approx(0.0, abs=1e-3)
    assert motion_score_from_frames(moving) > motion_score_from_frames(still) + 0.1


def test_annotators_label_clips_without_maps(panda: tuple[Path, Path], tmp_path: Path) -> None:
    """Clips with a precomputed map keep it; the others are labelled by the annotators; an annotator
    whose output does not fit the clip rejects that clip, naming the problem."""
    csv, videos = panda
    seg = tmp_path / "seg"
    given = np.zeros((12, H, W), np.int32)
    given[:, :8, :8] = 7
    save_ids(seg / "good0.npz", given)
    seen: list[tuple[int, int, int]] = []

    def segment(video: np.ndarray) -> np.ndarray:
        seen.append(video.shape[:3])
        return (video[..., 0] > 127).astype(np.int32)  # "entities": bright red pixels

    def depth(video: np.ndarray) -> np.ndarray:
        return video.mean(-1, dtype=np.float32) / 255.0

    manifest, rejects = ingest_panda70m(csv, videos, tmp_path / "out", min_frames=8, seg_dir=seg,
                                        annotators={"seg": segment, "depth": depth})
    df = read_manifest(manifest).set_index("clip_id")
    assert sorted(df.index) == ["good0", "good1", "good2"]
    assert np.array_equal(load_ids(resolve(manifest, df.loc["good0", "seg_path"])), given)  # precomputed kept
    assert seen == [(12, H, W), (12, H, W)]  # the other two were annotated, whole clip at its size
    for clip in ("good1", "good2"):
        ids = load_ids(resolve(manifest, df.loc[clip, "seg_path"]))
        video = read_video(resolve(manifest, df.loc[clip, "video_path"]))
        assert np.array_equal(ids, (video[..., 0] > 127).astype(np.int32))
        assert load_depth(resolve(manifest, df.loc[clip, "depth_path"])).shape == (12, H, W)
    assert validate_manifest(manifest, 8, (H, W), tmp_path / "r.json").success

    bad = {"seg": lambda v: np.zeros(v.shape[:3], np.int32)[:, :-1], "depth": depth}
    _, rejects = ingest_panda70m(csv, videos, tmp_path / "out2", min_frames=8, annotators=bad)
    reasons = dict(pd.read_csv(rejects)[["clip_id", "reason"]].itertuples(index=False))
    assert reasons["good1"].startswith("seg_mismatch") and "annotator" in reasons["good1"]
    with pytest.raises(ValueError, match="unknown kinds"):
        ingest_panda70m(csv, videos, tmp_path / "out3", min_frames=8, annotators={"ids": segment})


def test_curate_stage_loads_annotators_only_when_a_clip_needs_one(panda: tuple[Path, Path], tmp_path: Path,
                                                                  tiny_depth_anything_dir: Path) -> None:
    """The curate stage with params naming real annotator classes (tiny Depth Anything V2 from a local
    folder), and a SAM2 path that does not exist: it is never loaded because every clip has ids."""
    import yaml

    from udpdiff.config import load_params
    from udpdiff.paths import ProjectPaths
    from udpdiff.stages.data import curate

    csv, videos = panda
    seg = tmp_path / "seg"
    for i in range(3):
        save_ids(seg / f"good{i}.npz", np.ones((12, H, W), np.int32))
    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    raw["profiles"]["tiny"]["data"].update(source="panda70m", num_frames=9, height=H, width=W, panda70m={
        "csv": str(csv), "video_dir": str(videos), "seg_dir": str(seg),
        "segmentation_annotator": {"type": "sam2", "path": str(tmp_path / "no-sam2-here")},
        "depth_annotator": {"type": "depth-anything-v2", "path": str(tiny_depth_anything_dir)}})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    p = load_params(tmp_path / "params.yaml")
    paths = ProjectPaths(tmp_path, "tiny")
    result = curate(p, paths)
    assert result.metrics["clips"] == 3
    df = read_manifest(paths.manifest)
    for row in df.itertuples():
        d = load_depth(resolve(paths.manifest, row.depth_path))
        assert d.shape == (12, H, W) and d.min() == 0.0 and d.max() == 1.0  # per-video normalised disparity
