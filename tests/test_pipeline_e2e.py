"""The whole `tiny` pipeline, as a user runs it: `dvc repro` in a fresh copy of the repository.

Checks what each stage produced (files people look at included), that every stage logged an
MLflow run with its metrics and artifacts, that a second `dvc repro` does nothing, and that the
representation round trips are exact where they must be.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import av
import pandas as pd
import pytest

from udpdiff.stage_code import stage_code_digests

STAGES = ["data", "validate", "encode", "autoencoder", "latents", "train", "sample", "evaluate", "report"]
# a clone has none of these stages' outputs (cached by DVC, not in git), so they always run; evaluate
# and report write uncached tables that git holds, and when the clone's upstream outputs come out
# byte-identical to the committed run's, DVC finds those up to date and skips them
ALWAYS_RUN = STAGES[:7]


def _ran(first) -> list[str]:
    return [s for s in STAGES if f"Running stage '{s}'" in first.stdout]


def _frames(path: Path) -> int:
    with av.open(str(path)) as c:
        return sum(1 for _ in c.decode(video=0))


@pytest.fixture(scope="module")
def repro(repro_workspace):
    """`make repro`'s run (the shared session fixture), then plain `dvc repro` in an activated venv
    (ephemeral Prefect per stage): nothing to do."""
    second = repro_workspace.run(sys.executable, "-m", "dvc", "repro", timeout=300)
    return repro_workspace.path, repro_workspace.first_repro, second


@pytest.mark.slow
def test_every_stage_ran_and_the_second_repro_does_nothing(repro):
    work, first, second = repro
    assert _ran(first)[:7] == ALWAYS_RUN, first.stdout[-3000:]
    for stage in STAGES[7:]:
        assert f"Running stage '{stage}'" in first.stdout or f"Stage '{stage}' didn't change" in first.stdout
    assert "Running stage" not in second.stdout
    status = subprocess.run([sys.executable, "-m", "dvc", "status"], cwd=work, capture_output=True, text=True,
                            timeout=120)
    assert "up to date" in status.stdout


@pytest.mark.slow
def test_outputs_people_look_at_exist_and_are_videos(repro, markdown_rows):
    work, _, _ = repro
    out = work / "outputs" / "tiny"
    index = json.loads((out / "samples" / "index.json").read_text())
    tasks = {e["task"] for e in index}
    assert tasks == {"segmentation", "depth"}
    for e in index:
        assert _frames(out / "samples" / e["mp4"]) == 9  # num_frames of the tiny profile
    for task in tasks:
        assert (out / "samples" / f"gallery_{task}.gif").stat().st_size > 0
    assert _frames(out / "previews" / "pixelplanes.mp4") == 9
    for png in ("train_loss.png", "vae_loss.png"):
        assert (out / "metrics" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report" / "report.md").read_text()
    rows = markdown_rows(report)
    assert {"UDPDiff (depth)", "UDPDiff (seg)"} <= {r[0] for r in rows}
    assert ["Model", "SC (↑)", "BC (↑)", "MS† (↑)", "FVD (↓)"] == rows[0][:5]  # the paper's layout, flow prior marked
    assert "Inference time (paper Tab 4)" in report and "CogVideoX (stock architecture)" in report
    assert (out / "report" / "report.html").read_text().startswith("<!doctype html>")
    for name in ("tables.md", "tables.html", "per_video.csv"):
        assert (out / "evaluation" / name).stat().st_size > 0
    assert (work / "models" / "tiny" / "pipeline" / "model_index.json").exists()


@pytest.mark.slow
def test_metrics_are_real_numbers_with_exact_representation_round_trips(repro):
    work, _, _ = repro
    metrics = work / "outputs" / "tiny" / "metrics"
    encode = json.loads((metrics / "encode.json").read_text())
    assert encode["seg_roundtrip_pixel_acc"] == 1.0  # palette decoding is exact without noise
    assert encode["depth_roundtrip_mae"] < 1e-3
    assert json.loads((metrics / "validate.json").read_text())["contract_success"] == 1.0
    vae = json.loads((metrics / "autoencoder.json").read_text())
    assert vae["psnr_rgb"] > 15  # the tiny VAE really reconstructs (random init is ~8 dB)
    # the ceiling of dense prediction through this VAE, scored like the evaluate stage's predictions
    assert 0.0 <= vae["gt_miou_after_vae"] <= 1.0 and 0.0 <= vae["gt_delta1_depth_after_vae"] <= 1.0
    train = json.loads((metrics / "train.json").read_text())
    assert train["steps_done"] == 1000 and train["resumed_across_code_change"] == 0.0
    # each checkpoint records the code that wrote it (a code change then retrains: train.on_code_change)
    last = max((work / "models" / "tiny" / "checkpoints").glob("run-*/step-*"))
    assert json.loads((last / "code.json").read_text()) == stage_code_digests("train")
    history = (metrics / "train_history.csv").read_text().splitlines()
    header = history[0].split(",")
    loss = [float(r.split(",")[header.index("loss")]) for r in history[1:]]
    assert sum(loss[-50:]) / 50 < 0.8 * sum(loss[:50]) / 50  # it learned
    # Fig 8 beside the loss of held-out and training clips at fixed draws, at every validation
    validation = pd.read_csv(metrics / "validation_history.csv")
    for key in ("loss/held_out", "loss/train_clips", "loss_dense/held_out", "loss_dense/train_clips"):
        assert validation[f"val/{key}"].gt(0).all() and validation[f"val/{key}"].notna().all(), key
    assert validation["val/loss/train_clips"].iloc[-1] < validation["val/loss/train_clips"].iloc[0]
    assert (metrics / "validation_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    evaluation = json.loads((work / "outputs" / "tiny" / "evaluation" / "metrics.json").read_text())
    ev = evaluation["metrics"]
    runtime = json.loads((metrics / "runtime.json").read_text())  # Tab 4: a metric, not a dependency
    assert set(runtime) == {"stock", "segmentation", "depth"}
    assert all(r["seconds_per_sample"] > 0 for r in runtime.values())
    for task in ("depth", "segmentation"):
        for key in ("pixel_frame_consistency", "motion_smoothness_flow"):
            assert 0.0 < ev[task][key] <= 1.0
    assert 0.0 <= ev["depth"]["gt_delta1"] <= 1.0 and ev["depth"]["gt_rmse"] > 0
    assert 0.0 <= ev["segmentation"]["gt_miou"] <= 1.0


@pytest.mark.slow
def test_every_stage_logged_an_mlflow_run(repro):
    work, _, _ = repro
    db = sqlite3.connect(work / "mlruns.db")
    runs = dict(db.execute("SELECT name, status FROM runs"))
    ran = _ran(repro[1])
    assert set(ran) <= set(runs), runs
    assert all(runs[name] == "FINISHED" for name in ran)
    # one parent run for the `make repro`, every stage run nested under it
    parents = {name: parent for name, parent in db.execute(
        "SELECT r.name, t.value FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid WHERE t.key='mlflow.parentRunId'")}
    assert {parents.get(s) for s in ran} == {parents.get("data")} != {None}
    parent_name, parent_status = db.execute("SELECT name, status FROM runs WHERE run_uuid=?",
                                            (parents["data"],)).fetchone()
    assert parent_name in ("make repro", "dvc repro") and parent_status == "FINISHED"  # "make repro" under make
    train_id = db.execute("SELECT run_uuid FROM runs WHERE name='train'").fetchone()[0]
    steps = db.execute("SELECT COUNT(*) FROM metrics WHERE run_uuid=? AND key='loss'", (train_id,)).fetchone()[0]
    assert steps >= 100  # per-step loss curve (every log_every=10 steps of 1000)
    params = dict(db.execute("SELECT key, value FROM params WHERE run_uuid=?", (train_id,)))
    assert params["train.lr"] == "0.001" and params["profile"] == "tiny"
    artifacts = list((work / "mlartifacts").rglob("*.gif")) + list((work / "mlartifacts").rglob("*.mp4"))
    assert artifacts, "sample galleries and previews are logged as MLflow artifacts"
    for table, stage in (("tables.md", "evaluate"), ("tables.html", "evaluate"), ("report.html", "report")):
        if stage in ran:  # (a stage DVC skipped logged nothing)
            assert list((work / "mlartifacts").rglob(table)), f"{table} is an MLflow artifact"
    for key in ("lr", "grad_norm", "samples_per_s", "tokens_per_s", "peak_memory_gb"):
        assert db.execute("SELECT COUNT(*) FROM metrics WHERE run_uuid=? AND key=?", (train_id, key)).fetchone()[0]
    # the train run holds its preview grids, its checkpoints and the diffusers export
    train_artifacts = next((work / "mlartifacts").rglob(f"{train_id}/artifacts"))
    previews = sorted(x.name for x in (train_artifacts / "train_samples").iterdir())
    assert previews == ["step-00000500.gif", "step-00001000.gif"], previews
    checkpoints = sorted(x.name for x in (train_artifacts / "checkpoints").iterdir())
    assert checkpoints == [f"step-{s:08d}" for s in (250, 500, 750, 1000)], checkpoints
    assert (train_artifacts / "checkpoints" / "step-00001000" / "mp_rank_00_model_states.pt").exists()
    assert (train_artifacts / "model" / "transformer" / "diffusion_pytorch_model.safetensors").exists()


@pytest.mark.slow
def test_generate_cli_writes_side_by_side_video_and_arrays(repro, repro_workspace):
    import numpy as np

    work, _, _ = repro
    repro_workspace.run(sys.executable, "-m", "udpdiff.cli", "generate", "--prompt", "a red sphere rolls left",
                        "--task", "segmentation", "--steps", "3", "--seed", "7", timeout=300)
    stem = work / "outputs" / "generate" / "segmentation-seed7"
    assert _frames(stem.with_suffix(".mp4")) == 9
    with np.load(stem.with_suffix(".npz")) as z:
        assert z["video"].shape == (9, 48, 48, 3) and z["dense"].shape == (9, 48, 48)
