"""benchmarks/small_gpu.py: the small profile's stages and Tab 1/2 variants without the orchestration
tools, here on the CPU with sizes a test can afford (the architecture, stages and files are the GPU run's)."""

from __future__ import annotations

import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import small_gpu  # noqa: E402

# the small profile shrunk to CPU seconds: fewer, smaller clips and a one-block transformer
CPU_SIZES = [
    "data.num_clips=12", "data.num_frames=9", "data.height=32", "data.width=32", "data.val_fraction=0.25",
    "vae.config={block_out_channels: [16, 32, 32], layers_per_block: 1, norm_num_groups: 8, latent_channels: 16,"
    " temporal_compression_ratio: 4}",
    "vae.train.steps=2", "vae.train.batch_size=2",
    "transformer.config={num_attention_heads: 2, attention_head_dim: 16, time_embed_dim: 32, text_embed_dim: 64,"
    " num_layers: 1, sample_height: 8, sample_width: 8, sample_frames: 9, patch_size: 2, max_text_seq_length: 128,"
    " use_rotary_positional_embeddings: true}",
    "train.steps=2", "train.micro_batch_size=2", "train.sample_every=2", "train.validation_clips=2",
    "train.validation_videos=2",
    "train.checkpoint_every=2", "train.precision=fp32", "sample.num_samples=2", "sample.num_inference_steps=2",
    "sample.gallery_size=1", "sample.runtime_trials=0", "sample.dense_ensemble_size=2", "evaluate.batch_size=2",
    "text_encoder.pretrain.steps=4", "text_encoder.pretrain.batch_size=4",
]


OVERRIDES = [a for kv in CPU_SIZES for a in ("--set", kv)]
NAMES = ["udpdiff-multi-task", "cogvideox"]  # of Tabs 1-2
VOLUME = 2**20  # the tarball volumes' limit: the run's small files fill several
# in the rgb-given and token-size tables (and more): under small's defaults the settings of Tabs 1-2's multi-task
OURS = "udpdiff-multi-task-rgb-given"


@pytest.fixture(scope="module")
def gpu_run(tmp_path_factory) -> tuple[Path, Path]:
    """A whole small_gpu.py run (two variants sharing one "GPU"); then the rgb-given and token-size
    tables' shared variant, whose settings are the multi-task one's under small's defaults, so it
    samples that model without a training of its own; and the tarball of all, in volumes of at most
    VOLUME bytes (as a GPU machine's 16 MiB return limit splits a real run's)."""
    tmp_path = tmp_path_factory.mktemp("small_gpu")
    root, tarball = tmp_path / "run", tmp_path / "out.tar.gz"
    assert small_gpu.main(["all", "--root", str(root), "--gpus", "1", "--per-gpu", "2",
                           "--variants", *NAMES, *OVERRIDES]) == 0
    assert small_gpu.main(["variants", "--root", str(root), "--gpus", "1", "--tables", "tab1-2", "rgb-given",
                           "token-size", "--variants", NAMES[0], OURS, *OVERRIDES]) == 0
    small_gpu.main(["pack", "--root", str(root), "--out", str(tarball)])
    return root, small_gpu.pack(root, tmp_path / "volume.tar.gz", max_bytes=VOLUME)


@pytest.mark.slow
def test_prepare_variants_and_pack(gpu_run):
    root, volumes = gpu_run
    names, overrides = NAMES, OVERRIDES
    for stage in small_gpu.PREPARE:
        assert (root / "outputs/small/gpu_run" / f"{stage}.done.json").exists()
    for name in names:
        v = root / "variants" / name
        assert (v / "data/small").resolve() == (root / "data/small").resolve()  # shared, not redone
        for stage in small_gpu.PER_VARIANT:
            record = json.loads((v / "outputs/small/gpu_run" / f"{stage}.done.json").read_text())
            assert record["seconds"] > 0 and record["gpu"] == "cpu"
        scores = json.loads((v / "outputs/small/evaluation/metrics.json").read_text())["metrics"]
        assert set(scores) == ({"segmentation", "depth", "real"} if name == "udpdiff-multi-task" else {"rgb", "real"})
        steps = [json.loads(line) for line in (v / "outputs/small/gpu_run/train_steps.jsonl").read_text().splitlines()]
        assert max(r["step"] for r in steps if "loss" in r) == 2  # the per-step series reached the last step
        assert any(k.startswith("val/") for r in steps for k in r)  # the Fig 8 scores at the preview
    with tarfile.open(root.parent / "out.tar.gz") as tar:
        whole = tar.getnames()
    assert len(volumes) > 1 and volumes[1].name == "volume-2.tar.gz"
    assert all(v.stat().st_size <= VOLUME for v in volumes)
    in_volumes = []
    for v in volumes:
        with tarfile.open(v) as tar:
            in_volumes += tar.getnames()
    assert sorted(in_volumes) == sorted(whole)  # every file once, nothing lost to the split
    with tarfile.open(volumes[0]) as tar:  # the first volume, the smallest files, holds every metric
        assert {n for n in whole if n.endswith("metrics.json")} <= set(tar.getnames())
    packed = set(whole)
    assert "variants/udpdiff-multi-task/outputs/small/evaluation/metrics.json" in packed
    assert "variants/cogvideox/outputs/small/metrics/train_history.csv" in packed
    assert not any(n.endswith((".pt", ".safetensors", ".mp4")) for n in packed)  # small files only
    # of the .npz files, only each dense model's predictions of the real clips, every task and clip in one
    assert {n for n in packed if n.endswith(".npz")} == {
        f"variants/{n}/outputs/small/metrics/dense_predictions.npz" for n in ("udpdiff-multi-task", OURS)}
    samples = root / "variants/udpdiff-multi-task/outputs/small/samples"
    with np.load(samples.parent / "metrics/dense_predictions.npz") as predicted:
        made = [f"{f.parent.name}/{f.stem}" for f in samples.glob("*/*.npz")]
        ensembled = [f"{k.split('/')[0]}_{part}/{k.split('/')[1]}" for k in made for part in
                     ("single", "uncertainty")]  # the profile's ensemble: its first member, its disagreement
        assert ensembled and sorted(predicted) == sorted(made + ensembled)
        for key in made:
            with np.load(samples / f"{key}.npz") as sample:
                exact = sample["conditioned_dense"]
                if key.startswith("segmentation/"):  # entity ids, exactly
                    assert np.array_equal(predicted[key], exact) and predicted[key].dtype == np.int32
                else:  # depth, to float16's precision
                    np.testing.assert_allclose(predicted[key].astype(np.float32), exact, rtol=1e-3, atol=1e-4)

    # a second run finds every stage done and redoes nothing
    before = {f: f.stat().st_mtime_ns for f in (root / "variants").rglob("*.done.json")}
    assert small_gpu.main(["variants", "--root", str(root), "--gpus", "1", "--variants", *names, *overrides]) == 0
    assert {f: f.stat().st_mtime_ns for f in (root / "variants").rglob("*.done.json")} == before


@pytest.mark.slow
def test_variants_that_differ_only_in_sampling_share_one_training(gpu_run, tmp_path):
    """The reconstruction-guidance table: the joint multi-task variant trains; the guided variants link
    its model (no training of their own), carry its training records and sample and score it anew,
    with guidance, so their dense predictions of real clips differ from the unguided ones."""
    import shutil

    # on a copy: the module's run stays as the other tests expect it (its variants record their tables)
    root = shutil.copytree(gpu_run[0], tmp_path / "run", symlinks=True)
    joint = "udpdiff-multi-task-joint"
    guided = [f"{joint}-guided-1", f"{joint}-guided-10"]
    # --per-gpu 2: each process's threads as the fixture's (one each), so the text-to-video samples compare
    # bit for bit; at another thread count the CPU's reductions may round one pixel differently
    assert small_gpu.main(["variants", "--root", str(root), "--gpus", "1", "--per-gpu", "2",
                           "--tables", "reconstruction-guidance", "--variants", joint, *guided,
                           *OVERRIDES]) == 0
    base = root / "variants" / joint
    trained = base / "outputs/small/gpu_run/train.done.json"
    for name in guided:
        v = root / "variants" / name
        assert (v / "models/small/pipeline").resolve() == (base / "models/small/pipeline").resolve()
        assert not (v / "models/small/checkpoints").exists()
        info = json.loads((v / "outputs/small/gpu_run/variant.json").read_text())
        assert info["trained_by"] == joint and info["tables"] == ["reconstruction-guidance"]
        assert (v / "outputs/small/gpu_run/train.done.json").read_bytes() == trained.read_bytes()
        for stage in small_gpu.PER_VARIANT[1:]:
            assert (v / "outputs/small/gpu_run" / f"{stage}.done.json").exists()
        for task in ("depth", "segmentation"):
            ours = np.load(v / f"outputs/small/samples/{task}/{_first_clip(v, task)}.npz")
            plain = np.load(base / f"outputs/small/samples/{task}/{_first_clip(v, task)}.npz")
            assert np.array_equal(ours["video"], plain["video"])  # text-to-video: the same model, seed, sampler
            # the guided dense prediction differs, shown on depth: the one-block model's entity maps decode to
            # one entity covering the frame, guided or not (and ensembles store them decoded and re-encoded)
            if task == "depth":
                assert not np.array_equal(ours["conditioned_dense"], plain["conditioned_dense"])
    with pytest.raises(SystemExit, match="differ in more than sample"):
        small_gpu.resample_variant(root, OURS, joint, OVERRIDES[1::2], ["rgb-given"])


@pytest.mark.slow
def test_training_clips_are_predicted_with_the_held_out_clips_model(gpu_run, tmp_path):
    """The train-vs-held-out table: the training clips' variant samples the RGB-given model (not
    retrained) on clips of the training split, and scores them against their exact ground truth, as
    the held-out variant scores validation clips."""
    import shutil

    import pandas as pd

    root = shutil.copytree(gpu_run[0], tmp_path / "run", symlinks=True)
    name = OURS + "-train-clips"
    trained = root / "variants" / OURS / "outputs/small/gpu_run/train.done.json"
    before = trained.stat().st_mtime_ns
    assert small_gpu.main(["variants", "--root", str(root), "--gpus", "1", "--tables", "train-vs-held-out",
                           "--variants", OURS, name, *OVERRIDES]) == 0
    assert trained.stat().st_mtime_ns == before  # one training serves both
    manifest = pd.read_parquet(root / "data/small/clips/manifest.parquet").set_index("clip_id")
    for variant, split, trainer in ((OURS, "val", NAMES[0]), (name, "train", OURS)):
        v = root / "variants" / variant
        assert json.loads((v / "outputs/small/gpu_run/variant.json").read_text())["trained_by"] == trainer
        clips = {e["clip_id"] for e in json.loads((v / "outputs/small/samples/index.json").read_text())}
        assert clips and {manifest.loc[c, "split"] for c in clips} == {split}
        scores = json.loads((v / "outputs/small/evaluation/metrics.json").read_text())["metrics"]
        assert 0.0 <= scores["segmentation"]["gt_miou"] <= 1.0 and 0.0 <= scores["depth"]["gt_delta1_depth"] <= 1.0
        with np.load(v / "outputs/small/metrics/dense_predictions.npz") as predictions:  # what the CPU scripts read
            assert {k.split("/", 1)[1] for k in predictions.files} == clips


@pytest.mark.slow
def test_a_variant_on_two_gpus_runs_its_stages_under_torchrun(gpu_run, tmp_path, monkeypatch):
    """``--gpus-per-variant 2``: one variant's train, sample and evaluate stages run on two ranks
    (torchrun, here two CPU processes), rank 0 writing what a one-process run writes; a second run
    finds them done. Rank variables left in the caller's environment (DeepSpeed sets them in a
    process that trained in-process, as this test session has) do not make the variant a rank."""
    import shutil

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")

    root = shutil.copytree(gpu_run[0], tmp_path / "run", symlinks=True)
    name = "udpdiff-multi-task-rgb-given-patch-1"  # the token-size table's: trained by no earlier run
    args = ["variants", "--root", str(root), "--gpus", "2", "--gpus-per-variant", "2", "--tables", "token-size",
            "--variants", name, *OVERRIDES]
    assert small_gpu.main(args) == 0, (root / f"logs/{name}.log").read_text()[-4000:]
    v = root / "variants" / name / "outputs/small"
    assert json.loads((v / "gpu_run/variant.json").read_text())["gpus"] == 2
    for stage in small_gpu.PER_VARIANT:
        record = json.loads((v / "gpu_run" / f"{stage}.done.json").read_text())
        assert record["ranks"] == (2 if stage != "report" else 1), stage
    steps = [json.loads(line) for line in (v / "gpu_run/train_steps.jsonl").read_text().splitlines()]
    trained = [r for r in steps if "tokens_per_s" in r]
    assert trained and all(r["tokens_per_s"] == pytest.approx(2 * r["tokens_per_s_per_gpu"]) for r in trained)
    assert max(r["step"] for r in steps if "loss" in r) == 2  # logged once per step, by rank 0 alone
    assert len([r for r in steps if r.get("step") == 2 and "loss" in r]) == 1
    scores = json.loads((v / "evaluation/metrics.json").read_text())["metrics"]
    assert set(scores) == {"segmentation", "depth", "real"}
    log = (root / f"logs/{name}.log").read_text()
    assert "train: launching" in log and "--nproc_per_node 2" in log
    before = {f: f.stat().st_mtime_ns for f in v.rglob("*.done.json")}
    assert small_gpu.main(args) == 0
    assert {f: f.stat().st_mtime_ns for f in v.rglob("*.done.json")} == before
    with pytest.raises(SystemExit, match="needs as many GPUs"):
        small_gpu.run_variants(root, OVERRIDES[1::2], [name], gpus=1, tables=["token-size"], gpus_per_variant=2)


def test_variants_of_equal_training_settings_are_one_training_whatever_their_names():
    """small_gpu.py keys a training on the settings a variant gives the profile (less sample.*), as DVC's
    run cache does: under small's defaults Tabs 1-2's multi-task, model-size's 6 layers and the
    rgb-given table's 0.5 are one model; the guided variants are the joint one's; other depths are not."""
    base = small_gpu.load([])  # small's own sizes (CPU_SIZES sets the depth): only settings, nothing is built
    table = small_gpu.variants(base, ["tab1-2", "model-size", "rgb-given", "reconstruction-guidance"])
    key = {name: small_gpu.train_key(base, o) for name, o in table.items()}
    assert key["udpdiff-multi-task"] == key["udpdiff-multi-task-rgb-given-6-layers"] == key[OURS]
    assert key["udpdiff-multi-task-joint"] == key["udpdiff-multi-task-joint-guided-10"] != key[OURS]
    assert len({key[n] for n in ("udpdiff-multi-task", "udpdiff-multi-task-rgb-given-12-layers",
                                 "udpdiff-multi-task-rgb-given-80", "cogvideox", "udpdiff-depth")}) == 5
    # a profile-wide override reaches every key alike; a variant's own override of the same key wins
    other = small_gpu.load(["train.rgb_given_prob=0.0"])
    assert small_gpu.train_key(other, table["udpdiff-multi-task"]) == key["udpdiff-multi-task-joint"]
    assert small_gpu.train_key(other, table[OURS]) == key[OURS]


def test_a_resumed_stage_replaces_the_steps_it_redoes_in_the_series(tmp_path):
    """Killed after logging step 30 with its last checkpoint at 20, a training resumes at 21 and logs
    step 30 again (and the validation at 20 stays): each step once, the resumed process's values."""
    path = tmp_path / "train_steps.jsonl"
    first = small_gpu.step_series(path)
    for step in (10, 20, 30):
        first({"loss": 1.0}, step)
    first({"val/gt_miou": 0.5}, 20)
    resumed = small_gpu.step_series(path)
    resumed({"loss": 2.0}, 30)
    resumed({"loss": 2.0}, 40)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows == [{"step": 10, "loss": 1.0}, {"step": 20, "loss": 1.0}, {"step": 20, "val/gt_miou": 0.5},
                    {"step": 30, "loss": 2.0}, {"step": 40, "loss": 2.0}]
    # a process that logs on (no resume) only appends
    resumed({"loss": 3.0}, 20)
    assert len(path.read_text().splitlines()) == 6


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch) -> Path:
    """A fresh MLflow store under ``tmp_path`` for an import, with no parent run from the environment."""
    monkeypatch.setenv("UDPDIFF_MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlruns.db'}")
    monkeypatch.setenv("UDPDIFF_MLFLOW_ARTIFACT_ROOT", str(tmp_path / "mlartifacts"))
    monkeypatch.delenv("UDPDIFF_MLFLOW_PARENT_RUN_ID", raising=False)
    return tmp_path


def _unpacked(volumes: list[Path], dest: Path) -> Path:
    """The run's tarball volumes unpacked into ``dest``, as one folder."""
    for volume in volumes:
        with tarfile.open(volume) as tar:
            tar.extractall(dest, filter="data")
    return dest


def _first_clip(workspace: Path, task: str) -> str:
    index = json.loads((workspace / "outputs/small/samples/index.json").read_text())
    return next(e["clip_id"] for e in index if e["task"] == task)


@pytest.mark.slow
def test_import_run_logs_the_ablation_to_mlflow(gpu_run, tmp_path, mlflow_store):
    """The packed run, replayed into MLflow: the table's parent run, the shared stages beneath it, a
    child per variant holding its stage runs with their per-step series, and the ablation table."""
    import mlflow

    from flows.gpu_import import import_run

    _, volumes = gpu_run
    parent_id = import_run(volumes, table_dir=tmp_path / "ablations")
    client = mlflow.MlflowClient()
    parent = client.get_run(parent_id)
    assert parent.data.tags["kind"] == "ablation" and parent.data.tags["machine"] == "cpu"
    experiment = parent.info.experiment_id

    def children(run_id: str) -> dict[str, mlflow.entities.Run]:
        runs = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{run_id}'")
        return {r.info.run_name: r for r in runs}

    top = children(parent_id)
    assert set(top) == {*small_gpu.PREPARE, *NAMES}
    assert top["autoencoder"].data.metrics["psnr_rgb"] > 0
    assert len(client.get_metric_history(top["autoencoder"].info.run_id, "vae_loss")) >= 1  # its per-step series
    stages = children(top["udpdiff-multi-task"].info.run_id)
    assert set(stages) == {f"{s} · udpdiff-multi-task" for s in small_gpu.PER_VARIANT}
    train = stages["train · udpdiff-multi-task"]
    assert train.data.tags["finished"] == "true" and train.data.params["train.steps"] == "2"
    assert [m.step for m in client.get_metric_history(train.info.run_id, "loss")] == [2]
    assert client.get_metric_history(train.info.run_id, "val/segmentation/gt_miou")  # Fig 8's series
    # the validation previews and the real clips' predictions, packed beside the stages, come along
    assert any(a.path.endswith(".gif") for a in client.list_artifacts(train.info.run_id))
    evaluated = {a.path for a in client.list_artifacts(stages["evaluate · udpdiff-multi-task"].info.run_id)}
    assert small_gpu.DENSE_PREDICTIONS in evaluated
    variant = top["udpdiff-multi-task"].data.metrics
    assert 0 <= variant["segmentation/gt_miou"] <= 1 and "depth/gt_delta1_depth" in variant
    assert "ablation_table.json" in {a.path for a in client.list_artifacts(parent_id)}
    assert (tmp_path / "ablations").is_dir()
    # the other two tables in the tarball: a parent each, both holding the one run of their shared variant;
    # one row is no comparison, so neither makes a table, and each says why
    parents = client.search_runs([experiment], "tags.kind = 'ablation'")
    ours = {r.data.tags["table"]: r for r in parents if r.info.run_id != parent_id}
    assert set(ours) == {"rgb-given", "token-size"}
    for run in ours.values():
        assert set(children(run.info.run_id)) == {*small_gpu.PREPARE, OURS}
        assert "ablation_table.json" not in {a.path for a in client.list_artifacts(run.info.run_id)}
        assert run.data.tags["incomplete"] == "1 of 1 variants evaluated: no table"
    info = json.loads((gpu_run[0] / "variants" / OURS / "outputs/small/gpu_run/variant.json").read_text())
    assert info["tables"] == ["rgb-given", "token-size"]
    # the same tarballs again: nothing logged twice; with replace, logged anew and the first import deleted
    assert import_run(volumes, table_dir=tmp_path / "ablations") == parent_id
    # the first volume alone is the same run: the volumes beside it come along
    assert len(volumes) > 1 and import_run(volumes[0], table_dir=tmp_path / "ablations") == parent_id
    assert len(client.search_runs([experiment], "tags.kind = 'ablation'")) == 3
    again = import_run(volumes, table_dir=tmp_path / "ablations", replace=True)
    assert again != parent_id and client.get_run(parent_id).info.lifecycle_stage == "deleted"
    assert client.get_run(train.info.run_id).info.lifecycle_stage == "deleted"  # its descendants with it
    assert len(client.search_runs([experiment], "tags.kind = 'ablation'")) == 3
    assert set(children(again)) == {*small_gpu.PREPARE, *NAMES}


def _session_tarball(unpacked: Path, out: Path, variants: list[str]) -> Path:
    """A tarball of the run as a session that trained only ``variants`` would have packed it."""
    out.parent.mkdir(parents=True)
    with tarfile.open(out, "w:gz") as tar:
        for f in sorted(unpacked.rglob("*")):
            rel = f.relative_to(unpacked)
            if f.is_file() and (rel.parts[0] != "variants" or rel.parts[1] in variants):
                tar.add(f, arcname=str(rel))
    return out


@pytest.mark.slow
def test_runs_of_several_sessions_import_as_one_table(gpu_run, tmp_path, mlflow_store):
    """One lent session trains one small variant: the sessions' tarballs, imported together, are one
    table; sessions that prepared other data or another VAE, or trained one variant twice, are refused."""
    import mlflow

    from flows.gpu_import import import_run

    unpacked = _unpacked(gpu_run[1], tmp_path / "unpacked")
    first = _session_tarball(unpacked, tmp_path / "session-a/small.tar.gz", [NAMES[0]])
    second = _session_tarball(unpacked, tmp_path / "session-b/small.tar.gz", [NAMES[1]])
    parent_id = import_run([first, second], table_dir=tmp_path / "ablations")
    client = mlflow.MlflowClient()
    parent = client.get_run(parent_id)
    assert parent.data.tags["table"] == "tab1-2" and "incomplete" not in parent.data.tags
    assert parent.data.tags["tarball"] == "session-a/small.tar.gz, session-b/small.tar.gz"
    runs = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'")
    assert {r.info.run_name for r in runs} == {*small_gpu.PREPARE, *NAMES}
    table = json.loads(Path(client.download_artifacts(parent_id, "ablation_table.json", str(tmp_path))).read_text())
    column = table["columns"].index("variant")  # mlflow.log_table's layout: columns, and rows of data
    assert {row[column] for row in table["data"]} == set(NAMES)  # a row from each session
    # beside it, the RGB-only baseline minus the full method clip by clip, across the two sessions' scores
    paired = json.loads(Path(client.download_artifacts(parent_id, "ablation_paired.json", str(tmp_path))).read_text())
    rows = {(r["reference"], r["variant"], r["sets"], r["metric"]): r
            for r in (dict(zip(paired["columns"], d, strict=True)) for d in paired["data"])}
    scores = {n: pd.read_csv(unpacked / "variants" / n / "outputs/small/evaluation/per_video.csv") for n in NAMES}
    ms = {n: s.set_index(["set", "clip_id"])["motion_smoothness_flow"] for n, s in scores.items()}
    for task in ("segmentation", "depth"):
        row = rows[(NAMES[0], "cogvideox", f"{task} / rgb", "motion_smoothness_flow")]
        expected = (ms["cogvideox"].loc["rgb"] - ms[NAMES[0]].loc[task]).dropna()
        assert row["n"] == len(expected) >= 2 and row["difference"] == pytest.approx(expected.mean())
        # and Tab 1's view, against the RGB-only model: the same pairs the other way round
        tab1 = rows[("cogvideox", NAMES[0], f"rgb / {task}", "motion_smoothness_flow")]
        assert tab1["difference"] == pytest.approx(-row["difference"])
    # and Fig 8 across the variants, from their validation histories
    assert {"ablation/tab1-2-paired.md", "ablation/tab1-2-validation.png"} <= {
        a.path for a in client.list_artifacts(parent_id, "ablation")}
    assert import_run([second, first], table_dir=tmp_path / "ablations") == parent_id  # once, in any order
    # a session with another VAE: its variants are not comparable, and the refusal names both tarballs
    vae_record = unpacked / "outputs/small/gpu_run/autoencoder.done.json"
    original = vae_record.read_text()
    record = json.loads(original)
    record["metrics"]["psnr_rgb"] += 1.0
    vae_record.write_text(json.dumps(record))
    third = _session_tarball(unpacked, tmp_path / "session-c/small.tar.gz", [OURS])
    with pytest.raises(ValueError, match=r"session-a/small.tar.gz and .*session-c/small.tar.gz prepared different "
                                         r"runs: autoencoder.done.json's psnr_rgb"):
        import_run([first, third], table_dir=tmp_path / "ablations")
    vae_record.write_text(original)
    again = _session_tarball(unpacked, tmp_path / "session-d/small.tar.gz", [NAMES[0]])
    with pytest.raises(ValueError, match=f"variant {NAMES[0]} is in both .*session-a/small.tar.gz and "
                                         ".*session-d/small.tar.gz"):
        import_run([first, again], table_dir=tmp_path / "ablations")


def _kept(workspace: Path, out: Path) -> Path:
    """A variant as benchmarks/results keeps it once its tarball is gone (flows.gpu_import docstring)."""
    out.mkdir(parents=True)
    outputs = workspace / "outputs/small"
    for f in ("evaluation/per_video.csv", "metrics/validation_history.csv", "gpu_run/variant.json"):
        (out / Path(f).name).write_bytes((outputs / f).read_bytes())
    return out


@pytest.mark.slow
def test_kept_variants_import_beside_a_session_as_one_table(gpu_run, tmp_path, mlflow_store):
    """A session whose tarball is gone joins a later one's from its kept per-clip scores, validation
    history and record: the same table row and variant metrics as its tarball gave (the evaluate stage's
    means of those scores), Fig 8's series on its run; a variant kept and packed both is refused, and so
    is a kept folder without its record."""
    import mlflow

    from flows.gpu_import import import_run

    unpacked = _unpacked(gpu_run[1], tmp_path / "unpacked")
    whole = _session_tarball(unpacked, tmp_path / "whole/small.tar.gz", NAMES)
    session = _session_tarball(unpacked, tmp_path / "session/small.tar.gz", [NAMES[0]])
    kept = tmp_path / "kept"
    _kept(unpacked / "variants" / NAMES[1], kept / NAMES[1])
    reference = import_run(whole, table_dir=tmp_path / "whole-tables")
    mixed = import_run([kept, session], table_dir=tmp_path / "mixed-tables")
    client = mlflow.MlflowClient()  # after an import: that sets the tracking URI

    def variants(parent_id: str) -> dict[str, mlflow.entities.Run]:
        runs = client.search_runs([client.get_run(parent_id).info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{parent_id}'")
        return {r.info.run_name: r for r in runs if r.info.run_name in NAMES}

    def table(parent_id: str, name: str) -> dict:
        data = json.loads(Path(client.download_artifacts(parent_id, "ablation_table.json",
                                                         str(tmp_path / name))).read_text())
        return {row[data["columns"].index("variant")]: row for row in data["data"]}

    parent = client.get_run(mixed)
    assert "incomplete" not in parent.data.tags and parent.data.tags["kept_variants"] == NAMES[1]
    assert parent.data.tags["tarball"] == f"session/small.tar.gz, {kept}"
    assert table(mixed, "mixed") == table(reference, "whole")  # every row and column, the kept one's too
    ours, theirs = variants(mixed)[NAMES[1]], variants(reference)[NAMES[1]]
    assert ours.data.tags["imported"] == "kept-results"
    # the evaluate stage's metrics, less the frame count (not in the per-clip scores); Fig 8's series beside
    final = {k: v for k, v in ours.data.metrics.items() if not k.startswith("val/")}
    assert final == pytest.approx({k: v for k, v in theirs.data.metrics.items() if not k.endswith("/num_frames")})
    history = pd.read_csv(kept / NAMES[1] / "validation_history.csv")
    score = next(c for c in history.columns if c.endswith("motion_smoothness_flow"))
    assert [m.value for m in client.get_metric_history(ours.info.run_id, score)] == pytest.approx(list(history[score]))
    assert (tmp_path / "mixed-tables" / "tab1-2-paired.md").read_text() == (
        tmp_path / "whole-tables" / "tab1-2-paired.md").read_text()
    assert import_run([session, kept], table_dir=tmp_path / "mixed-tables") == mixed  # once, in any order
    with pytest.raises(ValueError, match=f"variant {NAMES[1]} is in both .*kept/{NAMES[1]} and small.tar.gz"):
        import_run([kept, whole], table_dir=tmp_path / "t")
    (kept / NAMES[1] / "variant.json").unlink()
    with pytest.raises(ValueError, match=f"kept/{NAMES[1]}: per_video.csv without variant.json"):
        import_run([kept, session], table_dir=tmp_path / "t")


def test_the_kept_tab12_variants_import_as_the_whole_table(tmp_path, mlflow_store):
    """benchmarks/results/small-h200-tab12 holds all four Tab 1/2 variants of small's defaults (three
    sessions' tarballs were not kept): imported, they are one complete table, each row the means the GPU's
    evaluate stage took (attempt 32's whole record; the earlier attempts' pages, to their digits)."""
    import mlflow

    from flows.gpu_import import import_run

    parent_id = import_run(ROOT / "benchmarks/results/small-h200-tab12", table_dir=tmp_path / "tables")
    client = mlflow.MlflowClient()
    parent = client.get_run(parent_id)
    assert "incomplete" not in parent.data.tags and parent.data.tags["machine"] == "kept results"
    runs = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'")
    metrics = {r.info.run_name: r.data.metrics for r in runs}
    assert set(metrics) == {"udpdiff-multi-task", "cogvideox", "udpdiff-segmentation", "udpdiff-depth"}
    record = json.loads((ROOT / "benchmarks/results/small-h100-attempt32.json").read_text())["evaluate_metrics"]
    assert {k: v for k, v in metrics["udpdiff-depth"].items() if not k.startswith("val/")} == pytest.approx(
        {k: v for k, v in record.items() if not k.endswith("/num_frames")}, rel=1e-12)
    assert round(metrics["udpdiff-multi-task"]["segmentation/gt_miou"], 4) == 0.7065  # attempt 28
    assert round(metrics["udpdiff-multi-task"]["depth/gt_delta1_depth"], 3) == 0.887
    assert round(metrics["udpdiff-segmentation"]["segmentation/gt_miou"], 4) == 0.7237  # attempt 30
    assert round(metrics["cogvideox"]["rgb/motion_smoothness_flow"], 4) == 0.9917  # attempt 29
    written = {f.name for f in (tmp_path / "tables").iterdir()}
    assert {"tab1-2.md", "tab1-2-paired.md", "tab1-2-validation.png"} <= written


@pytest.mark.slow
def test_import_run_of_an_unfinished_run_logs_what_it_reached(gpu_run, tmp_path, mlflow_store):
    """A run the machine took back mid-way: the unfinished stage says so, and no table is made up."""
    import mlflow

    from flows.gpu_import import import_run

    root, _ = gpu_run
    partial = tmp_path / "partial.tar.gz"
    with tarfile.open(partial, "w:gz") as tar:  # the tarball as it was while cogvideox was still training
        for f in sorted(root.rglob("*")):
            rel = f.relative_to(root)
            if f.is_file() and not f.is_symlink() and rel.suffix in (".json", ".jsonl") and not (
                    rel.parts[:2] == ("variants", "cogvideox") and f.name.endswith(".done.json")) and (
                    rel.parts[:2] != ("variants", OURS)):  # not started yet
                tar.add(f, arcname=str(rel))
    parent_id = import_run(partial, table_dir=tmp_path / "ablations")
    client = mlflow.MlflowClient()
    assert client.get_run(parent_id).data.tags["incomplete"] == "1 of 2 variants evaluated: no table"
    runs = client.search_runs([client.get_run(parent_id).info.experiment_id], "tags.finished = 'false'")
    assert [r.info.run_name for r in runs] == ["train · cogvideox"]
    assert not (tmp_path / "ablations").exists()


@pytest.mark.slow
def test_a_carried_vae_lets_a_fresh_machine_skip_the_autoencoder(gpu_run, tmp_path):
    """save-vae on the machine that trained it, restore-vae on a fresh one: prepare there regenerates
    the data and the latent cache but not the VAE, and the cache is the first machine's, byte for byte.
    A VAE trained for other settings is refused; one decoded at another tolerance is not."""
    from udpdiff.latents import cache_digest

    root, _ = gpu_run
    carried = tmp_path / "vae.tar"
    assert small_gpu.main(["save-vae", "--root", str(root), "--out", str(carried), *OVERRIDES]) == 0
    fresh = tmp_path / "fresh"
    assert small_gpu.main(["restore-vae", "--root", str(fresh), "--vae", str(carried), *OVERRIDES]) == 0
    vae = "models/small/vae/diffusion_pytorch_model.safetensors"
    assert (fresh / vae).read_bytes() == (root / vae).read_bytes()
    restored_marker = (fresh / "outputs/small/gpu_run/autoencoder.done.json").read_bytes()
    assert small_gpu.main(["prepare", "--root", str(fresh), *OVERRIDES]) == 0
    assert (fresh / "outputs/small/gpu_run/autoencoder.done.json").read_bytes() == restored_marker  # skipped
    assert (fresh / vae).read_bytes() == (root / vae).read_bytes()
    assert cache_digest(fresh / "data/small/latents") == cache_digest(root / "data/small/latents")

    other = tmp_path / "other"
    with pytest.raises(SystemExit, match="trained for other settings"):
        small_gpu.main(["restore-vae", "--root", str(other), "--vae", str(carried), *OVERRIDES,
                        "--set", "vae.train.steps=3"])
    assert not (other / vae).exists()
    # prepare recorded what it trained the VAE for (its --set), so a save-vae without them carries the same record
    bare = tmp_path / "bare.tar"
    assert small_gpu.main(["save-vae", "--root", str(root), "--out", str(bare)]) == 0
    assert small_gpu.main(["restore-vae", "--root", str(tmp_path / "bare"), "--vae", str(bare), *OVERRIDES]) == 0
    # the decode tolerance reads colormaps, it does not make them: that VAE serves another tolerance
    assert small_gpu.main(["restore-vae", "--root", str(other), "--vae", str(carried), *OVERRIDES,
                           "--set", "pixelplanes.decode_tolerance=25"]) == 0
    assert (other / vae).read_bytes() == (root / vae).read_bytes()


@pytest.mark.slow
def test_a_vae_of_fewer_clips_is_restored_only_when_asked_and_keeps_its_record(gpu_run, tmp_path):
    """A data-size run (more clips of the same generator) refuses the carried VAE by default, naming the
    flag; with --vae-from-fewer-clips it is restored and its record still says what it trained on."""
    root, _ = gpu_run
    carried = tmp_path / "vae.tar"
    assert small_gpu.main(["save-vae", "--root", str(root), "--out", str(carried), *OVERRIDES]) == 0
    more = [*OVERRIDES, "--set", "data.num_clips=16"]
    with pytest.raises(SystemExit, match="--vae-from-fewer-clips"):
        small_gpu.main(["restore-vae", "--root", str(tmp_path / "refused"), "--vae", str(carried), *more])
    fresh = tmp_path / "fresh"
    assert small_gpu.main(["restore-vae", "--root", str(fresh), "--vae", str(carried), *more,
                           "--vae-from-fewer-clips"]) == 0
    vae = "models/small/vae/diffusion_pytorch_model.safetensors"
    assert (fresh / vae).read_bytes() == (root / vae).read_bytes()
    record = json.loads((fresh / "outputs/small/gpu_run/autoencoder.inputs.json").read_text())
    assert record["data"]["num_clips"] == 12
    # other settings still refuse it, flag or not; fewer clips than it trained on too
    for other in ("data.height=64", "data.num_clips=8"):
        with pytest.raises(SystemExit, match="other settings"):
            small_gpu.main(["restore-vae", "--root", str(tmp_path / "other"), "--vae", str(carried), *OVERRIDES,
                            "--set", other, "--vae-from-fewer-clips"])


def test_a_vae_of_fewer_clips_is_refused_where_the_larger_set_holds_out_a_clip_it_trained_on(tmp_path):
    """5 -> 6 synthetic clips at val_fraction 0.25 moves a training clip to validation
    (tests/test_synthetic.py): a VAE trained on the 5 would have seen it."""
    saved = {"seed": 1234, "data": {"source": "synthetic", "num_clips": 5, "val_fraction": 0.25}}
    now = {"seed": 1234, "data": {"source": "synthetic", "num_clips": 6, "val_fraction": 0.25}}
    with pytest.raises(SystemExit, match=r"1 clip\(s\) that 6 clips hold out for validation \(synth-1234-"):
        small_gpu.as_if_trained_on(saved, now, tmp_path / "vae.tar")
    grown = {"seed": 1234, "data": {"source": "synthetic", "num_clips": 12, "val_fraction": 0.25}}
    assert small_gpu.as_if_trained_on({**grown, "data": {**grown["data"], "num_clips": 8}}, grown,
                                      tmp_path / "vae.tar")["data"] == grown["data"]


def test_the_committed_vae_restores_for_the_small_profile_as_it_stands(tmp_path):
    """``.gpu-carry/vae-small.tar.xz`` (attempt 31) is what a lent session restores instead of training: a
    change to ``small``'s data, Pixelplanes or VAE settings that makes it stale fails here, not on the GPU."""
    from diffusers import AutoencoderKLCogVideoX

    committed = small_gpu.REPO / ".gpu-carry" / "vae-small.tar.xz"
    assert small_gpu.main(["restore-vae", "--root", str(tmp_path), "--vae", str(committed)]) == 0
    vae = AutoencoderKLCogVideoX.from_pretrained(tmp_path / "models" / "small" / "vae")
    assert list(vae.config.block_out_channels) == [32, 64, 64] and vae.config.latent_channels == 16
    record = json.loads((tmp_path / "outputs" / "small" / "metrics" / "autoencoder.json").read_text())
    assert record["gt_miou_after_vae"] == pytest.approx(0.7541260331714256, abs=0)  # attempt 14's VAE


def test_a_vae_saved_before_a_config_field_existed_is_restored_while_that_field_is_unset():
    """A VAE record from before ``vae.train.crop`` existed (attempt 14's) matches settings that leave it
    unset, not ones that set it (attempt 15's first call refused it)."""
    now = {"vae": {"train": {"steps": 2500, "crop": None}}, "seed": 1234}
    saved = {"vae": {"train": {"steps": 2500}}, "seed": 1234}
    assert small_gpu.with_unset_fields(saved, now) == now
    cropped = {"vae": {"train": {"steps": 2500, "crop": [9, 64, 64]}}, "seed": 1234}
    assert small_gpu.with_unset_fields(saved, cropped) != cropped
    assert small_gpu.with_unset_fields({"seed": 7}, now) != now  # other values still differ


@pytest.mark.slow
def test_the_last_validation_scores_the_draws_the_evaluation_scores(gpu_run):
    """Fig 8's last point and the evaluation's one sample predict the same clips from the same noise (each
    clip's sample-stage seed) with the same weights, so they agree to the CSV's rounding. One draw shared
    by the batch of validation clips did not (here 2e-4 to 8e-4 apart, relative; 0.02-0.05 of delta1
    on the GPU runs). The RGB-given model: the RGB half is given clean, no replacement noise to draw."""
    import pandas as pd

    v = gpu_run[0] / "variants" / OURS / "outputs/small"
    last = pd.read_csv(v / "metrics/validation_history.csv").iloc[-1]
    per_video = pd.read_csv(v / "evaluation/per_video.csv")
    seg, depth = per_video[per_video.set == "segmentation"], per_video[per_video.set == "depth"]
    assert len(seg) == len(depth) == 2  # train.validation_clips = sample.num_samples: the same clips
    assert last["val/segmentation/gt_miou"] == pytest.approx(seg.gt_miou_single.mean(), rel=1e-5)
    assert last["val/depth/gt_abs_rel"] == pytest.approx(depth.gt_abs_rel_single.mean(), rel=1e-5)
    assert last["val/depth/gt_rmse_depth"] == pytest.approx(depth.gt_rmse_depth_single.mean(), rel=1e-5)
    # train.validation_videos=2: the video scores are the mean over the two clips' text-to-video samples, drawn as
    # the sample stage draws them, so they equal the evaluation's scores of those videos (their caption following too)
    for task, rows in (("segmentation", seg), ("depth", depth)):
        for score in ("motion_smoothness_flow", "pixel_frame_consistency", "caption_sky", "caption_ground"):
            assert last[f"val/{task}/{score}"] == pytest.approx(rows[score].mean(), rel=1e-5), (task, score)


@pytest.mark.slow
def test_figures_of_a_run(gpu_run, tmp_path):
    """Fig 8, the loss plot and the README gallery from a run's files: the gallery keeps the label band
    and the first sample row of both tasks' galleries, side by side."""
    import small_gpu_figures
    from PIL import Image

    root, _ = gpu_run
    assert small_gpu_figures.main([str(root), str(tmp_path), "--gallery-rows", "1", "--real-clips", "1"]) == 0
    for name in ("fig8_validation.png", "fig8_gpu_time.png", "train_loss.png"):
        with Image.open(tmp_path / name) as im:
            assert im.size[0] > 300 and im.size[1] > 200
    samples = root / "variants" / NAMES[0] / "outputs/small/samples"
    with Image.open(samples / "gallery_segmentation.gif") as seg, Image.open(tmp_path / "gallery.gif") as both:
        assert both.size == (2 * seg.size[0] + 8, seg.size[1]) and both.n_frames == seg.n_frames  # one row: all of it
    # the held-out clips' predictions beside their exact truth: one row (--real-clips 1) of five
    # panels at the display height, under a label band, every frame the clip has
    with Image.open(tmp_path / "real_clips.gif") as real:
        assert real.n_frames == 9 and real.size[0] == 5 * small_gpu_figures.viz.MIN_DISPLAY_HEIGHT
        assert small_gpu_figures.viz.MIN_DISPLAY_HEIGHT < real.size[1] < 2 * small_gpu_figures.viz.MIN_DISPLAY_HEIGHT
    # the variants' generated videos of the same prompts side by side: per task gallery of each variant,
    # frames 0 and 8 (the clips have 9) of the first row's video, under a label band
    row = small_gpu_figures.viz.MIN_DISPLAY_HEIGHT
    galleries = sorted((root / "variants").glob("*/outputs/small/samples/gallery_*.gif"))
    assert {g.parents[3].name for g in galleries} >= {"udpdiff-multi-task", "cogvideox"}
    with Image.open(tmp_path / "text_to_video_variants.png") as still:
        assert still.size[0] == len(galleries) * 2 * row and row < still.size[1] < 2 * row
        picture = np.asarray(still.convert("RGB"))
    rgb_only = next(i for i, g in enumerate(galleries) if g.parents[3].name == "cogvideox")
    with Image.open(galleries[rgb_only]) as gif:
        gif.seek(8)
        frame8 = np.asarray(gif.convert("RGB"))
    shown = picture[-row:, (2 * rgb_only + 1) * row: (2 * rgb_only + 2) * row].astype(int)
    assert np.abs(shown - frame8[-row:, :row]).mean() < 4  # that frame (a palette's rounding apart)
    # another variant's gallery by name; a name without one is an error, not a silent skip
    other = tmp_path / "other"
    assert small_gpu_figures.main([str(root), str(other), "--gallery-rows", "1",
                                   "--gallery-variant", "udpdiff-multi-task-rgb-given"]) == 0
    assert (other / "gallery.gif").exists()
    with pytest.raises(SystemExit, match="no gallery"):
        small_gpu_figures.main([str(root), str(other), "--gallery-variant", "no-such-variant"])


def test_fig8_over_training_seconds_spreads_each_run_over_its_own_time(tmp_path):
    """fig8_gpu_time.png's axis: a run's steps spread over its training seconds, so two runs of unequal
    cost per step line up by GPU time; an earlier run comes in as LABEL=JSONL@SECONDS, and a malformed
    or missing one is an error naming it."""
    import small_gpu_figures

    rows = [{"step": 10, "loss": 1.0}, {"step": 500, "val/segmentation/gt_miou": 0.3},
            {"step": 1000, "val/segmentation/gt_miou": 0.34}]
    assert small_gpu_figures.seconds_axis(rows, "val/segmentation/gt_miou", 972.0) == ([486.0, 972.0], [0.3, 0.34])
    earlier = tmp_path / "train_steps.jsonl"
    earlier.write_text("".join(json.dumps(r) + "\n" for r in rows))
    label, got, seconds = small_gpu_figures.compared_run(f"patch 2={earlier}@1114")
    assert (label, got, seconds) == ("patch 2", rows, 1114.0)
    for bad in (f"{earlier}@1114", f"patch 2={earlier}", f"x={tmp_path / 'none.jsonl'}@5", f"x={earlier}@soon"):
        with pytest.raises(SystemExit, match="--compare"):
            small_gpu_figures.compared_run(bad)


def test_predicted_entities_take_the_colour_of_the_truth_they_match():
    """real_clips.gif's colours: a predicted entity is renamed to the ground-truth id it is matched to
    (Hungarian on IoU), an unmatched one to an id past the truth's, background stays 0."""
    import small_gpu_figures

    gt = np.zeros((1, 4, 6), np.int32)
    gt[0, :, :2], gt[0, :, 3:5] = 1, 2
    pred = np.zeros_like(gt)
    pred[0, :, :2], pred[0, :3, 3:5], pred[0, :, 5] = 7, 3, 9  # 7 -> 1, 3 -> 2, 9 overlaps nothing
    out = small_gpu_figures.matched_ids(pred, gt)
    assert np.array_equal(out[pred == 7], np.full((pred == 7).sum(), 1))
    assert np.array_equal(out[pred == 3], np.full((pred == 3).sum(), 2))
    assert set(np.unique(out[pred == 9]).tolist()) == {3} and not out[pred == 0].any()


def test_reference_scores_order_by_detail(tmp_path):
    """The reference predictors of small_reference_scores.py on re-rendered clips: exact maps kept at a
    finer grid score higher, and all scores are in range."""
    import small_reference_scores

    index = tmp_path / "index.json"
    index.write_text(json.dumps([{"clip_id": "synth-1234-00003"}, {"clip_id": "synth-1234-00007"}]))
    out = tmp_path / "scores.json"
    assert small_reference_scores.main([str(index), "--frames", "3", "--size", "64", "--out", str(out)]) == 0
    scores = json.loads(out.read_text())
    depth, seg = scores["depth"], scores["segmentation"]
    assert depth["GT at the 8x8 token grid"]["delta1_depth"] > depth["GT at a 16x16 grid"]["delta1_depth"]
    assert seg["GT at the 8x8 token grid"]["miou"] > seg["GT at a 16x16 grid"]["miou"]
    assert all(0 <= v["miou"] <= 1 for v in seg.values())
    assert all(0 <= v["delta1_depth"] <= 1 for v in depth.values())


def test_dense_predictions_pack_an_ensembles_first_member_and_uncertainty(tmp_path):
    """Every task's predictions of the real clips; for an ensembled depth prediction also its first member
    and the members' disagreement, under their own prefixes (small_depth_errors.py --prefix)."""
    from udpdiff.paths import ProjectPaths

    paths = ProjectPaths(tmp_path, "small")
    rng = np.random.default_rng(0)
    depth, single, spread = (rng.random((3, 4, 4), dtype=np.float32) for _ in range(3))
    ids = rng.integers(0, 3, (3, 4, 4)).astype(np.int32)
    for task, arrays in (("depth", {"conditioned_dense": depth, "conditioned_dense_single": single,
                                    "conditioned_uncertainty": spread.astype(np.float16)}),
                         ("segmentation", {"conditioned_dense": ids})):
        (paths.samples / task).mkdir(parents=True)
        np.savez(paths.samples / task / "clip-1.npz", video=np.zeros((3, 4, 4, 3), np.uint8), **arrays)
    paths.metrics.mkdir(parents=True)
    with np.load(small_gpu.dense_predictions(paths)) as z:
        assert sorted(z.files) == ["depth/clip-1", "depth_single/clip-1", "depth_uncertainty/clip-1",
                                   "segmentation/clip-1"]
        assert np.array_equal(z["depth_single/clip-1"], single.astype(np.float16))
        assert np.array_equal(z["segmentation/clip-1"], ids) and z["depth/clip-1"].dtype == np.float16


def test_the_real_clips_predictions_come_back_when_the_evaluate_stage_is_lost(tmp_path, monkeypatch):
    """The machine lost during evaluate (attempt 27): the predictions of the real clips are already in
    metrics/, so the next pack returns them and the clips are scored off the machine."""
    name = "udpdiff-multi-task"
    ran = []

    def stage_until_evaluate(p, paths, stage, relaunch=None):
        ran.append(stage)
        if stage == "sample":
            (paths.samples / "segmentation").mkdir(parents=True)
            np.savez(paths.samples / "segmentation" / "clip-1.npz", video=np.zeros((3, 4, 4, 3), np.uint8),
                     conditioned_dense=np.arange(48, dtype=np.int32).reshape(3, 4, 4))
        if stage == "evaluate":
            raise SystemExit("the machine is gone")
        small_gpu.done_marker(paths, stage).parent.mkdir(parents=True, exist_ok=True)
        small_gpu.done_marker(paths, stage).write_text("{}")
        return {"metrics": {}}

    monkeypatch.setattr(small_gpu, "run_stage", stage_until_evaluate)
    with pytest.raises(SystemExit, match="the machine is gone"):
        small_gpu.run_variant(tmp_path, name, CPU_SIZES, ["tab1-2"])
    assert ran == ["train", "sample", "evaluate"]
    with np.load(tmp_path / "variants" / name / "outputs/small/metrics" / small_gpu.DENSE_PREDICTIONS) as z:
        assert np.array_equal(z["segmentation/clip-1"], np.arange(48).reshape(3, 4, 4))
