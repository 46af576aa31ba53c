"""Tests of the first-frame entity segmenter (udpdiff.annotators.entities).

The maths (query scores and mask logits -> one entity map) is checked on hand-made queries with
known answers. The model tests load tiny randomly initialised Mask2Former / EoMT checkpoints saved
hub-shaped to temporary folders, so the real loading, preprocessing, forward and mask mapping run;
random weights give arbitrary masks, so there the checks are the contract (dtype, shape, ids by
area, limits), agreement with HF's own preprocessing, and the loading errors.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from udpdiff.annotators.entities import EntitySegmenter, entity_scores, queries_to_ids
from udpdiff.evaluation.consistency import MetricModelUnavailable

# --------------------------------------------------------------------------------------------
# Pure maths
# --------------------------------------------------------------------------------------------

LOW = 0.01  # mask probability of pixels a query does not cover


def _logits(*probability_maps: np.ndarray) -> np.ndarray:
    p = np.stack(probability_maps).astype(np.float64)
    return np.log(p / (1 - p)).astype(np.float32)


def _prob(h, w, value, rows=slice(None), cols=slice(None)):
    m = np.full((h, w), LOW)
    m[rows, cols] = value
    return m


def test_entity_score_is_one_minus_no_object():
    logits = torch.log(torch.tensor([[1.0, 1.0, 2.0], [9.0, 9.0, 1.0], [0.5, 0.0, 9.5]]))
    s = entity_scores(logits)
    # softmax rows: (1/4, 1/4, 1/2), (9/19, 9/19, 1/19), (1/20, 0, 19/20); last column = no object
    np.testing.assert_allclose(s.numpy(), [0.5, 18 / 19, 0.05], rtol=1e-6)
    # The class-ambiguous query is surely an entity although no class reaches 0.5.
    assert s[1] > 0.9 and logits[1].softmax(-1)[:-1].max() < 0.5
    assert entity_scores(logits[None]).shape == (1, 3)  # batched
    with pytest.raises(ValueError):
        entity_scores(torch.zeros(3, 1))


def test_overlap_goes_to_the_largest_score_times_probability():
    h, w = 8, 12
    # q0: p 0.9 on columns 0-7, score 0.9 (0.81); q1: p 0.7 on columns 6-11, score 1.0 (0.70).
    logits = _logits(_prob(h, w, 0.9, cols=slice(0, 8)), _prob(h, w, 0.7, cols=slice(6, 12)))
    ids = queries_to_ids(np.array([0.9, 1.0]), logits, overlap_threshold=0.5)
    assert ids.dtype == np.int32 and ids.shape == (h, w)
    expected = np.zeros((h, w), np.int32)
    expected[:, :8], expected[:, 8:] = 1, 2  # q0 wins the overlap (by score alone q1 would)
    np.testing.assert_array_equal(ids, expected)
    # q1 at p 0.85: 0.85 > 0.81 takes the overlap (by probability alone q0's 0.9 would); equal
    # areas (48 px each): the lower query index gets id 1.
    logits = _logits(_prob(h, w, 0.9, cols=slice(0, 8)), _prob(h, w, 0.85, cols=slice(6, 12)))
    ids = queries_to_ids(np.array([0.9, 1.0]), logits, overlap_threshold=0.5)
    expected[:, :6], expected[:, 6:] = 1, 2
    np.testing.assert_array_equal(ids, expected)


def test_low_scores_and_uncovered_pixels_stay_unclaimed():
    h, w = 6, 12
    maps = [
        _prob(h, w, 0.9, cols=slice(0, 4)),  # kept
        _prob(h, w, 0.99, cols=slice(4, 8)),  # confident mask, but score 0.5: dropped
        _prob(h, w, 0.3, cols=slice(8, 12)),  # covers nothing (p < 0.5)
    ]
    ids = queries_to_ids(np.array([0.9, 0.5, 0.95]), _logits(*maps))
    expected = np.zeros((h, w), np.int32)
    expected[:, :4] = 1
    np.testing.assert_array_equal(ids, expected)
    # The threshold is inclusive and configurable.
    ids = queries_to_ids(np.array([0.9, 0.5, 0.95]), _logits(*maps), score_threshold=0.5)
    assert np.unique(ids[:, 4:8]).tolist() == [2] and (ids[:, 8:] == 0).all()
    # A pixel is only claimed above the mask threshold.
    ids = queries_to_ids(np.array([0.9, 0.5, 0.95]), _logits(*maps), mask_threshold=0.25)
    assert np.unique(ids[:, 8:]).tolist() == [2]


def test_duplicates_splitting_a_region_leave_the_stronger_one_not_a_hole():
    h, w = 6, 12
    a = _prob(h, w, 0.9, cols=slice(0, 6))
    a[:, 3:6] = 0.8
    b = _prob(h, w, 0.8, cols=slice(0, 6))
    b[:, 3:6] = 0.9
    # Each wins half of its mask (0.81 vs 0.68 left, 0.72 vs 0.765 right): both fail the 0.8 overlap
    # rule at first. The weaker (score 0.85) goes, and the other then wins all of it.
    ids = queries_to_ids(np.array([0.9, 0.85]), _logits(a, b))
    expected = np.zeros((h, w), np.int32)
    expected[:, :6] = 1
    np.testing.assert_array_equal(ids, expected)
    # A mostly hidden query (wins 1/3 of its mask) is suppressed; its pixels go to the winner.
    big = _prob(h, w, 0.9, cols=slice(0, 12))
    hidden = _prob(h, w, 0.6, cols=slice(0, 6))
    hidden[:, 4:6] = 0.99
    ids = queries_to_ids(np.array([0.9, 0.9]), _logits(big, hidden))
    np.testing.assert_array_equal(ids, np.ones((h, w), np.int32))
    # Without the overlap rule it keeps the part it wins.
    ids = queries_to_ids(np.array([0.9, 0.9]), _logits(big, hidden), overlap_threshold=0.0)
    assert (ids[:, 4:6] == 2).all() and (ids[:, :4] == 1).all() and (ids[:, 6:] == 1).all()


def test_small_entities_are_dropped_and_their_pixels_repainted():
    h, w = 10, 10
    background = _prob(h, w, 0.6)  # covers everything, weakly (0.54)
    speck = _prob(h, w, 0.99, rows=slice(0, 2), cols=slice(0, 2))  # own mask 4 px < min_area
    part = _prob(h, w, 0.99, rows=slice(5, 8), cols=slice(5, 8))  # 9 px, but `front` takes 6 of them
    front = _prob(h, w, 0.995, rows=slice(5, 10), cols=slice(6, 10))
    scores = np.array([0.9, 0.99, 0.99, 0.999])
    ids = queries_to_ids(scores, _logits(background, speck, part, front), min_area=5, overlap_threshold=0.0)
    expected = np.ones((h, w), np.int32)
    expected[5:10, 6:10] = 2  # front (20 px); speck and part (3 px left) go back to the background
    np.testing.assert_array_equal(ids, expected)
    # With min_area 1 all four survive.
    ids = queries_to_ids(scores, _logits(background, speck, part, front), min_area=1, overlap_threshold=0.0)
    assert sorted(np.unique(ids, return_counts=True)[1].tolist()) == [3, 4, 20, 73]


def test_max_entities_keeps_the_largest_and_ids_follow_area():
    h, w = 10, 10
    small = _prob(h, w, 0.9, rows=slice(0, 2), cols=slice(0, 8))  # 16 px
    large = _prob(h, w, 0.9, rows=slice(2, 6))  # 40 px
    medium = _prob(h, w, 0.9, rows=slice(6, 10), cols=slice(0, 6))  # 24 px
    logits = _logits(small, large, medium)
    ids = queries_to_ids(np.full(3, 0.9), logits)
    assert ids[3, 0] == 1 and ids[7, 0] == 2 and ids[0, 0] == 3  # by area, not by query order
    capped = queries_to_ids(np.full(3, 0.9), logits, max_entities=2)
    np.testing.assert_array_equal(capped, np.where(ids == 3, 0, ids))
    assert (queries_to_ids(np.full(3, 0.9), logits, max_entities=0) == 0).all()


def test_degenerate_inputs():
    assert (queries_to_ids(np.zeros(0), np.zeros((0, 3, 4), np.float32)) == 0).all()
    assert queries_to_ids(np.zeros(0), np.zeros((0, 3, 4), np.float32)).shape == (3, 4)
    assert (queries_to_ids(np.array([0.1]), np.full((1, 3, 4), 9.0, np.float32)) == 0).all()
    with pytest.raises(ValueError, match="2 masks but 3 scores"):
        queries_to_ids(np.ones(3), np.zeros((2, 3, 4), np.float32))
    with pytest.raises(ValueError, match=r"\(Q, H, W\)"):
        queries_to_ids(np.ones(2), np.zeros((2, 4), np.float32))


# --------------------------------------------------------------------------------------------
# Tiny random checkpoints
# --------------------------------------------------------------------------------------------

PERMISSIVE = {"score_threshold": 0.0, "overlap_threshold": 0.0, "min_area_fraction": 0.0}


def _image(h=45, w=70, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    image[: h // 2] //= 4  # some structure: a dark top half
    return image


@pytest.fixture(scope="module")
def tiny_eomt_dir(tmp_path_factory):
    """A tiny random EoMT (64x64 input, 8x8 patches) with its processor config, saved hub-shaped."""
    from transformers import EomtConfig, EomtForUniversalSegmentation
    from transformers.models.eomt.image_processing_pil_eomt import EomtImageProcessorPil

    config = EomtConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, image_size=64, patch_size=8,
                        num_blocks=2, num_queries=8, num_register_tokens=1, num_labels=5)
    path = tmp_path_factory.mktemp("tiny-eomt")
    torch.manual_seed(0)
    EomtForUniversalSegmentation(config).save_pretrained(path)
    EomtImageProcessorPil(size={"shortest_edge": 64, "longest_edge": 64}, do_pad=True).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_mask2former(tiny_mask2former_dir):
    return EntitySegmenter(tiny_mask2former_dir, model_type="mask2former", device="cpu", **PERMISSIVE)


def _check_entity_map(ids: np.ndarray, shape: tuple[int, int]) -> int:
    """The contract: int32 at the input size, ids 1..K contiguous by non-increasing area; returns K."""
    assert ids.dtype == np.int32 and ids.shape == shape
    labels, counts = np.unique(ids[ids > 0], return_counts=True)
    np.testing.assert_array_equal(labels, np.arange(1, labels.size + 1))
    assert (np.diff(counts) <= 0).all()
    return int(labels.size)


def test_tiny_mask2former_entity_map(tiny_mask2former, tiny_mask2former_dir):
    image = _image()
    assert tiny_mask2former.model_type == "mask2former"
    # 45x70: shortest edge 64 -> 64x99, sides rounded up to multiples of 32 (HF's Mask2Former geometry).
    assert tiny_mask2former.input_size(45, 70) == ((64, 128), (64, 128))
    ids = tiny_mask2former(image)
    k = _check_entity_map(ids, image.shape[:2])
    assert 1 <= k <= 8  # at most one entity per query
    np.testing.assert_array_equal(tiny_mask2former(image), ids)  # deterministic
    # The limits apply to the real model's output too.
    model = tiny_mask2former.model
    one = EntitySegmenter(tiny_mask2former_dir, model=model, device="cpu", **PERMISSIVE | {"max_entities": 1})
    assert _check_entity_map(one(image), image.shape[:2]) == 1
    none = EntitySegmenter(tiny_mask2former_dir, model=model, device="cpu", **PERMISSIVE | {"min_area_fraction": 0.9})
    assert (none(image) == 0).all()


def test_tiny_mask2former_is_the_maths_on_the_models_outputs(tiny_mask2former):
    """The wrapper feeds queries_to_ids the model's scores and its masks mapped to the frame."""
    image = _image(h=50, w=37)
    pixel_values, resized = tiny_mask2former.preprocess(image)
    with torch.no_grad():
        out = tiny_mask2former.model(pixel_values=pixel_values)
    assert resized == tuple(pixel_values.shape[-2:])  # Mask2Former: no padding
    masks = torch.nn.functional.interpolate(out.masks_queries_logits.float(), size=(50, 37), mode="bilinear")[0]
    expected = queries_to_ids(entity_scores(out.class_queries_logits[0]), masks, score_threshold=0.0,
                              overlap_threshold=0.0)
    np.testing.assert_array_equal(tiny_mask2former(image), expected)


@pytest.mark.parametrize("model_dir", ["tiny_mask2former_dir", "tiny_eomt_dir"])
def test_preprocessing_matches_hf_processor(request, model_dir):
    """Resize/pad/normalise done here equals the HF (PIL backend) processor's up to one uint8 level."""
    from transformers import AutoImageProcessor

    path = request.getfixturevalue(model_dir)
    seg = EntitySegmenter(path, device="cpu")
    hf = AutoImageProcessor.from_pretrained(path, backend="pil", local_files_only=True)
    for shape in ((45, 70), (70, 45), (64, 64)):
        image = _image(*shape)
        ours, _ = seg.preprocess(image)
        ref = hf(images=image, return_tensors="pt").pixel_values
        assert ours.shape == ref.shape
        one_level = 1.0 / 255 / min(seg.image_std)
        assert (ours - ref).abs().max() <= one_level + 1e-4
        assert (ours - ref).abs().mean() < 0.25 * one_level


def test_tiny_eomt_pads_to_its_square_input(tiny_eomt_dir):
    seg = EntitySegmenter(tiny_eomt_dir, model_type="eomt", device="cpu", **PERMISSIVE)
    assert seg.model_type == "eomt"
    # 45x70: longer side to 64 (aspect kept), then padded at the bottom to the model's 64x64.
    assert seg.input_size(45, 70) == ((41, 64), (64, 64))
    pixel_values, resized = seg.preprocess(_image())
    assert resized == (41, 64) and pixel_values.shape == (1, 3, 64, 64)
    black = -torch.tensor(seg.image_mean) / torch.tensor(seg.image_std)
    torch.testing.assert_close(pixel_values[0, :, 41:, :].amax((1, 2)), black)
    ids = seg(_image())
    assert 1 <= _check_entity_map(ids, (45, 70)) <= 8


def test_legacy_processor_config_geometry(tiny_mask2former, tmp_path):
    """The hub's Mask2Former configs use the old feature-extractor keys (``size: 384``)."""
    from transformers import AutoImageProcessor

    (tmp_path / "preprocessor_config.json").write_text(json.dumps({
        "feature_extractor_type": "MaskFormerFeatureExtractor", "do_normalize": True, "do_resize": True,
        "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225], "size": 384,
        "size_divisibility": 32, "ignore_index": 255, "reduce_labels": False, "num_labels": 133}))
    processor = AutoImageProcessor.from_pretrained(tmp_path, backend="pil", local_files_only=True)
    seg = EntitySegmenter(tmp_path, model=tiny_mask2former.model, processor=processor, device="cpu")
    assert seg.input_size(480, 720) == ((384, 576), (384, 576))  # the paper's clips
    assert seg.input_size(45, 70) == ((384, 608), (384, 608))  # 597 rounded up to 32s


# --------------------------------------------------------------------------------------------
# Loading errors and input validation
# --------------------------------------------------------------------------------------------


def test_missing_weights_raise_metric_model_unavailable(tmp_path):
    with pytest.raises(MetricModelUnavailable) as err:
        EntitySegmenter(tmp_path / "no-such-mask2former")
    msg = str(err.value)
    assert "EntitySegmenter" in msg and "no-such-mask2former" in msg
    assert "facebook/mask2former-swin-large-coco-panoptic" in msg


def test_config_without_weights_or_processor_raises_metric_model_unavailable(tiny_mask2former_dir, tmp_path):
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    shutil.copy(tiny_mask2former_dir / "config.json", config_only)
    shutil.copy(tiny_mask2former_dir / "preprocessor_config.json", config_only)
    with pytest.raises(MetricModelUnavailable, match="config-only"):
        EntitySegmenter(config_only)
    no_processor = tmp_path / "no-processor"
    shutil.copytree(tiny_mask2former_dir, no_processor)
    (no_processor / "preprocessor_config.json").unlink()
    with pytest.raises(MetricModelUnavailable, match="image processor"):
        EntitySegmenter(no_processor)


def test_wrong_or_unsupported_model_family(tiny_mask2former_dir, tiny_eomt_dir, tmp_path):
    from transformers import OneFormerConfig

    with pytest.raises(ValueError, match="'mask2former' model, not 'eomt'"):
        EntitySegmenter(tiny_mask2former_dir, model_type="eomt")
    with pytest.raises(ValueError, match="'eomt' model, not 'mask2former'"):
        EntitySegmenter(tiny_eomt_dir, model_type="mask2former")
    with pytest.raises(ValueError, match="model_type must be one of"):
        EntitySegmenter(tiny_mask2former_dir, model_type="cropformer")
    OneFormerConfig().save_pretrained(tmp_path / "oneformer")  # refused before any weights are needed
    with pytest.raises(ValueError, match="task_inputs"):
        EntitySegmenter(tmp_path / "oneformer")


def test_semantic_eomt_checkpoints_are_refused(tiny_eomt_dir, tmp_path):
    tiled = tmp_path / "eomt-semantic"
    shutil.copytree(tiny_eomt_dir, tiled)
    cfg = json.loads((tiled / "preprocessor_config.json").read_text())
    (tiled / "preprocessor_config.json").write_text(json.dumps(cfg | {"do_split_image": True, "do_pad": False}))
    with pytest.raises(ValueError, match="do_split_image"):
        EntitySegmenter(tiled)


def test_rejects_bad_input(tiny_mask2former):
    image = _image()
    with pytest.raises(TypeError, match="uint8"):
        tiny_mask2former(image.astype(np.float32))
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        tiny_mask2former(image[None])
    with pytest.raises(TypeError, match="numpy"):
        tiny_mask2former(torch.from_numpy(image))
    with pytest.raises(ValueError, match="max_entities"):
        EntitySegmenter(model=tiny_mask2former.model, max_entities=0)
