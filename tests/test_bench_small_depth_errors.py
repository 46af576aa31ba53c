"""benchmarks/small_depth_errors.py: per-clip diagnostics of depth predictions, here on predictions made
from the exact disparity with known errors, so each diagnostic must point at the error it was given."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import small_depth_errors as sde  # noqa: E402
import small_vae_ceiling  # noqa: E402
from small_vae_ceiling import exact_clip  # noqa: E402

from udpdiff.config import load_params  # noqa: E402

# held-out clips of the small profile: predicted right, with a flat ground, drifting in scale, backwards,
# with every entity at one guessed disparity
CLIPS = ["synth-1234-00033", "synth-1234-00044", "synth-1234-00065", "synth-1234-00069", "synth-1234-00143"]


def test_each_diagnostic_points_at_the_error_it_was_given(tmp_path: Path):
    p = load_params(ROOT / "params.yaml", profile="small")
    exact = {c: exact_clip(p, c) for c in CLIPS}
    preds = {}
    preds[CLIPS[0]] = exact[CLIPS[0]]["depth"]  # right
    flat = exact[CLIPS[1]]["depth"].copy()  # the ground flattened to each frame's mean
    for t in range(len(flat)):
        ground = (exact[CLIPS[1]]["ids"][t] == 0) & (flat[t] > sde.SKY)
        flat[t][ground] = flat[t][ground].mean()
    preds[CLIPS[1]] = flat
    drift = exact[CLIPS[2]]["depth"] * np.linspace(1.0, 3.0, len(flat))[:, None, None]  # scale drifting in time
    preds[CLIPS[2]] = drift / drift.max()
    backwards = exact[CLIPS[3]]["depth"].copy()  # near and far swapped, linearly
    scored = backwards > sde.SKY
    backwards[scored] = backwards[scored].max() + backwards[scored].min() - backwards[scored]
    preds[CLIPS[3]] = backwards
    guessed = exact[CLIPS[4]]["depth"].copy()  # every entity as far as the farthest of them
    entities = exact[CLIPS[4]]["ids"] > 0
    guessed[entities] = guessed[entities].min()
    preds[CLIPS[4]] = guessed
    npz = tmp_path / "dense_predictions.npz"
    np.savez_compressed(npz, **{f"depth/{c}": v.astype(np.float16) for c, v in preds.items()},
                        **{f"segmentation/{c}": exact[c]["ids"] for c in CLIPS})
    out = tmp_path / "errors.json"
    assert sde.main([str(npz), "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["clips"]
    assert sorted(rows) == sorted(CLIPS) and out.with_suffix(".md").exists()
    right, flat_ground, drifting, reversed_, guessed = (rows[c] for c in CLIPS)
    assert right["delta1_depth"] > 0.99 and right["ground_slope"] == pytest.approx(1.0, abs=0.01)
    assert right["ground_r2"] > 0.99 and right["fit_scale"] == pytest.approx(1.0, abs=0.01)
    assert abs(flat_ground["ground_slope"]) < 0.05 and flat_ground["delta1_depth"] < 0.9
    assert flat_ground["delta1_depth_entities_fit"] > 0.95  # the entities alone are right
    # the true ground repairs it; true entities, or entities at their medians, do not
    assert flat_ground["delta1_depth_true_ground"] > 0.99
    assert max(flat_ground["delta1_depth_true_entities"], flat_ground["delta1_depth_entity_medians"]) < 0.9
    assert right["delta1_depth_entity_medians"] > 0.97  # the exact entities are nearly flat already
    # guessed entities: the truth in their place repairs it, the true ground does not
    assert guessed["delta1_depth_true_entities"] > 0.99 and guessed["delta1_depth_true_ground"] < 0.9
    assert guessed["delta1_depth"] < 0.9
    # a drifting scale: a fit per frame repairs what one fit per video cannot
    assert drifting["delta1_depth_per_frame_fit"] > 0.99 > drifting["delta1_depth"]
    assert 0.3 < right["ground_share"] < 1.0
    # read backwards: the fit's negative scale forgives it (δ1 stays), fit_scale and the ground's slope say so
    assert reversed_["delta1"] > 0.99 and reversed_["fit_scale"] < 0 and reversed_["ground_slope"] < 0
    assert drifting["fit_scale"] > 0


def test_a_file_without_depth_predictions_is_named(tmp_path: Path):
    npz = tmp_path / "dense_predictions.npz"
    np.savez(npz, **{"segmentation/synth-1234-00033": np.zeros((2, 4, 4), np.int32)})
    with pytest.raises(SystemExit, match="dense_predictions.npz: no depth/<clip> predictions"):
        sde.main([str(npz)])


def test_entity_summary_tells_seeing_from_guessing():
    p = load_params(ROOT / "params.yaml", profile="small")
    clips = [exact_clip(p, c) for c in CLIPS[:2]]
    exact = sde.entity_depths([(c["depth"], c) for c in clips])
    assert exact["entities"] == sum(len(np.unique(c["ids"])) - 1 for c in clips)
    assert exact["correlation"] > 0.999 and exact["pair_order_right"] == 1.0 and exact["mean_abs_error"] < 1e-6
    assert exact["mean_abs_error_of_the_prior_median"] > 0.05
    assert exact["slope"] == pytest.approx(1.0) and exact["spread"] == pytest.approx(exact["true_spread"])
    # the generator's one metric size: image size shows depth, and exact predictions follow it as the truth does
    assert exact["size_r2_truth"] > 0.8 and exact["size_r2_predicted"] == pytest.approx(exact["size_r2_truth"])
    assert exact["size_slope_ratio"] == pytest.approx(1.0)
    # the truth follows extent, not silhouette area (rings and triangles fill little of theirs)
    assert exact["area_r2_predicted"] == pytest.approx(exact["area_r2_truth"])
    assert exact["area_r2_truth"] < exact["size_r2_truth"]
    area_reader = []  # each entity placed by its silhouette area alone: follows area exactly, extent less
    for c in clips:
        d = c["depth"].copy()
        for row in sde.entity_means(c["depth"], c).itertuples():
            d[c["ids"] == row.id] = 0.01 * row.image_sqrt_area
        area_reader.append((d, c))
    reader = sde.entity_depths(area_reader)
    assert reader["area_r2_predicted"] == pytest.approx(1.0)
    assert reader["size_r2_predicted"] < 0.99
    middle = 0.5  # every entity pulled halfway to one disparity: order kept, slope and spread halved
    halfway = []
    for c in clips:
        d, entities = c["depth"].copy(), c["ids"] > 0
        d[entities] = (d[entities] + middle) / 2
        halfway.append((d, c))
    compressed = sde.entity_depths(halfway)
    assert compressed["pair_order_right"] == 1.0 and compressed["slope"] == pytest.approx(0.5, abs=1e-3)
    assert compressed["spread"] == pytest.approx(compressed["true_spread"] / 2, rel=1e-3)
    assert compressed["size_slope_ratio"] == pytest.approx(0.5, abs=1e-3)
    assert compressed["size_r2_predicted"] == pytest.approx(exact["size_r2_truth"], abs=1e-3)
    flipped = []  # every entity mirrored about the clip's mean entity disparity: near and far swapped
    for c in clips:
        d, entities = c["depth"].copy(), c["ids"] > 0
        d[entities] = 2 * c["depth"][entities].mean() - d[entities]
        flipped.append((d, c))
    wrong = sde.entity_depths(flipped)
    assert wrong["pair_order_right"] == 0.0 and wrong["correlation"] < 0.5


def _entities_shifted(clip: dict, shifts: dict[int, float]) -> np.ndarray:
    d = clip["depth"].copy()
    for entity, shift in shifts.items():
        d[clip["ids"] == entity] += shift
    return d


def test_compare_tells_shared_errors_from_independent_ones(tmp_path: Path):
    """Two runs that put the same entities wrong correlate 1 and gain nothing averaged; runs whose
    errors cancel correlate -1 and their mean is the truth."""
    p = load_params(ROOT / "params.yaml", profile="small")
    clips = {c: exact_clip(p, c) for c in CLIPS[:3]}
    shifts = {c: {int(e): (0.15 if k % 2 else -0.15) for k, e in enumerate(np.unique(x["ids"])) if e}
              for c, x in clips.items()}

    def save(name: str, sign: float) -> Path:
        path = tmp_path / name
        np.savez_compressed(path, **{f"depth/{c}": _entities_shifted(x, {e: sign * v for e, v in shifts[c].items()})
                                     for c, x in clips.items()})
        return path

    a, same, opposite = save("a.npz", 1.0), save("same.npz", 1.0), save("opposite.npz", -1.0)
    shared = sde.compare(p, a, same)
    assert shared["entity_error_correlation"] == pytest.approx(1.0)
    assert shared["delta1_depth_of_the_mean"] == pytest.approx(shared["delta1_depth"]) and shared["delta1_depth"] < 0.99
    cancel = sde.compare(p, a, opposite)
    assert cancel["entity_error_correlation"] == pytest.approx(-1.0)
    assert cancel["delta1_depth_of_the_mean"] > 0.99 > cancel["delta1_depth"]
    out = tmp_path / "errors.json"
    assert sde.main([str(a), "--compare", str(opposite), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["compared"]["entity_error_correlation"] == pytest.approx(-1.0)
    # an ensemble's file: its first member (depth_single/) is compared with --prefix depth_single
    with np.load(a) as single, np.load(opposite) as fused:
        np.savez_compressed(tmp_path / "ensemble.npz", **{k: fused[k] for k in fused.files},
                            **{k.replace("depth/", "depth_single/"): single[k] for k in single.files})
    for prefix, correlation in (("depth", -1.0), ("depth_single", 1.0)):
        compared = sde.compare(p, tmp_path / "ensemble.npz", same, prefix)
        assert compared["entity_error_correlation"] == pytest.approx(correlation)
    np.savez_compressed(tmp_path / "fewer.npz", **{f"depth/{CLIPS[0]}": clips[CLIPS[0]]["depth"]})
    with pytest.raises(SystemExit, match="fewer.npz: lacks 2 of"):
        sde.compare(p, a, tmp_path / "fewer.npz")


def _rings_put_far(clips: list[str], shift: float, tmp_path: Path) -> Path:
    """A dense_predictions.npz of the clips' exact disparity with every ring's lowered by ``shift``."""
    p = load_params(ROOT / "params.yaml", profile="small")
    preds = {}
    for c in clips:
        clip = exact_clip(p, c)
        depth = clip["depth"].copy()
        for e in clip["scene"].entities:
            if e.shape == "ring":
                depth[clip["ids"] == e.id] -= shift
        preds[c] = depth.clip(0, 1)
    npz = tmp_path / "dense_predictions.npz"
    np.savez_compressed(npz, **{f"depth/{c}": v for c, v in preds.items()})
    return npz


def test_by_shape_finds_the_shape_that_is_put_too_far(tmp_path: Path):
    """Every ring's disparity lowered by 0.1, the rest exact: ``by_shape`` puts rings well below 0 and the
    other shapes near it (each clip's scale-and-shift fit takes up part of the rings' error, in a clip
    of a sphere and a big ring most of it)."""
    # two rings among seven entities of four other shapes
    npz = _rings_put_far(["synth-1234-00033", "synth-1234-00069"], 0.1, tmp_path)
    out = tmp_path / "errors.json"
    assert sde.main([str(npz), "--out", str(out)]) == 0
    by_shape = json.loads(out.read_text())["by_shape"]
    ring = by_shape["ring"]["mean_error"]
    assert by_shape["ring"]["entities"] == 2 and -0.1 <= ring < -0.05
    others = [v["mean_error"] for k, v in by_shape.items() if k != "ring"]
    assert len(others) >= 3 and all(abs(e) < 0.04 and e > ring + 0.05 for e in others)
    assert "by shape" in out.with_suffix(".md").read_text()


def test_shape_bias_cost_prices_a_bias_shared_by_clips(tmp_path: Path):
    """Every ring put 0.3 too far in three clips: taking the rings' mean error off repairs δ1, also with
    the bias measured on the other clips only; taking off another shape's (near 0) changes little."""
    npz = _rings_put_far(["synth-1234-00033", "synth-1234-00069", "synth-1234-00107"], 0.3, tmp_path)  # a ring each
    out = tmp_path / "errors.json"
    assert sde.main([str(npz), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    cost, as_predicted = report["shape_bias_cost"], report["mean"]["delta1_depth"]
    assert set(cost) == {"all shapes", *report["by_shape"]} and as_predicted < 0.95
    ring = cost["ring"]
    assert ring["in_sample"] > as_predicted + 0.03 and ring["leave_one_clip_out"] > as_predicted + 0.03
    assert abs(cost["sphere"]["leave_one_clip_out"] - as_predicted) < 0.01
    assert "taken off" in out.with_suffix(".md").read_text()


def test_through_vae_analyses_the_exact_depth_round_trip(tmp_path: Path, random_vae_dir, monkeypatch):
    """``--through-vae``: the clips the predictions name, their exact depth through the VAE instead of the
    predictions. A lossless round trip leaves no shape bias and scores ~1 whatever was predicted; an
    untrained VAE does not."""
    npz = tmp_path / "dense_predictions.npz"
    p = load_params(ROOT / "params.yaml", profile="small")
    # predictions every entity of which is wrong: through the VAE they are not read
    np.savez_compressed(npz, **{f"depth/{c}": np.zeros_like(exact_clip(p, c)["depth"][:9]) for c in CLIPS[:2]})
    out = tmp_path / "vae.json"
    monkeypatch.setattr(small_vae_ceiling, "reconstruct", lambda vae, video: video)
    assert sde.main([str(npz), "--through-vae", str(random_vae_dir), "--out", str(out)]) == 0
    lossless = json.loads(out.read_text())
    assert sorted(lossless["clips"]) == CLIPS[:2] and lossless["through_vae"] == str(random_vae_dir)
    assert all(r["delta1_depth"] > 0.99 for r in lossless["clips"].values())
    assert all(abs(s["mean_error"]) < 0.01 for s in lossless["by_shape"].values())  # colormap quantisation only
    monkeypatch.undo()
    assert sde.main([str(npz), "--through-vae", str(random_vae_dir), "--out", str(out)]) == 0
    untrained = json.loads(out.read_text())
    assert np.mean([r["delta1_depth"] for r in untrained["clips"].values()]) < 0.9
    with pytest.raises(SystemExit):
        sde.main([str(npz), "--through-vae", str(random_vae_dir), "--compare", str(npz)])
