"""The evaluate and report steps: perfect dense predictions score perfectly, configured metric
models (tiny random DINO/CLIP, a TorchScript I3D stand-in) add SC, BC and FVD, and the report
shows them in the paper's layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from udpdiff import pixelplanes
from udpdiff.config import load_params
from udpdiff.data.synthetic import synthesize_dataset
from udpdiff.io.dense import load_depth, load_ids
from udpdiff.io.manifest import read_manifest, resolve
from udpdiff.io.video import read_video
from udpdiff.paths import ProjectPaths
from udpdiff.steps import evaluate, report

REPO = Path(__file__).resolve().parents[1]


def _metric_models(tmp_path: Path) -> dict[str, str]:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection, ViTConfig, ViTModel

    from tests.test_eval_consistency import _FakeI3D

    torch.manual_seed(0)
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       image_size=224, patch_size=16), add_pooling_layer=False).save_pretrained(tmp_path / "dino")
    CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                   num_attention_heads=2, image_size=224, patch_size=32,
                                                   projection_dim=16)).save_pretrained(tmp_path / "clip")
    torch.jit.script(_FakeI3D()).save(str(tmp_path / "i3d.pt"))
    return {"dino": str(tmp_path / "dino"), "clip": str(tmp_path / "clip"), "i3d": str(tmp_path / "i3d.pt")}


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_perfect_predictions_score_perfectly_and_configured_models_add_columns(tmp_path):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["profiles"]["tiny"]["evaluate"] = _metric_models(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    p = load_params(tmp_path / "params.yaml")
    paths = ProjectPaths(tmp_path, "tiny")
    synthesize_dataset(paths.clips, num_clips=4, num_frames=9, height=48, width=48, fps=8, seed=3, val_fraction=0.5)
    df = read_manifest(paths.manifest)
    index = []
    for task in ("segmentation", "depth"):
        for row in df[df.split == "val"].itertuples():
            video = read_video(resolve(paths.manifest, row.video_path))
            gt = (load_ids(resolve(paths.manifest, row.seg_path)) if task == "segmentation"
                  else load_depth(resolve(paths.manifest, row.depth_path)))
            colormap = (pixelplanes.encode_segmentation(gt, seed=0)[0] if task == "segmentation"
                        else pixelplanes.encode_depth(gt))
            npz = paths.samples / task / f"{row.clip_id}.npz"
            npz.parent.mkdir(parents=True, exist_ok=True)
            # the "generated" video is the real clip and the prediction is the ground truth
            np.savez(npz, video=video, colormap=colormap, dense=gt, conditioned_colormap=colormap,
                     conditioned_dense=gt)
            index.append({"task": task, "clip_id": row.clip_id, "npz": f"{task}/{row.clip_id}.npz"})
    (paths.samples / "index.json").write_text(json.dumps(index))

    result = evaluate(p, paths)
    m = result.metrics
    assert m["depth/gt_delta1"] == pytest.approx(1.0) and m["depth/gt_rmse"] == pytest.approx(0.0, abs=1e-5)
    assert m["segmentation/gt_miou"] == pytest.approx(1.0)
    assert m["segmentation/gt_temporal_id_consistency"] == pytest.approx(1.0)
    for task in ("segmentation", "depth"):
        assert 0.0 < m[f"{task}/subject_consistency"] <= 1.0
        assert 0.0 < m[f"{task}/background_consistency"] <= 1.0
        assert m[f"{task}/fvd"] == pytest.approx(0.0, abs=1e-3)  # generated == real
        # generated videos are the real ones: the same weight-free scores as the reference row
        assert m[f"{task}/pixel_frame_consistency"] == pytest.approx(m["real/pixel_frame_consistency"])
    notes = json.loads((paths.metrics / "eval.json").read_text())["notes"]
    assert not any("not configured" in n for n in notes)

    report(p, paths)
    text = (paths.report / "report.md").read_text()
    header = next(line for line in text.splitlines() if line.startswith("| model | subject_consistency"))
    assert "fvd" in header and "background_consistency" in header


def test_missing_metric_weights_are_a_note_and_the_rest_still_runs(tmp_path):
    from udpdiff.steps import _metric_models

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["profiles"]["tiny"]["evaluate"] = {"dino": str(tmp_path / "absent-dino"), "clip": None,
                                           "i3d": str(tmp_path / "absent.pt")}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    extractors, notes = _metric_models(load_params(tmp_path / "params.yaml"))
    assert extractors == {}
    assert any("absent-dino" in n for n in notes) and any("absent.pt" in n for n in notes)
    assert any(n.startswith("clip: not configured") for n in notes)
