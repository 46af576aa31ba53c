"""benchmarks/small_seg_errors.py: where segmentation loses mIoU, on predictions made from the exact ids
with known errors, so each column must point at the error it was given."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import small_seg_errors as sse  # noqa: E402
from small_vae_ceiling import exact_clip  # noqa: E402

from udpdiff.config import load_params  # noqa: E402

# held-out clips of the small profile: predicted right, two touching entities merged, one entity missed,
# one entity bleeding onto the background
RIGHT, MERGED, MISSED, BLEEDING = "synth-1234-00044", "synth-1234-00220", "synth-1234-00065", "synth-1234-00247"


def test_each_column_points_at_the_error_it_was_given(tmp_path: Path):
    p = load_params(ROOT / "params.yaml", profile="small")
    exact = {c: exact_clip(p, c)["ids"].astype(np.int32) for c in (RIGHT, MERGED, MISSED, BLEEDING)}
    preds = {c: (ids * 7 + 3) * (ids > 0) for c, ids in exact.items()}  # predicted labels are arbitrary
    preds[MERGED] = np.where(exact[MERGED] == 2, 1, exact[MERGED])  # entity 2 painted as entity 1
    preds[MISSED] = np.where(exact[MISSED] == 1, 0, exact[MISSED])
    bleed = exact[BLEEDING].copy()
    bleed[:, :8][bleed[:, :8] == 0] = 1  # entity 1's colour over the background of the top 8 rows
    preds[BLEEDING] = bleed
    npz = tmp_path / "dense_predictions.npz"
    np.savez_compressed(npz, **{f"segmentation/{c}": v for c, v in preds.items()})
    out = tmp_path / "errors.json"
    assert sse.main([str(npz), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = {(e["clip"], e["entity"]): e for e in report["entities"]}
    for e in (e for (c, _), e in rows.items() if c == RIGHT):
        assert e["iou"] == 1.0 and e["hit"] == 1.0 and e["spill"] == 0.0 and not e["merged"]
    one, two = rows[(MERGED, 1)], rows[(MERGED, 2)]
    assert one["merged"] and two["merged"]
    lost = min((one, two), key=lambda e: e["iou"])  # the entity the merged segment is not matched to
    assert lost["to_other_entity"] == 1.0 and lost["iou"] == 0.0
    missed = rows[(MISSED, 1)]
    assert missed["to_background"] == 1.0 and missed["iou"] == 0.0 and not missed["merged"]
    assert rows[(MISSED, 2)]["iou"] == 1.0
    bleeding = rows[(BLEEDING, 1)]
    assert bleeding["hit"] == 1.0 and 0.0 < bleeding["spill"] < 1.0 and bleeding["iou"] == pytest.approx(
        1.0 - bleeding["spill"])
    for e in report["entities"]:  # where each entity's pixels went sums to all of them
        assert e["hit"] + e["to_background"] + e["to_other_entity"] + e["to_unmatched"] == pytest.approx(1.0)
    assert report["all"][0]["entities"] == len(report["entities"])
    assert sum(r["entities"] for r in report["by_size"]) == len(report["entities"])
    assert "by_shape" in out.with_suffix(".md").read_text()


def test_a_file_without_segmentation_predictions_is_named(tmp_path: Path):
    npz = tmp_path / "dense_predictions.npz"
    np.savez(npz, **{"depth/synth-1234-00033": np.zeros((2, 4, 4), np.float16)})
    with pytest.raises(SystemExit, match="dense_predictions.npz: no segmentation/<clip> predictions"):
        sse.main([str(npz)])
