"""udpdiff.evaluation.validation_curves: the paper's Fig 8 across an ablation's variants, from histories laid
out as the train stage's validation_history.csv."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from udpdiff.evaluation import validation_curves


def test_a_curve_per_variant_and_score_it_has_and_nothing_without_any(tmp_path: Path, monkeypatch) -> None:
    """A column that is all NaN (a single-task model's other task) draws no curve, and neither does a
    variant without dense scores (the RGB-only model)."""
    histories = {
        "udpdiff-multi-task": pd.DataFrame({"step": [1750, 3500], "val/segmentation/gt_miou": [0.50, 0.60],
                                            "val/depth/gt_delta1_depth": [0.72, 0.68],
                                            "val/loss/held_out": [0.1, 0.09]}),
        "udpdiff-segmentation": {"step": [1750, 3500], "val/segmentation/gt_miou": [0.47, 0.61],
                                 "val/depth/gt_delta1_depth": [float("nan")] * 2},
        "cogvideox": pd.DataFrame({"step": [1750, 3500], "val/loss/held_out": [0.1, 0.08]}),
    }
    drawn = {}
    real = validation_curves.plot_curves
    monkeypatch.setattr(validation_curves, "plot_curves",
                        lambda path, series, **kw: drawn.update(series) or real(path, series, **kw))
    path = validation_curves.plot_validation_scores(tmp_path / "fig8.png", histories)
    assert sorted(drawn) == ["udpdiff-multi-task: depth δ1", "udpdiff-multi-task: seg mIoU",
                             "udpdiff-segmentation: seg mIoU"]
    assert list(drawn["udpdiff-segmentation: seg mIoU"][1]) == [0.47, 0.61]
    assert path == tmp_path / "fig8.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rgb_only = {"cogvideox": histories["cogvideox"]}
    assert validation_curves.plot_validation_scores(tmp_path / "none.png", rgb_only) is None
    assert not (tmp_path / "none.png").exists()
