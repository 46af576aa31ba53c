"""Tests of the SAM2 video entity-segmentation annotator (udpdiff.annotators.segmentation).

The model tests use a tiny randomly initialised ``Sam2VideoConfig`` saved to a temporary folder and
loaded back through :class:`Sam2VideoAnnotator`, so the real loading, grid-prompt, mask-prompt and
propagation code runs. Random weights give arbitrary masks: only structural properties are checked.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from udpdiff.annotators.segmentation import (
    Sam2VideoAnnotator,
    SegmentationAnnotator,
    compose_ids,
    deduplicate_masks,
    masks_to_ids,
    point_grid,
    stability_scores,
)
from udpdiff.evaluation.consistency import MetricModelUnavailable

# --------------------------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------------------------


def test_point_grid_cell_centres():
    pts = point_grid(3, height=30, width=60)
    assert pts.shape == (9, 2) and pts.dtype == np.float32
    # Row-major (x varies fastest), (x, y) pixel coordinates at the cell centres.
    np.testing.assert_allclose(pts[:3], [[10, 5], [30, 5], [50, 5]])
    np.testing.assert_allclose(pts[:, 1].reshape(3, 3)[:, 0], [5, 15, 25])
    for n in (8, 12):
        g = point_grid(n, 61, 79)
        assert g.shape == (n * n, 2)
        assert (g[:, 0] > 0).all() and (g[:, 0] < 79).all() and (g[:, 1] > 0).all() and (g[:, 1] < 61).all()
        np.testing.assert_allclose(np.unique(g[:, 0]), (np.arange(n) + 0.5) * 79 / n, rtol=1e-6)
    with pytest.raises(ValueError):
        point_grid(0, 10, 10)


def test_stability_scores():
    logits = torch.full((2, 4, 4), -5.0)
    logits[0, :2] = 5.0  # crisp mask: stable
    logits[1, :2] = 0.5  # half of the soft mask is within the offset band
    logits[1, 2:] = -0.5
    s = stability_scores(logits, 0.0, 1.0)
    assert s[0] == pytest.approx(1.0)
    assert s[1] == pytest.approx(0.0)  # nothing above +1, everything above -1
    assert stability_scores(torch.full((1, 3, 3), -9.0))[0] == 0.0  # empty mask


def _box(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def test_deduplicate_masks_nms_tiny_and_order():
    h, w = 20, 20
    big = _box(h, w, 0, 10, 0, 20)  # area 200
    big_dup = _box(h, w, 0, 10, 0, 19)  # IoU 0.95 with big
    mid = _box(h, w, 10, 20, 0, 10)  # area 100
    small = _box(h, w, 12, 16, 12, 16)  # area 16
    tiny = _box(h, w, 18, 20, 18, 20)  # area 4
    empty = np.zeros((h, w), bool)
    masks = np.stack([small, big_dup, mid, tiny, big, empty])
    scores = np.array([0.9, 0.95, 0.8, 0.99, 0.9, 0.99])
    keep = deduplicate_masks(masks, scores, iou_threshold=0.7, min_area=5)
    # big_dup out-scores big, so it is the one kept; tiny and empty are dropped; ids by area.
    assert keep.tolist() == [1, 2, 0]
    # Same scores: the larger duplicate wins.
    keep = deduplicate_masks(masks, np.full(6, 0.5), iou_threshold=0.7, min_area=5)
    assert keep.tolist() == [4, 2, 0]
    # Deterministic regardless of the input order.
    perm = np.array([5, 3, 2, 4, 0, 1])
    keep_perm = deduplicate_masks(masks[perm], scores[perm], iou_threshold=0.7, min_area=5)
    assert perm[keep_perm].tolist() == [1, 2, 0]
    # A high threshold keeps both duplicates.
    assert sorted(deduplicate_masks(masks, scores, iou_threshold=0.99, min_area=5).tolist()) == [0, 1, 2, 4]
    assert deduplicate_masks(np.zeros((0, 4, 4), bool), np.zeros(0)).shape == (0,)


def test_masks_to_ids_paint_order_and_relabel():
    h, w = 20, 20
    whole = _box(h, w, 0, 20, 0, 20)  # area 400
    part = _box(h, w, 5, 10, 5, 10)  # inside whole, area 25
    side = _box(h, w, 0, 20, 15, 20)  # overlaps whole, area 100
    speck = _box(h, w, 0, 1, 0, 2)  # area 2
    ids = masks_to_ids(np.stack([part, speck, whole, side]), min_area=3)
    assert ids.dtype == np.int32 and ids.shape == (h, w)
    # Smaller masks are painted over larger ones; the speck is painted too but is below min_area.
    assert (ids[part] != 0).all() and len(np.unique(ids[part])) == 1
    assert (ids[5:10, 15:20] == ids[0, 19]).all()
    # ids 1..K by decreasing visible area: whole (400-25-100-0 px visible) > side (100) > part (25).
    assert ids[19, 0] == 1 and ids[0, 19] == 2 and ids[7, 7] == 3
    # The speck is below min_area: its pixels go back to the mask underneath, not to background.
    assert ids[0, 0] == 1 and ids[0, 1] == 1
    assert np.unique(ids).tolist() == [1, 2, 3]
    # An occluded sliver (visible area < min_area) is removed and repainted the same way.
    cover = _box(h, w, 0, 20, 0, 9)  # hides all but one column of `sliver`
    sliver = _box(h, w, 0, 20, 0, 10)
    ids2 = masks_to_ids(np.stack([whole, sliver, cover]), min_area=25)
    assert np.unique(ids2).tolist() == [1, 2] and (ids2[:, 9] == ids2[0, 15]).all()
    # Beyond max_entities the smallest visible entity goes, again without leaving a hole.
    ids_max = masks_to_ids(np.stack([part, whole, side]), max_entities=2)
    assert np.unique(ids_max).tolist() == [1, 2] and (ids_max[part] == 1).all()
    assert (masks_to_ids(np.stack([part, whole]), max_entities=0) == 0).all()
    assert masks_to_ids(np.zeros((0, 3, 4), bool)).shape == (3, 4)


def test_compose_ids_highest_logit_wins():
    logits = np.full((3, 2, 2), -5.0, np.float32)
    logits[0, 0, 0], logits[1, 0, 0] = 2.0, 3.0  # both claim (0,0): object 1 wins
    logits[0, 0, 1], logits[2, 0, 1] = 4.0, 1.0  # object 0 wins
    logits[2, 1, 0] = 0.5  # single claim
    ids = compose_ids(logits, object_ids=[7, 3, 9])
    assert ids.dtype == np.int32
    np.testing.assert_array_equal(ids, [[3, 7], [9, 0]])
    np.testing.assert_array_equal(compose_ids(logits, mask_threshold=1.0), [[2, 1], [0, 0]])
    # Batched over leading dims (frames).
    batched = compose_ids(torch.from_numpy(np.stack([logits, logits])))
    assert batched.shape == (2, 2, 2) and (batched[0] == batched[1]).all()
    with pytest.raises(ValueError):
        compose_ids(logits, object_ids=[1, 2])


# --------------------------------------------------------------------------------------------
# Loading and input validation
# --------------------------------------------------------------------------------------------


def test_missing_weights_raise_helpful_error(tmp_path):
    with pytest.raises(MetricModelUnavailable) as err:
        Sam2VideoAnnotator(tmp_path / "no-such-sam2")
    msg = str(err.value)
    assert "Sam2VideoAnnotator" in msg and "no-such-sam2" in msg
    assert "facebook/sam2.1-hiera-large" in msg and "model_path_or_id" in msg


# --------------------------------------------------------------------------------------------
# Tiny random SAM2 video model, round-tripped through save_pretrained / the annotator's loader
# --------------------------------------------------------------------------------------------



@pytest.fixture(scope="module")
def permissive_annotator(tiny_sam2_dir):
    # Random weights predict IoU ~0.5 and soft masks: open every filter so masks survive.
    return Sam2VideoAnnotator(
        tiny_sam2_dir,
        points_per_side=8,
        pred_iou_thresh=0.0,
        stability_score_thresh=0.0,
        min_area_fraction=0.0,
        max_entities=3,
        device="cpu",
    )


def _video(t=4, h=61, w=79, seed=0):
    rng = np.random.default_rng(seed)
    video = rng.integers(0, 256, (t, h, w, 3), dtype=np.uint8)
    video[:, : h // 2] //= 4  # some structure: a dark top half
    return video


def test_processor_load_failure_is_metric_model_unavailable(tiny_sam2_dir, permissive_annotator):
    # No preprocessor config was saved (and torchvision may be missing): same error type as weights.
    with pytest.raises(MetricModelUnavailable, match="processor"):
        Sam2VideoAnnotator(tiny_sam2_dir, model=permissive_annotator.model, load_processor=True)


def test_annotator_protocol(permissive_annotator):
    assert isinstance(permissive_annotator, SegmentationAnnotator)
    assert permissive_annotator.name == "sam2_video"


def test_rejects_bad_input(permissive_annotator):
    video = _video()
    with pytest.raises(TypeError, match="uint8"):
        permissive_annotator(video.astype(np.float32))
    with pytest.raises(ValueError, match=r"\(T, H, W, 3\)"):
        permissive_annotator(video[..., :2])
    with pytest.raises(ValueError, match=r"\(T, H, W, 3\)"):
        permissive_annotator(video[0])
    with pytest.raises(TypeError, match="numpy"):
        permissive_annotator(torch.from_numpy(video))
    with pytest.raises(ValueError, match="shape"):
        permissive_annotator(video, first_frame_ids=np.zeros((10, 10), np.int32))
    with pytest.raises(TypeError, match="integer"):
        permissive_annotator(video, first_frame_ids=np.zeros(video.shape[1:3], np.float32))


def test_point_grid_annotation_runs_end_to_end(permissive_annotator):
    video = _video()
    ids = permissive_annotator(video)
    assert ids.dtype == np.int32 and ids.shape == video.shape[:3]
    labels = np.unique(ids)
    positive = labels[labels > 0]
    assert 1 <= positive.size <= 3
    np.testing.assert_array_equal(positive, np.arange(1, positive.size + 1))  # contiguous 1..K
    # (Random weights give speckled grid masks that do not survive SAM2's low-resolution mask
    # round trip, so frame 0 is not compared with the grid entity map here; the explicit-prompt
    # test below checks the round trip on blocky masks.)
    first = permissive_annotator.first_frame_entities(video[0])
    assert first.max() >= positive.size
    # Deterministic: same frame, same entities.
    np.testing.assert_array_equal(permissive_annotator.first_frame_entities(video[0]), first)


def test_first_frame_entities_respects_max_entities(tiny_sam2_dir, permissive_annotator):
    frame = _video(t=1)[0]
    ids = permissive_annotator.first_frame_entities(frame)
    assert ids.dtype == np.int32 and ids.shape == frame.shape[:2]
    assert 1 <= ids.max() <= 3
    # Strict default filters reject the random model's ~0.5 IoU predictions: nothing is found
    # and the whole video is background (no propagation is attempted).
    strict = Sam2VideoAnnotator(tiny_sam2_dir, model=permissive_annotator.model, device="cpu")
    video = _video(t=2)
    out = strict(video)
    assert out.shape == video.shape[:3] and (out == 0).all()


def test_explicit_first_frame_ids_are_propagated(permissive_annotator):
    video = _video(t=4, h=61, w=79)
    first = np.zeros(video.shape[1:3], np.int32)
    first[:30, :40] = 4
    first[30:, 40:] = 9
    first[5:20, 50:70] = 2
    ids = permissive_annotator(video, first_frame_ids=first)
    assert ids.dtype == np.int32 and ids.shape == video.shape[:3]
    assert set(np.unique(ids).tolist()) <= {0, 2, 4, 9}  # caller's ids are kept
    # Frame 0 is the mask prompt itself (through SAM2's low-resolution round trip).
    assert (ids[0] == first).mean() > 0.97
    assert set(np.unique(ids[0]).tolist()) == {0, 2, 4, 9}
    # No entities given: all background.
    assert (permissive_annotator(video[:2], first_frame_ids=np.zeros(video.shape[1:3], np.int64)) == 0).all()


def test_image_model_shares_video_weights(permissive_annotator):
    image_model = permissive_annotator.image_model
    video_model = permissive_annotator.model
    a = image_model.mask_decoder.iou_prediction_head.proj_out.weight
    b = video_model.mask_decoder.iou_prediction_head.proj_out.weight
    assert a.data_ptr() == b.data_ptr()


# --------------------------------------------------------------------------------------------
# First-frame entity model (paper §3.1: EntitySeg's map prompts SAM2)
# --------------------------------------------------------------------------------------------


class StubEntityModel:
    """Returns a fixed first-frame entity map and records the frames it was given."""

    def __init__(self, ids: np.ndarray) -> None:
        self.ids, self.frames = ids, []

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        self.frames.append(frame.copy())
        return self.ids


def _blocky_entities(h, w, values=(1, 2, 3)):
    ids = np.zeros((h, w), np.int32)
    ids[:30, :40] = values[0]
    ids[30:, 40:] = values[1]
    ids[5:20, 50:70] = values[2]
    return ids


def _with_entity_model(annotator, entity_model):
    return Sam2VideoAnnotator(model=annotator.model, entity_model=entity_model, device="cpu")


def test_entity_model_map_is_what_sam2_propagates(permissive_annotator):
    video = _video(t=4, h=61, w=79)
    known = _blocky_entities(61, 79)
    stub = StubEntityModel(known)
    annotator = _with_entity_model(permissive_annotator, stub)
    annotator._grid_entities = lambda *args: pytest.fail("the point grid was used")
    ids = annotator(video)
    # The entity model saw frame 0, once, and its map was propagated exactly as an explicit prompt is.
    assert len(stub.frames) == 1 and np.array_equal(stub.frames[0], video[0])
    np.testing.assert_array_equal(ids, permissive_annotator(video, first_frame_ids=known))
    # Frame 0's entities are the entity map's (through SAM2's low-resolution round trip).
    assert set(np.unique(ids[0]).tolist()) == {0, 1, 2, 3}
    assert (ids[0] == known).mean() > 0.97
    np.testing.assert_array_equal(annotator.first_frame_entities(video[0]), known)


def test_entity_model_ids_are_compacted_and_explicit_ids_win(permissive_annotator):
    video = _video(t=3, h=61, w=79)
    sparse = _blocky_entities(61, 79, values=(4, 9, 2))
    stub = StubEntityModel(sparse)
    annotator = _with_entity_model(permissive_annotator, stub)
    ids = annotator(video)
    # Like the grid path, the entity model's entities come out numbered 1..K, their order kept.
    explicit = permissive_annotator(video, first_frame_ids=sparse)
    lut = np.zeros(10, np.int32)
    lut[[2, 4, 9]] = [1, 2, 3]
    np.testing.assert_array_equal(ids, lut[explicit])
    # Explicit first-frame ids are tracked as given; the entity model is not asked.
    stub.frames.clear()
    np.testing.assert_array_equal(annotator(video, first_frame_ids=sparse), explicit)
    assert stub.frames == []
    # A malformed entity map is refused like a malformed explicit one.
    with pytest.raises(ValueError, match="entity model's first-frame map is malformed: .*shape"):
        _with_entity_model(permissive_annotator, StubEntityModel(np.zeros((10, 10), np.int32)))(video)


def test_tiny_mask2former_prompts_sam2(permissive_annotator, tiny_mask2former_dir):
    from udpdiff.annotators.entities import EntitySegmenter

    segmenter = EntitySegmenter(tiny_mask2former_dir, device="cpu", score_threshold=0.0, overlap_threshold=0.0,
                                min_area_fraction=0.01, max_entities=3)
    annotator = _with_entity_model(permissive_annotator, segmenter)
    video = _video(t=3, h=61, w=79)
    first = segmenter(video[0])
    assert first.shape == (61, 79) and 1 <= first.max() <= 3
    np.testing.assert_array_equal(annotator.first_frame_entities(video[0]), first)
    ids = annotator(video)
    assert ids.dtype == np.int32 and ids.shape == video.shape[:3]
    positive = np.unique(ids[ids > 0])
    np.testing.assert_array_equal(positive, np.arange(1, positive.size + 1))
    assert positive.size <= first.max()
    # The real entity model's map is propagated exactly as the same map given explicitly.
    explicit = permissive_annotator(video, first_frame_ids=first)
    present = np.unique(explicit[explicit > 0])
    lut = np.zeros(int(first.max()) + 1, np.int32)
    lut[present] = np.arange(1, present.size + 1)
    np.testing.assert_array_equal(ids, lut[explicit])


def test_build_annotator_with_entity_model(tiny_sam2_dir, tiny_mask2former_dir):
    from pydantic import ValidationError

    from udpdiff.annotators import build_annotator
    from udpdiff.annotators.entities import EntitySegmenter
    from udpdiff.config import AnnotatorParams

    entities = {"type": "mask2former", "path": str(tiny_mask2former_dir),
                "options": {"score_threshold": 0.0, "overlap_threshold": 0.0, "max_entities": 2, "dtype": "float32"}}
    ref = AnnotatorParams(type="sam2", path=str(tiny_sam2_dir), entities=entities)
    annotator = build_annotator(ref, "cpu")
    assert isinstance(annotator, Sam2VideoAnnotator) and isinstance(annotator.entity_model, EntitySegmenter)
    seg = annotator.entity_model
    assert (seg.model_type, seg.max_entities, seg.score_threshold, seg.device.type) == ("mask2former", 2, 0.0, "cpu")
    video = _video(t=2)
    ids = annotator(video)
    assert ids.shape == video.shape[:3] and ids.max() <= 2
    assert np.array_equal(annotator.first_frame_entities(video[0]), seg(video[0]))
    # Without `entities`, SAM2 keeps its point grid.
    assert build_annotator(AnnotatorParams(type="sam2", path=str(tiny_sam2_dir)), "cpu").entity_model is None

    # Bad combinations fail clearly: at validation ...
    with pytest.raises(ValidationError, match="prompts SAM2: the type must be sam2, not 'depthcrafter'"):
        AnnotatorParams(type="depthcrafter", path="x", entities=entities)
    with pytest.raises(ValidationError, match=r"options \['points_per_side'\] shape SAM2's point-grid prompts"):
        AnnotatorParams(type="sam2", path="x", options={"points_per_side": 12, "dtype": "bfloat16"}, entities=entities)
    with pytest.raises(ValidationError, match="entities.type"):
        AnnotatorParams(type="sam2", path="x", entities=entities | {"type": "oneformer"})
    # ... or when built: the wrong model family, an option EntitySegmenter does not take.
    with pytest.raises(ValueError, match="'mask2former' model, not 'eomt'"):
        build_annotator(AnnotatorParams(type="sam2", path=str(tiny_sam2_dir), entities=entities | {"type": "eomt"}),
                        "cpu")
    with pytest.raises(ValueError, match=r"entity model mask2former .* bad options .*points_per_side"):
        build_annotator(AnnotatorParams(type="sam2", path=str(tiny_sam2_dir),
                                        entities=entities | {"options": {"points_per_side": 8}}), "cpu")
