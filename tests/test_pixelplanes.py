"""Tests for udpdiff.pixelplanes (Pixelplanes colour encodings of segmentation and depth)."""

from __future__ import annotations

import json

import matplotlib
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from udpdiff import pixelplanes as pp

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
HALF_STEP = 1.0 / 510.0


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def moving_boxes(t: int, h: int, w: int, n: int, seed: int, size: int = 8) -> np.ndarray:
    """(t, h, w) int32 id video: n boxes moving linearly (later ids paint over earlier ones)."""
    rng = np.random.default_rng(seed)
    y0 = rng.integers(0, h - size, n)
    x0 = rng.integers(0, w - size, n)
    vy = rng.integers(-2, 3, n)
    vx = rng.integers(-2, 3, n)
    tt = np.arange(t)[:, None]
    ys = np.clip(y0[None, :] + vy[None, :] * tt, 0, h - size)  # (t, n)
    xs = np.clip(x0[None, :] + vx[None, :] * tt, 0, w - size)
    yy = np.arange(h)[None, :, None, None]
    xx = np.arange(w)[None, None, :, None]
    # inside[t, y, x, e]
    in_y = (yy >= ys[:, None, None, :]) & (yy < ys[:, None, None, :] + size)
    in_x = (xx >= xs[:, None, None, :]) & (xx < xs[:, None, None, :] + size)
    inside = in_y & in_x
    last = n - 1 - np.argmax(inside[..., ::-1], axis=-1)
    return np.where(inside.any(-1), last + 1, 0).astype(np.int32)


def add_noise(colormap: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noisy = colormap.astype(np.float64) + rng.normal(0.0, sigma, colormap.shape)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def is_relabelling(a: np.ndarray, b: np.ndarray) -> bool:
    """True if b == f(a) for a bijection f between the ids present, with f(0) = 0."""
    pairs = np.unique(np.stack([a.ravel(), b.ravel()], 1), axis=0)
    one_to_one = len(np.unique(pairs[:, 0])) == len(pairs) == len(np.unique(pairs[:, 1]))
    background_kept = all((x == 0) == (y == 0) for x, y in pairs)
    return one_to_one and background_kept


def matched_accuracy(true: np.ndarray, pred: np.ndarray) -> float:
    """Pixel accuracy after mapping each predicted id to the true id it overlaps most."""
    pairs, counts = np.unique(np.stack([pred.ravel(), true.ravel()], 1), axis=0, return_counts=True)
    best: dict[int, tuple[int, int]] = {}
    for (p, t), c in zip(pairs.tolist(), counts.tolist(), strict=True):
        if c > best.get(p, (0, -1))[1]:
            best[p] = (t, c)
    mapped = np.vectorize(lambda p: best[p][0])(pred)
    return float((mapped == true).mean())


id_videos = st.builds(
    lambda t, h, w, n, seed, big: (
        np.random.default_rng(seed).integers(0, n + 1, size=(t, h, w)) * (1 if not big else 7919)
    ).astype(np.int32),
    t=st.integers(1, 3),
    h=st.integers(1, 9),
    w=st.integers(1, 9),
    n=st.integers(1, 12),
    seed=st.integers(0, 2**31 - 1),
    big=st.booleans(),
)


# ------------------------------------------------------------------------------------------------
# palettes
# ------------------------------------------------------------------------------------------------


def test_palette_unique_non_background_5000_entities() -> None:
    ids = np.arange(1, 5001) * 3
    pal = pp.make_palette(ids, seed=7)
    assert pal.ids.dtype == np.int64 and pal.colors.dtype == np.uint8
    assert pal.ids[0] == 0 and tuple(pal.colors[0]) == pp.BACKGROUND_COLOR
    assert np.array_equal(pal.ids[1:], ids)
    codes = pal.colors.astype(np.int64) @ np.array([65536, 256, 1])
    assert len(np.unique(codes)) == 5001  # unique, including vs. the background


def test_palette_custom_background_is_avoided() -> None:
    pal = pp.make_palette(range(1, 2001), seed=0, background=(10, 20, 30))
    assert pal.color_of(0) == (10, 20, 30)
    assert not np.any(np.all(pal.colors[1:] == (10, 20, 30), axis=1))


def test_palette_channels_look_uniform() -> None:
    pal = pp.make_palette(np.arange(1, 20001), seed=3)
    c = pal.colors[1:].astype(np.float64)
    assert np.allclose(c.mean(0), 127.5, atol=2.5)
    assert c.min() == 0 and c.max() == 255


def test_too_many_entities_raises() -> None:
    too_many = np.arange(1, pp.MAX_ENTITIES + 2, dtype=np.int32)
    with pytest.raises(ValueError, match="distinct non-background RGB colours"):
        pp.make_palette(too_many, seed=0)


def test_negative_ids_raise() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        pp.make_palette([-1, 2], seed=0)


def test_same_seed_same_palette_different_seed_different() -> None:
    ids = moving_boxes(4, 32, 32, 10, seed=1)
    assert pp.make_palette(ids, seed=5) == pp.make_palette(ids, seed=5)
    assert pp.make_palette(ids, seed=5) != pp.make_palette(ids, seed=6)
    # The palette depends on the set of ids only, not on how it is given.
    assert pp.make_palette(ids, seed=5) == pp.make_palette(set(np.unique(ids).tolist()), seed=5)
    assert pp.make_palette(torch.from_numpy(ids), seed=5) == pp.make_palette(ids, seed=5)


def test_palette_json_round_trip_and_lookup() -> None:
    pal = pp.make_palette([4, 9, 2], seed=11)
    again = pp.Palette.from_dict(json.loads(json.dumps(pal.to_dict())))
    assert again == pal and hash(again) == hash(pal)
    assert pal.color_of(9) == tuple(int(c) for c in pal.colors[list(pal.ids).index(9)])
    with pytest.raises(KeyError):
        pal.color_of(5)
    with pytest.raises(ValueError):
        pal.colors[0, 0] = 1  # read-only


def test_palette_validation() -> None:
    with pytest.raises(ValueError, match="include 0"):
        pp.Palette(ids=np.array([1, 2]), colors=np.zeros((2, 3), np.uint8))
    with pytest.raises(ValueError, match="unique"):
        pp.Palette(ids=np.array([0, 2, 2]), colors=np.zeros((3, 3), np.uint8))
    with pytest.raises(ValueError, match="shape"):
        pp.Palette(ids=np.array([0, 2]), colors=np.zeros((3, 3), np.uint8))


def test_min_distance_palette() -> None:
    pal = pp.make_palette(range(1, 41), seed=2, min_distance=60.0)
    c = pal.colors.astype(np.float64)
    d = np.sqrt(((c[:, None] - c[None]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    assert d.min() >= 60.0  # includes the distance to the background
    # min_distance = 0 is exactly the paper's palette
    assert pp.make_palette(range(1, 41), seed=2, min_distance=0.0) == pp.make_palette(
        range(1, 41), seed=2
    )


def test_min_distance_infeasible_raises() -> None:
    with pytest.raises(ValueError, match="at most"):
        pp.make_palette(range(1, 201), seed=0, min_distance=150.0)
    with pytest.raises(ValueError, match="still unplaced"):
        pp.make_palette(range(1, 40), seed=0, min_distance=100.0, max_rounds=2)


# ------------------------------------------------------------------------------------------------
# segmentation
# ------------------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ids=id_videos, seed=st.integers(0, 2**31 - 1))
def test_segmentation_round_trip_property(ids: np.ndarray, seed: int) -> None:
    cm, pal = pp.encode_segmentation(ids, seed=seed)
    assert cm.shape == ids.shape + (3,) and cm.dtype == np.uint8
    # with the palette: exact identity
    out = pp.decode_segmentation(cm, pal)
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out, ids)
    # without: identity up to relabelling (tolerance below 1 = exact colours)
    assert is_relabelling(ids, pp.decode_segmentation(cm, tolerance=0.5))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ids=id_videos, seed=st.integers(0, 2**31 - 1))
def test_segmentation_round_trip_without_palette_default_tolerance(
    ids: np.ndarray, seed: int
) -> None:
    # Colours further apart than the merge radius never merge.
    pal = pp.make_palette(ids, seed=seed, min_distance=85.0)
    cm, _ = pp.encode_segmentation(ids, palette=pal)
    assert is_relabelling(ids, pp.decode_segmentation(cm))


def test_decode_without_palette_numbers_by_size() -> None:
    ids = np.zeros((2, 10, 10), np.int32)
    ids[:, :5] = 4  # 100 px
    ids[:, 5:, :3] = 9  # 30 px
    ids[:, 5:, 3:4] = 2  # 10 px
    pal = pp.make_palette(ids, seed=0, min_distance=100.0)
    cm, _ = pp.encode_segmentation(ids, palette=pal)
    out = pp.decode_segmentation(cm)
    assert np.array_equal(np.unique(out[ids == 4]), [1])
    assert np.array_equal(np.unique(out[ids == 9]), [2])
    assert np.array_equal(np.unique(out[ids == 2]), [3])
    assert np.all(out[ids == 0] == 0)
    # min_pixels drops the small entity to background, with or without a palette
    assert np.all(pp.decode_segmentation(cm, min_pixels=20)[ids == 2] == 0)
    dec = pp.decode_segmentation(cm, pal, min_pixels=20)
    assert np.all(dec[ids == 2] == 0) and np.all(dec[ids == 9] == 9)


def test_temporal_stability_moving_entity() -> None:
    ids = moving_boxes(12, 48, 64, 6, seed=4)
    cm, pal = pp.encode_segmentation(ids, seed=9)
    for e in range(1, 7):
        colours = np.unique(cm[ids == e], axis=0)
        assert colours.shape == (1, 3)
        assert tuple(colours[0]) == pal.color_of(e)
        frames = np.flatnonzero((ids == e).any(axis=(1, 2)))
        assert len(frames) == 12  # visible throughout, and moving
    assert not np.array_equal(ids[0] == 1, ids[-1] == 1)


def test_missing_palette_ids_are_named() -> None:
    pal = pp.make_palette([1, 2], seed=0)
    with pytest.raises(ValueError, match=r"\[3, 17\]"):
        pp.encode_segmentation(np.array([[0, 1, 3, 17]]), palette=pal)


def test_decode_rejects_float_colormaps() -> None:
    with pytest.raises(TypeError, match="from_model_range"):
        pp.decode_segmentation(np.zeros((2, 2, 3), np.float32))


@pytest.mark.parametrize("sigma", [6.0, 8.0])
def test_decode_robust_to_noise(sigma: float) -> None:
    tolerance = 40.0  # the default
    ids = moving_boxes(8, 64, 80, 8, seed=2, size=14)
    pal = pp.make_palette(ids, seed=1, min_distance=3 * tolerance)
    cm, _ = pp.encode_segmentation(ids, palette=pal)
    noisy = add_noise(cm, sigma, seed=0)
    acc_pal = float((pp.decode_segmentation(noisy, pal, tolerance=tolerance) == ids).mean())
    assert acc_pal >= 0.99
    free = pp.decode_segmentation(noisy, tolerance=tolerance, min_pixels=20)
    assert free.max() == int((np.bincount(ids.ravel())[1:] >= 20).sum())
    assert matched_accuracy(ids, free) >= 0.99


def test_decode_without_palette_noise_dense_palette() -> None:
    # 30 entities with colours >= 60 apart (a denser palette than 3x tolerance) and sigma 6.
    ids = moving_boxes(8, 64, 96, 30, seed=5, size=12)
    pal = pp.make_palette(ids, seed=2, min_distance=60.0)
    noisy = add_noise(pp.encode_segmentation(ids, palette=pal)[0], 6.0, seed=1)
    assert float((pp.decode_segmentation(noisy, pal) == ids).mean()) >= 0.99
    free = pp.decode_segmentation(noisy, min_pixels=20)
    assert free.max() == int((np.bincount(ids.ravel())[1:] >= 20).sum())  # one entity is ~occluded
    assert matched_accuracy(ids, free) >= 0.99


def test_decode_pixels_far_from_palette_become_background() -> None:
    pal = pp.Palette(ids=np.array([0, 5]), colors=np.array([[0, 0, 0], [200, 0, 0]], np.uint8))
    cm = np.array([[[200, 0, 0], [100, 100, 100], [190, 10, 5]]], np.uint8)
    np.testing.assert_array_equal(pp.decode_segmentation(cm, pal, tolerance=20), [[5, 0, 5]])


# ------------------------------------------------------------------------------------------------
# location-aware baseline
# ------------------------------------------------------------------------------------------------


def test_location_aware_carries_first_frame_colour() -> None:
    t, h, w = 4, 64, 64  # grid 8 -> cells of 8x8 px
    ids = np.zeros((t, h, w), np.int32)
    ids[0, 2:6, 2:6] = 1  # cell (0, 0)
    ids[1:, 58:62, 58:62] = 1  # moved to cell (7, 7)
    ids[1, 26:30, 34:38] = 2  # first appears in frame 1, cell (3, 4)
    ids[2:, 2:6, 2:6] = 2  # then moves to cell (0, 0)
    ids[:, 58:62, 2:6] = 3  # static in cell (7, 0)
    cm, pal = pp.encode_location_aware(ids, grid_size=8)
    c1 = np.unique(cm[ids == 1], axis=0)
    c2 = np.unique(cm[ids == 2], axis=0)
    assert len(c1) == 1 and len(c2) == 1
    assert tuple(c1[0]) == pal.color_of(1) and tuple(c2[0]) == pal.color_of(2)
    # colours come from the first-appearance cell, not the current one
    assert pal.color_of(1) != pal.color_of(2)
    assert pal.color_of(1) != pal.color_of(3)
    assert np.all(cm[ids == 0] == 0)
    # a fresh entity in cell (0, 0) gets entity 1's colour; entity 2 is now there but differs
    ids2 = np.zeros((1, h, w), np.int32)
    ids2[0, 1:4, 1:4] = 7
    cm2, pal2 = pp.encode_location_aware(ids2)
    assert pal2.color_of(7) == pal.color_of(1)


def test_location_aware_entities_in_one_cell_collide() -> None:
    ids = np.zeros((2, 64, 64), np.int32)
    ids[:, 9:11, 9:11] = 1  # both centroids in cell (1, 1)
    ids[:, 13:15, 13:15] = 2
    cm, pal = pp.encode_location_aware(ids, grid_size=8)
    assert pal.color_of(1) == pal.color_of(2)
    # ... and the decoder cannot tell them apart
    dec = pp.decode_segmentation(cm, pal)
    assert set(np.unique(dec[ids > 0]).tolist()) == {1}


def test_location_aware_grid_colours_distinct() -> None:
    for g in (1, 3, 8, 16):
        colours = pp._location_grid_colors(g)
        assert colours.shape == (g * g, 3)
        assert len(np.unique(colours, axis=0)) == g * g
        assert not np.any(np.all(colours == 0, axis=1))


# ------------------------------------------------------------------------------------------------
# depth
# ------------------------------------------------------------------------------------------------


def test_depth_lut_is_spectral_and_cached() -> None:
    lut = pp.depth_lut()
    assert lut.shape == (pp.DEPTH_LUT_SIZE, 3) and lut.dtype == np.uint8
    assert lut is pp.depth_lut()
    cmap = matplotlib.colormaps["Spectral"]
    assert tuple(lut[0]) == tuple(cmap(0.0, bytes=True)[:3])  # far
    assert tuple(lut[-1]) == tuple(cmap(1.0, bytes=True)[:3])  # near
    # encode maps the endpoints onto them
    np.testing.assert_array_equal(pp.encode_depth(np.array([0.0, 1.0], np.float32)), lut[[0, -1]])


def depth_test_values() -> np.ndarray:
    rng = np.random.default_rng(0)
    dense = np.linspace(0.0, 1.0, 255 * 64 + 1)
    return np.concatenate([dense, rng.random(100_000)]).astype(np.float32)


def test_depth_round_trip_noise_free() -> None:
    v = depth_test_values()
    cm = pp.encode_depth(v)
    assert cm.dtype == np.uint8 and cm.shape == v.shape + (3,)
    err_cont = np.abs(pp.decode_depth(cm, "continuous") - v)
    err_near = np.abs(pp.decode_depth(cm, "nearest") - v)
    assert err_cont.max() < 2e-3
    assert err_near.max() <= HALF_STEP + 1e-5
    assert err_cont.mean() < 3e-4  # measured ~2.0e-4
    assert err_near.mean() < 1.1e-3  # measured ~9.8e-4 (uniform in +-1/510)
    # the paper's LUT colours decode to their own depth exactly
    lut_depth = np.arange(256, dtype=np.float32) / 255
    for method in ("nearest", "continuous"):
        np.testing.assert_allclose(pp.decode_depth(pp.depth_lut(), method), lut_depth, atol=1e-6)


def test_depth_round_trip_with_noise() -> None:
    v = depth_test_values()
    noisy = add_noise(pp.encode_depth(v), 3.0, seed=1)
    err_cont = float(np.abs(pp.decode_depth(noisy, "continuous") - v).mean())
    err_near = float(np.abs(pp.decode_depth(noisy, "nearest") - v).mean())
    print(
        f"\ndepth mean abs error, noise sigma 3: continuous {err_cont:.5f}, nearest {err_near:.5f}"
    )
    assert err_cont <= err_near + 2e-4
    assert err_cont < 1e-2 and err_near < 1e-2  # measured ~4.6e-3 / ~4.7e-3


def test_depth_shape_and_range() -> None:
    v = np.random.default_rng(0).random((3, 5, 7)).astype(np.float32)
    cm = pp.encode_depth(v)
    assert cm.shape == (3, 5, 7, 3)
    out = pp.decode_depth(cm)
    assert out.shape == (3, 5, 7) and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.array([0.5, np.nan], np.float32), "NaN"),
        (np.array([-0.01, 0.5]), r"\[0, 1\]"),
        (np.array([1.1]), r"\[0, 1\]"),
    ],
)
def test_depth_invalid_values_raise(bad: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        pp.encode_depth(bad)
    with pytest.raises(ValueError, match=message):
        pp.encode_depth(torch.from_numpy(bad))


def test_depth_tiny_overshoot_is_clipped() -> None:
    cm = pp.encode_depth(np.array([-5e-7, 1 + 5e-7]))
    np.testing.assert_array_equal(cm, pp.depth_lut()[[0, -1]])


def test_decode_depth_bad_method() -> None:
    with pytest.raises(ValueError, match="method"):
        pp.decode_depth(np.zeros((1, 3), np.uint8), method="linear")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------
# model range
# ------------------------------------------------------------------------------------------------


def test_model_range_round_trip() -> None:
    cm = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, -1)
    x = pp.to_model_range(cm)
    assert x.dtype == np.float32 and x.shape == cm.shape
    assert x.min() == -1.0 and x.max() == 1.0
    np.testing.assert_array_equal(pp.from_model_range(x), cm)
    np.testing.assert_array_equal(pp.from_model_range(np.array([-3.0, 5.0, 0.0])), [0, 255, 128])


# ------------------------------------------------------------------------------------------------
# torch == numpy
# ------------------------------------------------------------------------------------------------


def _same(t_out: torch.Tensor, n_out: np.ndarray, device: str) -> None:
    assert isinstance(t_out, torch.Tensor) and t_out.device.type == device
    np.testing.assert_array_equal(t_out.cpu().numpy(), n_out)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_matches_numpy(device: str) -> None:
    ids = moving_boxes(6, 40, 56, 15, seed=3, size=10)
    ids_t = torch.from_numpy(ids).to(device)

    cm, pal = pp.encode_segmentation(ids, seed=4)
    cm_t, pal_t = pp.encode_segmentation(ids_t, seed=4)
    assert pal_t == pal
    _same(cm_t, cm, device)
    cm_t2, _ = pp.encode_segmentation(ids_t, palette=pal)
    _same(cm_t2, cm, device)

    noisy = add_noise(cm, 7.0, seed=5)
    noisy_t = torch.from_numpy(noisy).to(device)
    for kwargs in (
        {"palette": pal},
        {"palette": pal, "min_pixels": 50},
        {},
        {"min_pixels": 30},
        {"merge_radius": 25.0},
    ):
        _same(
            pp.decode_segmentation(noisy_t, **kwargs),
            pp.decode_segmentation(noisy, **kwargs),
            device,
        )

    la, la_pal = pp.encode_location_aware(ids)
    la_t, la_pal_t = pp.encode_location_aware(ids_t)
    assert la_pal_t == la_pal
    _same(la_t, la, device)

    depth = np.random.default_rng(1).random((4, 24, 32)).astype(np.float32)
    dcm = pp.encode_depth(depth)
    _same(pp.encode_depth(torch.from_numpy(depth).to(device)), dcm, device)
    dnoisy = add_noise(dcm, 3.0, seed=2)
    for method in ("nearest", "continuous"):
        _same(
            pp.decode_depth(torch.from_numpy(dnoisy).to(device), method),
            pp.decode_depth(dnoisy, method),
            device,
        )

    x = pp.to_model_range(noisy)
    x_t = pp.to_model_range(noisy_t)
    _same(x_t, x, device)
    _same(pp.from_model_range(x_t * 1.01), pp.from_model_range(x * np.float32(1.01)), device)


@pytest.mark.parametrize("device", DEVICES)
def test_large_video_paths_match_small_video_paths(device: str) -> None:
    # Above 2**20 pixels, colours are deduplicated with a histogram instead of a sort; results
    # must not depend on the path taken.
    ids = moving_boxes(2, 512, 1040, 30, seed=8, size=120)
    assert ids.size >= 2**20
    cm, pal = pp.encode_segmentation(ids, seed=1)
    noisy = add_noise(cm, 5.0, seed=3)
    full = pp.decode_segmentation(noisy, pal)
    half = pp.decode_segmentation(noisy[:1], pal)
    np.testing.assert_array_equal(full[:1], half)
    np.testing.assert_array_equal(pp.decode_segmentation(cm, pal), ids)
    noisy_t = torch.from_numpy(noisy).to(device)
    _same(pp.decode_segmentation(noisy_t), pp.decode_segmentation(noisy), device)
    _same(pp.decode_segmentation(noisy_t, pal), full, device)
    _same(pp.encode_segmentation(torch.from_numpy(ids).to(device), palette=pal)[0], cm, device)
    depth_cm = add_noise(pp.encode_depth((ids % 97).astype(np.float32) / 96), 3.0, seed=4)
    depth_cm_t = torch.from_numpy(depth_cm).to(device)
    for method in ("nearest", "continuous"):
        _same(pp.decode_depth(depth_cm_t, method), pp.decode_depth(depth_cm, method), device)


@pytest.mark.parametrize("device", DEVICES)
def test_unique_colours_come_sorted(device: str) -> None:
    # Clustering searches and breaks ties over the distinct colours in ascending order; it relies
    # on array-api-compat's unique_inverse sorting them (the array API standard leaves order open).
    rng = np.random.default_rng(6)
    rgb = rng.integers(0, 256, (300, 3)).astype(np.uint8)[rng.integers(0, 300, 4000)]  # repeats
    codes_np = (rgb[:, 0].astype(np.int64) << 16) | (rgb[:, 1].astype(np.int64) << 8) | rgb[:, 2]
    for x in (rgb, torch.from_numpy(rgb).to(device)):
        x, xp = pp._as_array(x)
        codes, inverse, counts = (pp._small_to_numpy(a) for a in pp._unique_colors(xp, x))
        np.testing.assert_array_equal(codes, np.unique(codes_np))
        np.testing.assert_array_equal(codes[inverse], codes_np)
        np.testing.assert_array_equal(counts, np.unique(codes_np, return_counts=True)[1])
