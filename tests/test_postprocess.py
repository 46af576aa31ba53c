"""Properties of the SAM2 id post-processing (udpdiff.data.postprocess, paper §3.1)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from udpdiff.data.curation_params import SegPostprocessParams
from udpdiff.data.postprocess import postprocess_ids

ALL_RULES = [SegPostprocessParams(small_regions=s, unclaimed=u, max_hole_fraction=0.02, min_region_fraction=0.01)
             for s in ("neighbour", "background") for u in ("nearest", "background")]


@st.composite
def id_videos(draw) -> np.ndarray:
    """Small id videos: a few rectangles of a few ids over an empty (0) frame, plus random specks
    and holes, so every step has something to do."""
    t, h, w = draw(st.integers(1, 3)), draw(st.integers(6, 24)), draw(st.integers(6, 24))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    ids = np.zeros((t, h, w), np.int32)
    for _ in range(draw(st.integers(0, 5))):
        e = int(rng.integers(1, 7))
        y0, x0 = rng.integers(0, h), rng.integers(0, w)
        ids[:, y0 : y0 + rng.integers(1, h), x0 : x0 + rng.integers(1, w)] = e
    noise = rng.random((t, h, w))
    ids[noise < 0.05] = 0  # holes
    ids[noise > 0.97] = rng.integers(1, 9, size=int((noise > 0.97).sum()))  # specks, some of new ids
    return ids


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(id_videos(), st.sampled_from(range(len(ALL_RULES))))
def test_idempotent_and_never_creates_ids(ids: np.ndarray, rule: int) -> None:
    p = ALL_RULES[rule]
    once = postprocess_ids(ids, p)
    assert once.shape == ids.shape and once.dtype == np.int32
    np.testing.assert_array_equal(postprocess_ids(once, p), once)
    for t in range(len(ids)):  # per frame: only ids of that frame (or 0); never renumbered
        assert set(np.unique(once[t])) - {0} <= set(np.unique(ids[t])) - {0}
    if p.unclaimed == "nearest":
        for t in range(len(ids)):
            # no 0 left, unless no entity is left at all (every one was a speck)
            assert not (once[t] == 0).any() or (once[t] == 0).all()


def test_a_hole_is_filled_and_the_empty_border_area_is_kept_with_background() -> None:
    ids = np.zeros((2, 40, 40), np.int32)
    ids[:, 5:30, 5:30] = 4
    ids[:, 15:18, 15:18] = 0  # a 9 px hole: 0.56 % of the frame
    ids[1, 20:30, 20:24] = 0  # a 40 px notch reaching the entity's edge: not enclosed, not a hole
    p = SegPostprocessParams(max_hole_fraction=0.01, min_region_fraction=0.0, unclaimed="background")
    out = postprocess_ids(ids, p)
    assert (out[:, 15:18, 15:18] == 4).all()
    assert (out[:, :5] == 0).all() and (out[1, 20:30, 20:24] == 0).all()
    small = SegPostprocessParams(max_hole_fraction=0.005, min_region_fraction=0.0, unclaimed="background")
    assert (postprocess_ids(ids, small)[:, 15:18, 15:18] == 0).all()  # above the size threshold


def test_a_hole_between_two_entities_is_not_theirs() -> None:
    ids = np.zeros((20, 20), np.int32)
    ids[2:18, 2:10], ids[2:18, 10:18] = 1, 2
    ids[8:11, 8:12] = 0  # bordered by both
    out = postprocess_ids(ids, SegPostprocessParams(min_region_fraction=0.0, unclaimed="background",
                                                    max_hole_fraction=0.1))
    assert (out[8:11, 8:12] == 0).all()


def test_a_speck_is_removed() -> None:
    ids = np.zeros((1, 32, 32), np.int32)
    ids[0, :, :16], ids[0, :, 16:] = 1, 2
    ids[0, 5:7, 5:7] = 3  # a 4 px speck of another entity inside 1
    ids[0, 20, 25] = 1  # a 1 px fragment of 1 inside 2
    p = SegPostprocessParams(min_region_fraction=0.01)  # 10.24 px
    out = postprocess_ids(ids, p)
    assert (out[0, 5:7, 5:7] == 1).all() and out[0, 20, 25] == 2
    assert set(np.unique(out)) == {1, 2}
    bg = postprocess_ids(ids, SegPostprocessParams(min_region_fraction=0.01, small_regions="background",
                                                   unclaimed="background"))
    assert (bg[0, 5:7, 5:7] == 0).all()  # 4 px of background: above the hole size (0.2 % = 2 px)
    assert bg[0, 20, 25] == 2  # the speck's 1 px of background is then a hole inside 2, and filled


def test_unclaimed_area_goes_to_the_nearest_entity_and_ids_stay_stable() -> None:
    ids = np.zeros((3, 10, 30), np.int32)
    ids[:, :, :5] = 7
    ids[:, :, 25:] = 2
    out = postprocess_ids(ids, SegPostprocessParams())
    assert (out[:, :, :15] == 7).all() and (out[:, :, 16:] == 2).all()
    ids[1] = np.where(ids[1] == 7, 0, ids[1])  # entity 7 leaves in frame 1: 2 takes all, 7 comes back
    out = postprocess_ids(ids, SegPostprocessParams())
    assert (out[1] == 2).all() and (out[2, :, :5] == 7).all()


def test_bad_input_and_params() -> None:
    with pytest.raises(TypeError, match="integers"):
        postprocess_ids(np.zeros((2, 4, 4), np.float32), SegPostprocessParams())
    with pytest.raises(ValueError, match=">= 0"):
        postprocess_ids(-np.ones((2, 4, 4), np.int32), SegPostprocessParams())
    with pytest.raises(ValueError, match="shape"):
        postprocess_ids(np.zeros((4,), np.int32), SegPostprocessParams())
    with pytest.raises(ValidationError):
        SegPostprocessParams(unclaimed="smallest")
