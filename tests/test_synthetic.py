"""Tests for udpdiff.data.synthetic: determinism, exact ids/depth, captions, dataset writer."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from udpdiff.data import synthetic as syn
from udpdiff.io.dense import load_depth, load_ids
from udpdiff.io.manifest import MANIFEST_COLUMNS, assign_splits, read_manifest, resolve
from udpdiff.io.video import probe_video, read_video

SEEDS = range(12)
T, H, W = 9, 64, 64


@pytest.fixture(scope="module")
def clips() -> list[syn.SyntheticClip]:
    return [syn.render_clip(s, T, H, W) for s in SEEDS]


def test_shapes_and_dtypes(clips: list[syn.SyntheticClip]) -> None:
    for c in clips:
        assert c.frames.shape == (T, H, W, 3) and c.frames.dtype == np.uint8
        assert c.ids.shape == (T, H, W) and c.ids.dtype == np.int32
        assert c.depth.shape == (T, H, W) and c.depth.dtype == np.float32
        assert 0.0 <= c.depth.min() and c.depth.max() <= 1.0
        assert 2 <= c.num_entities <= 5
        assert set(np.unique(c.ids).tolist()) <= set(range(c.num_entities + 1))
        assert c.motion_score >= 0.0


def test_deterministic() -> None:
    a, b = syn.render_clip(7, T, H, W), syn.render_clip(7, T, H, W)
    assert np.array_equal(a.frames, b.frames)
    assert np.array_equal(a.ids, b.ids)
    assert np.array_equal(a.depth, b.depth)
    assert (a.caption_long, a.caption_short) == (b.caption_long, b.caption_short)
    c = syn.render_clip(8, T, H, W)
    assert not np.array_equal(a.frames, c.frames)
    assert not np.array_equal(a.ids, c.ids)


def test_varied(clips: list[syn.SyntheticClip]) -> None:
    assert len({c.caption_long for c in clips}) == len(clips)
    assert len({c.num_entities for c in clips}) >= 2
    shapes = {e.shape for c in clips for e in c.scene.entities}
    assert shapes == set(syn.SHAPES)
    assert any(c.scene.pan != (0.0, 0.0) for c in clips)
    assert len({c.scene.background.pattern for c in clips}) >= 2


def test_zbuffer_exact(clips: list[syn.SyntheticClip]) -> None:
    """ids and depth equal an independent z-buffer over the unoccluded entity layers."""
    total_overlaps = 0
    for c in clips:
        sc = c.scene
        for t in range(T):
            _, bg_disp = syn.background_layer(sc, t)
            layers = [syn.z_from_disparity(bg_disp)]
            masks = []
            for e in sc.entities:
                mask, z = syn.entity_layer(e, sc, t)
                layers.append(z)
                masks.append(mask)
            stack = np.stack(layers)
            expected_ids = np.argmin(stack, axis=0)  # ties -> lower id, like the renderer
            assert np.array_equal(c.ids[t], expected_ids), (c.clip_id, t)
            expected_depth = syn.disparity_from_z(stack.min(axis=0))
            np.testing.assert_allclose(c.depth[t], expected_depth, atol=1e-6)
            # occlusion: where two entities overlap, the farther one is never the visible one
            # (a third, even nearer entity may cover both)
            for i in range(len(masks)):
                for j in range(i + 1, len(masks)):
                    both = masks[i] & masks[j]
                    if both.any():
                        farther = np.where(layers[i + 1] <= layers[j + 1], j + 1, i + 1)
                        assert not np.any(c.ids[t][both] == farther[both])
                        total_overlaps += 1
    assert total_overlaps > 0  # the seeds do exercise occlusion


def test_depth_per_entity_and_background(clips: list[syn.SyntheticClip]) -> None:
    for c in clips:
        bg_max = 0.0
        for t in range(T):
            _, bg_disp = syn.background_layer(c.scene, t)
            bgm = c.ids[t] == 0
            np.testing.assert_allclose(c.depth[t][bgm], bg_disp[bgm], atol=1e-6)
            bg_max = max(bg_max, float(bg_disp.max()))
        for e in c.scene.entities:
            values = c.depth[c.ids == e.id]
            if values.size == 0:
                continue
            lo, hi = e.disparity_bounds(T)
            assert lo - 1e-5 <= values.min() and values.max() <= hi + 1e-5, (c.clip_id, e.id)
            if e.relief == 0.0 and e.vz == 0.0:  # flat, fixed depth: one value
                assert np.ptp(values) < 1e-6
            assert values.min() > bg_max  # entities always stand in front of the ground


def test_fixed_depth_scale_shared_across_clips(clips: list[syn.SyntheticClip]) -> None:
    # not normalised per clip: the sky is exactly 0 and nothing reaches 1 in these scenes
    for c in clips:
        assert c.depth.min() == 0.0
        assert c.depth.max() < 1.0
    assert syn.disparity_from_z(syn.Z_NEAR) == pytest.approx(1.0)
    assert syn.disparity_from_z(syn.Z_FAR) == pytest.approx(0.0)


def test_entity_depth_is_observable_from_its_image_size() -> None:
    """Every entity has about one metric size, so its rendered width says its depth (a monocular cue a
    model can learn): width x depth / focal is the same within the size jitter and a pixel."""
    focal = syn.FOCAL_FRAC * W
    widths, depths = [], []
    for seed in range(40):
        scene = syn.render_clip(seed, 1, H, W).scene
        for e in scene.entities:
            if e.shape not in ("sphere", "disc", "ring"):  # round: the width is the diameter
                continue
            mask, _ = syn.entity_layer(e, scene, 0)
            cols = np.flatnonzero(mask.any(axis=0))
            if cols.size == 0 or cols[0] == 0 or cols[-1] == W - 1:  # cut by the frame edge
                continue
            widths.append(cols[-1] - cols[0] + 1)
            depths.append(e.z_at(0))
    widths, depths = np.asarray(widths, float), np.asarray(depths)
    assert len(widths) > 30
    metric = widths * depths / focal / 2  # the radius the image implies
    slack = depths / focal  # a pixel of rounding at each edge
    assert np.all(metric >= syn.ENTITY_RADIUS * (1 - syn.ENTITY_SIZE_JITTER) - slack)
    assert np.all(metric <= syn.ENTITY_RADIUS * (1 + syn.ENTITY_SIZE_JITTER) + slack)
    assert np.corrcoef(np.log(widths), np.log(depths))[0, 1] < -0.95


def test_ground_disparity_follows_from_the_horizon(clips: list[syn.SyntheticClip]) -> None:
    """One camera height: the ground gains the same disparity per row in every clip, so where the
    horizon is says how far every ground pixel is."""
    slopes = []
    for c in clips:
        ground = (c.ids[0] == 0) & (c.depth[0] > 0)
        rows, cols = np.nonzero(ground)
        slopes.append(np.polyfit(rows, c.depth[0][rows, cols], 1)[0])
    np.testing.assert_allclose(slopes, syn.GROUND_DISPARITY_PER_HEIGHT / H, rtol=1e-4)


def test_ids_stable_over_time(clips: list[syn.SyntheticClip]) -> None:
    """An entity keeps its id: in every frame, pixels with id k lie inside entity k's own shape
    (rendered independently from its trajectory), and it stays visible in most frames."""
    for c in clips:
        for e in c.scene.entities:
            for t in range(T):
                m = c.ids[t] == e.id
                if m.sum() < 20:
                    continue
                full, _ = syn.entity_layer(e, c.scene, t)
                assert m[~full].sum() == 0  # id k only ever drawn inside entity k's own shape
            # visible in most frames (captions only mention visible entities)
            visible = [(c.ids[t] == e.id).sum() > 0 for t in range(T)]
            assert sum(visible) >= 0.6 * T


def test_colour_names_honest(clips: list[syn.SyntheticClip]) -> None:
    for c in clips:
        for e in c.scene.entities:
            assert syn.colour_name(e.colour) == e.colour_name
        names = [e.colour_name for e in c.scene.entities]
        assert len(set(names)) == len(names)


def test_captions_mention_entities(clips: list[syn.SyntheticClip]) -> None:
    for c in clips:
        for e in c.scene.entities:
            phrase = f"{e.colour_name} {e.shape}"
            assert phrase in c.caption_short
            assert e.colour_name in c.caption_long and e.shape in c.caption_long
        assert c.scene.background.ground_name in c.caption_long
        assert c.caption_long[0].isupper() and c.caption_long.endswith(".")
        if c.scene.pan[0] > 0:
            assert "pans right" in c.caption_long
        elif c.scene.pan[0] < 0:
            assert "pans left" in c.caption_long
        if c.scene.pan == (0.0, 0.0):
            assert "camera is static" in c.caption_long


def test_motion_direction_in_caption() -> None:
    found = 0
    for seed in range(40):
        c = syn.render_clip(seed, T, H, W)
        for e in c.scene.entities:
            if abs(e.vx) > 0.5 and abs(e.vy) < 0.1 * abs(e.vx):
                word = "right" if e.vx > 0 else "left"
                assert f"{syn._VERBS[e.shape]}" in c.caption_long
                assert word in c.caption_long
                found += 1
    assert found > 0


def test_dataset_writer(tmp_path: Path) -> None:
    start = time.perf_counter()
    manifest = syn.synthesize_dataset(tmp_path / "ds", 6, T, H, W, fps=8, seed=3, val_fraction=0.34)
    elapsed = time.perf_counter() - start
    assert elapsed < 10
    df = read_manifest(manifest)
    assert list(df.columns) == list(MANIFEST_COLUMNS)
    assert len(df) == 6 and df["clip_id"].is_unique
    assert set(df["source"]) == {"synthetic"}
    assert (df["split"] == "val").sum() == 2
    assert df["aesthetic_score"].between(0, 1).all() and (df["motion_score"] >= 0).all()
    for row in df.to_dict("records"):
        video = resolve(manifest, row["video_path"])
        assert probe_video(video).num_frames == T == row["num_frames"]
        frames = read_video(video)
        ids = load_ids(resolve(manifest, row["seg_path"]))
        depth = load_depth(resolve(manifest, row["depth_path"]))
        assert frames.shape == (T, H, W, 3) and ids.shape == depth.shape == (T, H, W)
        assert len(np.unique(ids[ids > 0])) == row["num_entities"]
        # the stored video matches the rendered clip closely: at 64x64 with saturated colour
        # edges, yuv420p chroma subsampling alone costs ~3 levels of mean abs error
        idx = int(row["clip_id"].rsplit("-", 1)[1])
        clip = syn.render_clip(syn.clip_seed(3, idx), T, H, W)
        assert np.array_equal(ids, clip.ids) and np.array_equal(depth, clip.depth)
        assert np.abs(frames.astype(int) - clip.frames).mean() < 6
    # deterministic split and content on a second run
    again = syn.synthesize_dataset(tmp_path / "ds2", 6, T, H, W, fps=8, seed=3, val_fraction=0.34)
    pd.testing.assert_frame_equal(read_manifest(again), df)


def test_a_grown_set_keeps_its_first_clips_and_names_the_training_clips_it_holds_out(tmp_path: Path) -> None:
    """Clip i is the same clip at any num_clips (what lets a VAE trained on fewer clips serve a larger
    set: small_gpu.py restore-vae --vae-from-fewer-clips), and train_clips_held_out_when_grown names
    exactly the clips whose split the writer moves from train to val as the set grows."""
    small = read_manifest(syn.synthesize_dataset(tmp_path / "a", 5, T, H, W, fps=8, seed=1234, val_fraction=0.25))
    grown = read_manifest(syn.synthesize_dataset(tmp_path / "b", 6, T, H, W, fps=8, seed=1234, val_fraction=0.25))
    assert list(grown["clip_id"][:5]) == list(small["clip_id"])
    for row in small.to_dict("records"):
        assert np.array_equal(load_ids(tmp_path / "a" / row["seg_path"]), load_ids(tmp_path / "b" / row["seg_path"]))
    moved = [c for c, before, after in zip(small["clip_id"], small["split"], grown["split"][:5], strict=True)
             if before == "train" and after == "val"]
    assert moved and syn.train_clips_held_out_when_grown(1234, 5, 6, 0.25) == moved  # 5 -> 6 clips moves one
    assert syn.train_clips_held_out_when_grown(1234, 5, 5, 0.25) == []
    # small's 2,000 clips grown to 3,000: no training clip is held out, and the 16 clips its evaluation
    # predicts (the first of the val split) stay the same
    assert syn.train_clips_held_out_when_grown(1234, 2000, 3000, 0.05) == []
    ids = [syn.synthetic_clip_id(1234, i) for i in range(3000)]
    held_out = [[c for c, s in zip(ids[:n], assign_splits(ids[:n], 0.05, 1234), strict=True) if s == "val"][:16]
                for n in (2000, 3000)]
    assert held_out[0] == held_out[1] and len(held_out[0]) == 16
