"""The data stage on Panda-70M *source videos* (``data.panda70m.curation``): CSV with timestamps ->
cut -> filters -> labels -> manifest + rejects, resumable. Every video is really encoded here."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pandas as pd
import pytest
import yaml

from udpdiff.data.cut import ClipCutter
from udpdiff.data.validation import validate_manifest
from udpdiff.io.dense import load_depth, load_ids, save_ids
from udpdiff.io.manifest import ManifestError, read_manifest, resolve, write_manifest
from udpdiff.io.video import probe_video, read_video

REPO = Path(__file__).resolve().parents[1]
SRC_FPS, SRC_H, SRC_W = 24, 64, 96
T, H, W, FPS = 9, 32, 48, 8  # 9 frames at 8 fps: a 1 s window


def _encode(path: Path, frames: np.ndarray, fps: int = SRC_FPS) -> None:
    """A source video as a download would be: H.264 with keyframes every 12 frames and B-frames."""
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps, options={"qp": "12", "g": "12", "bf": "2"})
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


@pytest.fixture
def sources(tmp_path: Path, panning_video) -> tuple[Path, Path]:
    """3 source videos + a CSV: ``pan`` (two 1.5 s clips, slow pan), ``frozen`` (one clip, a still
    frame), ``broken`` (a truncated file) and ``ghost`` (listed, never downloaded)."""
    src = tmp_path / "sources"
    src.mkdir()
    n = 3 * SRC_FPS
    _encode(src / "pan.mp4", panning_video(0, n, SRC_H, SRC_W, dx=1))
    still = panning_video(1, 1, SRC_H, SRC_W, tint=(0.6, 0.9, 1.0))
    _encode(src / "frozen.mp4", np.repeat(still, n, axis=0))
    _encode(src / "broken.mp4", panning_video(2, n, SRC_H, SRC_W))
    data = (src / "broken.mp4").read_bytes()
    (src / "broken.mp4").write_bytes(data[: len(data) // 3])
    rows = [
        ("pan", "[['0:00:00.000', '0:00:01.500'], ['0:00:01.500', '0:00:03.000']]",
         "['a textured wall pans', 'the wall keeps panning']"),
        ("frozen", "[['0:00:00.000', '0:00:02.000']]", "['a still picture']"),
        ("broken", "[['0:00:00.000', '0:00:02.000']]", "['a broken download']"),
        ("ghost", "[['0:00:00.000', '0:00:02.000']]", "['never downloaded']"),
    ]
    pd.DataFrame({"videoID": [r[0] for r in rows], "url": [f"https://youtu.be/{r[0]}" for r in rows],
                  "timestamp": [r[1] for r in rows], "caption": [r[2] for r in rows]}).to_csv(
        tmp_path / "panda.csv", index=False)
    return tmp_path / "panda.csv", src


def _params(tmp_path: Path, csv: Path, src: Path, **panda70m: object):
    from udpdiff.config import load_params

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["profiles"]["tiny"]["data"].update(source="panda70m", num_clips=10, num_frames=T, height=H, width=W, fps=FPS,
                                           val_fraction=0.0, panda70m={
        "curation": {"csv": str(csv), "source_dir": str(src), "cut_dir": "cut",  # relative: under the root
                     "filters": {"quality": {"min_score": 0.05}}},
        **panda70m})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    return load_params(tmp_path / "params.yaml")


def test_curate_sources_end_to_end_and_resume(sources, tmp_path: Path, monkeypatch, tiny_depth_anything_dir) -> None:
    from udpdiff.paths import ProjectPaths
    from udpdiff.stages.data import run

    csv, src = sources
    root = tmp_path / "proj"
    seg = tmp_path / "seg"  # precomputed entity maps for the clips; depth comes from a tiny DA-v2
    given = np.zeros((T, H, W), np.int32)
    given[:, 4:20, 8:30] = 3
    for cid in ("pan_00000", "pan_00001"):
        save_ids(seg / f"{cid}.npz", given)
    p = _params(tmp_path, csv, src, seg_dir=str(seg),
                depth_annotator={"type": "depth-anything-v2", "path": str(tiny_depth_anything_dir)})
    paths = ProjectPaths(root, "tiny")

    cuts: list[str] = []
    real_cut = ClipCutter.cut

    def counting_cut(self, plan):
        cuts.append(plan.spec.clip_id)
        return real_cut(self, plan)

    monkeypatch.setattr(ClipCutter, "cut", counting_cut)
    result = run(p, paths)
    m = result.metrics
    assert sorted(cuts) == ["frozen_00000", "pan_00000", "pan_00001"]  # broken fails at the header
    assert m["clips_in"] == 5 and m["clips"] == 2
    assert m["dropped_static"] == 1 and m["dropped_unreadable"] == 1 and m["dropped_missing_source"] == 1
    assert m["failed"] == 2 and m["annotated"] == 2 and m["cut"] == 3 and m["resumed"] == 0

    df = read_manifest(paths.manifest).set_index("clip_id")
    assert sorted(df.index) == ["pan_00000", "pan_00001"]
    assert (df[["num_frames", "height", "width"]] == [T, H, W]).all().all() and (df["fps"] == FPS).all()
    assert df.loc["pan_00001", "caption_short"] == "the wall keeps panning"
    for _, row in df.iterrows():
        video = read_video(resolve(paths.manifest, row["video_path"]))
        assert video.shape == (T, H, W, 3)
        assert np.array_equal(load_ids(resolve(paths.manifest, row["seg_path"])), given)
        assert load_depth(resolve(paths.manifest, row["depth_path"])).shape == (T, H, W)
        assert row["curation_video_id"] == "pan" and row["curation_motion"] > 0.001
        assert 0.05 <= row["curation_quality"] <= 1 and row["curation_scene_cuts"] == 0
        assert row["curation_window_end_s"] - row["curation_window_start_s"] == pytest.approx((T - 1) / FPS)
    assert {"curation_quality_sharpness", "curation_resize_scale", "curation_start_s"} <= set(df.columns)

    rej = pd.read_csv(paths.clips / "rejects.csv").set_index("clip_id")
    assert list(rej.columns[:2]) == ["path", "reason"]
    assert rej.loc["frozen_00000", "reason"].startswith("static: motion")
    assert rej.loc["frozen_00000", "motion"] < 0.001  # its scores are kept for threshold tuning
    broken, ghost = rej.loc["broken_00000", "reason"], rej.loc["ghost_00000", "reason"]
    assert broken.startswith("unreadable") and "broken.mp4" in broken
    assert ghost.startswith("missing_source") and "ghost" in ghost

    contract = validate_manifest(paths.manifest, T, (H, W), tmp_path / "report.json", require_dense=True)
    assert contract.success, contract.failures

    # a second run re-cuts nothing: every decided clip comes from its state file, videos untouched
    cut_videos = sorted((root / "cut" / "videos").glob("*.mp4"))
    assert [v.name for v in cut_videos] == ["pan_00000.mp4", "pan_00001.mp4"]
    mtimes = [v.stat().st_mtime_ns for v in cut_videos]
    first_manifest = read_manifest(paths.manifest)
    cuts.clear()
    again = run(p, paths).metrics
    assert cuts == [] and again["cut"] == 0 and again["resumed"] == 4  # ghost alone is tried again (no state)
    assert [v.stat().st_mtime_ns for v in cut_videos] == mtimes
    assert again["dropped_static"] == 1 and again["clips"] == 2
    pd.testing.assert_frame_equal(read_manifest(paths.manifest), first_manifest)

    # other filter thresholds: a different key, so the clips are decided (and cut) again
    p2 = _params(tmp_path, csv, src, seg_dir=str(seg),
                 depth_annotator={"type": "depth-anything-v2", "path": str(tiny_depth_anything_dir)})
    p2 = p2.with_overrides({"data.panda70m.curation": {**p2.active.data.panda70m.curation.model_dump(),
                                                        "filters": {"motion": None, "quality": None}}})
    assert run(p2, paths).metrics["cut"] == 3


def test_sam2_ids_are_post_processed(sources, tmp_path: Path, monkeypatch) -> None:
    """The segmentation annotator's ids go through udpdiff.data.postprocess when
    curation.seg_postprocess is set (the default), and are stored as they come when it is null."""
    import udpdiff.stages.data as data_stage
    from udpdiff.paths import ProjectPaths

    csv, src = sources

    def segment(video: np.ndarray) -> np.ndarray:  # stands in for SAM2: an entity with a hole, a speck
        ids = np.zeros(video.shape[:3], np.int32)
        ids[:, :, : W // 2], ids[:, :, W // 2 :] = 1, 2
        ids[:, 10:12, 10:12] = 0  # a 4 px hole in entity 1
        ids[:, 25, 40] = 5  # a 1 px speck inside entity 2
        return ids

    monkeypatch.setattr(data_stage, "_annotators", lambda src: {"seg": segment})
    p = _params(tmp_path, csv, src)
    cur = p.active.data.panda70m.curation.model_dump()
    post_params = {**cur["seg_postprocess"], "max_hole_fraction": 0.01, "min_region_fraction": 0.002}  # 15 / 3 px
    for post, root in ((post_params, tmp_path / "a"), (None, tmp_path / "b")):
        q = p.with_overrides({"data.panda70m.curation": {**cur, "seg_postprocess": post}})
        paths = ProjectPaths(root, "tiny")
        assert data_stage.run(q, paths).metrics["annotated"] == 2
        df = read_manifest(paths.manifest)
        ids = load_ids(resolve(paths.manifest, df["seg_path"][0]))
        if post is not None:
            assert (ids[:, 10:12, 10:12] == 1).all() and (ids[:, 25, 40] == 2).all()
            assert (df["num_entities"] == 2).all()
        else:
            assert (ids[:, 10:12, 10:12] == 0).all() and (df["num_entities"] == 3).all()


def test_long_captions_come_from_video_llava(sources, tmp_path: Path, monkeypatch, tiny_video_llava_dir) -> None:
    """curation.recaption: the kept clips get a Video-LLaVA caption_long (tiny random model from a
    folder), cached across runs; the stage logs caption lengths (paper Fig 7)."""
    import udpdiff.stages.data as data_stage
    from udpdiff.paths import ProjectPaths

    csv, src = sources
    model = tiny_video_llava_dir
    p = _params(tmp_path, csv, src)
    cur = p.active.data.panda70m.curation.model_dump()
    p = p.with_overrides({"data.panda70m.curation": {**cur, "recaption": {
        "path": str(model), "num_frames": 4, "max_new_tokens": 10, "dtype": "float32"}}})
    monkeypatch.setattr(data_stage, "_annotators", lambda src: {})
    paths = ProjectPaths(tmp_path / "proj", "tiny")
    m = data_stage.run(p, paths).metrics
    assert m["recaptioned"] == 2 and m["captions_cached"] == 0 and m["clips"] == 2
    assert m["caption_short_words_mean"] == pytest.approx(4.0)  # "a textured wall pans", "the wall keeps panning"
    assert {"caption_long_words_mean", "caption_long_words_p90", "caption_short_words_max"} <= set(m)
    df = read_manifest(paths.manifest)
    assert (df["curation_caption_long_source"] == "video-llava").all()
    assert (df["caption_long"] != df["caption_short"]).all() and (df["caption_long"].str.len() > 0).all()
    assert validate_manifest(paths.manifest, T, (H, W), tmp_path / "r.json", require_dense=False).success
    again = data_stage.run(p, paths).metrics
    assert again["recaptioned"] == 0 and again["captions_cached"] == 2
    assert read_manifest(paths.manifest)["caption_long"].tolist() == df["caption_long"].tolist()


def test_missing_annotator_weights_stop_the_stage_and_a_failing_clip_does_not(sources, tmp_path: Path,
                                                                              monkeypatch) -> None:
    import udpdiff.stages.data as data_stage
    from udpdiff.evaluation.consistency import MetricModelUnavailable
    from udpdiff.paths import ProjectPaths

    csv, src = sources
    p = _params(tmp_path, csv, src, segmentation_annotator={"type": "sam2", "path": str(tmp_path / "no-sam2")})
    with pytest.raises(MetricModelUnavailable, match="no-sam2"):
        data_stage.run(p, ProjectPaths(tmp_path / "a", "tiny"))

    def flaky(video: np.ndarray) -> np.ndarray:
        if flaky.calls == 0:
            flaky.calls += 1
            raise RuntimeError("CUDA error: an illegal memory access")
        return np.ones(video.shape[:3], np.int32)

    flaky.calls = 0
    monkeypatch.setattr(data_stage, "_annotators", lambda src: {"seg": flaky})
    m = data_stage.run(p, paths := ProjectPaths(tmp_path / "b", "tiny")).metrics
    assert m["clips"] == 1 and m["dropped_annotator_error"] == 1 and m["failed"] == 3 and m["annotated"] == 1
    reasons = pd.read_csv(paths.clips / "rejects.csv")["reason"]
    assert reasons.str.contains("illegal memory access").sum() == 1


def test_curation_needs_its_paths(tmp_path: Path, sources) -> None:
    from udpdiff.paths import ProjectPaths
    from udpdiff.stages.data import run

    csv, src = sources
    p = _params(tmp_path, csv, src)
    p = p.with_overrides({"data.panda70m.curation": {"csv": str(csv)}})
    with pytest.raises(ValueError, match="source_dir, cut_dir must be set"):
        run(p, ProjectPaths(tmp_path, "tiny"))
    p = _params(tmp_path, csv, tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        run(p, ProjectPaths(tmp_path, "tiny"))


def test_manifest_extra_columns_are_namespaced(tmp_path: Path, sources) -> None:
    """curation_* columns survive a round trip and pass the contract; other unknown columns fail."""
    from udpdiff.data.synthetic import synthesize_dataset

    manifest = synthesize_dataset(tmp_path / "ds", num_clips=2, num_frames=T, height=H, width=W, fps=FPS, seed=0,
                                  val_fraction=0.0)
    df = read_manifest(manifest).assign(curation_quality=[0.5, 0.7], curation_video_id=["a", "b"])
    write_manifest(df, manifest)
    back = read_manifest(manifest)
    assert back["curation_quality"].tolist() == [0.5, 0.7] and back["curation_video_id"].tolist() == ["a", "b"]
    assert validate_manifest(manifest, T, (H, W), tmp_path / "r.json").success
    with pytest.raises(ManifestError, match="curation_<name>"):
        write_manifest(df.assign(quality=1.0), manifest)
    with pytest.raises(ManifestError, match="all numbers or all strings"):
        write_manifest(df.assign(curation_mixed=[1.0, "x"]), manifest)
    assert probe_video(resolve(manifest, back["video_path"][0])).num_frames == T


@pytest.mark.slow
def test_shards_run_as_prefect_tasks_on_a_local_dask_cluster(sources, tmp_path: Path, tiny_sam2_dir: Path,
                                                             tiny_mask2former_dir: Path, tiny_depth_anything_dir: Path,
                                                             tiny_video_llava_dir: Path) -> None:
    """runner.type: dask — the whole curation (cut, filters, Video-LLaVA captions, Mask2Former entities
    propagated by SAM2 and post-processed, Depth Anything V2; tiny random models of the real classes
    loaded from folders by the workers) runs as Prefect task runs on the workers of a Dask cluster this
    test starts. The dataset equals the in-process run's, passes the data contract, a rerun resumes
    without recomputing anything, and a shard that cannot run (missing weights) fails the stage naming
    the path."""
    from distributed import Client, LocalCluster

    import udpdiff.stages.data as data_stage
    from flows.curation import shard_mapper
    from udpdiff.paths import ProjectPaths

    csv, src = sources
    local = _params(tmp_path, csv, src,
                    segmentation_annotator={"type": "sam2", "path": str(tiny_sam2_dir), "entities": {
                        "type": "mask2former", "path": str(tiny_mask2former_dir), "options": {"score_threshold": 0.0}}},
                    depth_annotator={"type": "depth-anything-v2", "path": str(tiny_depth_anything_dir)})
    cur = local.active.data.panda70m.curation.model_dump()
    local = local.with_overrides({"data.panda70m.curation": {**cur, "recaption": {
        "path": str(tiny_video_llava_dir), "num_frames": 4, "max_new_tokens": 6, "dtype": "float32"}}})
    cur = local.active.data.panda70m.curation.model_dump()
    local_paths = ProjectPaths(tmp_path / "local", "tiny")
    expected = data_stage.run(local, local_paths).metrics
    assert expected["recaptioned"] == 2 and expected["annotated_seg"] == 2 and expected["annotated_depth"] == 2

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        dask = local.with_overrides({"data.panda70m.curation": {
            **cur, "runner": {"type": "dask", "address": cluster.scheduler_address, "shard_size": 1}}})
        paths = ProjectPaths(tmp_path / "dask", "tiny")
        m = data_stage.run(dask, paths, map_shards=shard_mapper(dask)).metrics
        assert m["shards"] == 5 and m["cut"] == 3 and m["resumed"] == 0
        assert {k: v for k, v in m.items() if k != "shards"} == {k: v for k, v in expected.items() if k != "shards"}
        pd.testing.assert_frame_equal(read_manifest(paths.manifest), read_manifest(local_paths.manifest))
        for row in read_manifest(paths.manifest).itertuples():
            assert np.array_equal(read_video(resolve(paths.manifest, row.video_path)),
                                  read_video(resolve(local_paths.manifest, row.video_path)))
            assert np.array_equal(load_ids(resolve(paths.manifest, row.seg_path)),
                                  load_ids(resolve(local_paths.manifest, row.seg_path)))
            np.testing.assert_allclose(load_depth(resolve(paths.manifest, row.depth_path)),
                                       load_depth(resolve(local_paths.manifest, row.depth_path)), atol=1e-5)
        contract = validate_manifest(paths.manifest, T, (H, W), tmp_path / "report.json", require_dense=True)
        assert contract.success, contract.failures
        # the shards ran as Prefect tasks on the cluster's workers, in both of its processes
        def shard_tasks(dask_worker) -> int:
            # keys this worker computed (a key stolen from a busy worker is in both logs, "memory" in one)
            return len({str(e[0]) for e in dask_worker.state.log
                        if "curate_shard_task" in str(e[0]) and len(e) > 2 and e[2] == "memory"})

        per_worker = client.run(shard_tasks)
        assert sum(per_worker.values()) == 5 and all(n > 0 for n in per_worker.values()), per_worker

        again = data_stage.run(dask, paths, map_shards=shard_mapper(dask)).metrics
        assert again["cut"] == 0 and again["resumed"] == 4 and again["clips"] == m["clips"]
        assert again["annotated"] == 0 and again["labels_cached"] == 4 and again["captions_cached"] == 2

        broken = dask.with_overrides({"data.panda70m.segmentation_annotator": {
            "type": "sam2", "path": str(tmp_path / "no-sam2")}})
        with pytest.raises(Exception, match="no-sam2"):
            data_stage.run(broken, ProjectPaths(tmp_path / "broken", "tiny"), map_shards=shard_mapper(broken))
