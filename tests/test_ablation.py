"""Ablations as DVC experiments: the override grammar handed to `dvc exp run -S`, the checks that
stop an ablation before any work, and (slow) a real ablation on a reproduced workspace: the
variants run as DVC experiments, `dvc exp show` lists them with their metrics, MLflow holds a
parent run named after the table with one child per variant, and a rerun with nothing changed
runs nothing."""

from __future__ import annotations

import json
import sqlite3
import sys
from pathlib import Path

import pytest
import yaml

from flows.ablation import dvc_set_args, expected_params, hydra_value, plan
from udpdiff.config import ParamsError, load_params

REPO = Path(__file__).resolve().parents[1]


def test_override_values_in_dvcs_set_param_grammar():
    assert hydra_value(None) == "null" and hydra_value(True) == "true" and hydra_value(0.3) == "0.3"
    assert hydra_value("text-prompt") == "'text-prompt'"
    assert hydra_value(["segmentation"]) == "['segmentation']" and hydra_value([]) == "[]"
    assert hydra_value({"type": "sam2", "options": {"points_per_side": 8}}) == \
        "{type:'sam2',options:{points_per_side:8}}"


def test_set_args_address_the_active_profile_or_switch_it():
    p = load_params(REPO / "params.yaml", profile="tiny")
    assert dvc_set_args(p, {"train.task_ratio": [0.3, 0.7]}) == ["-S", "profiles.tiny.train.task_ratio=[0.3,0.7]"]
    assert dvc_set_args(p, {"profile": "cogvideox-2b", "train.tasks": ["segmentation"]}) == [
        "-S", "profile='cogvideox-2b'", "-S", "profiles.cogvideox-2b.train.tasks=['segmentation']"]


def test_expected_params_is_what_the_overrides_write():
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    out = expected_params(raw, {"train.task_conditioning": "text-prompt"})
    assert out["profiles"]["tiny"]["train"]["task_conditioning"] == "text-prompt"
    assert raw["profiles"]["tiny"]["train"]["task_conditioning"] == "embedding"  # the input is untouched


def test_every_paper_table_has_an_ablation():
    p = load_params(REPO / "params.yaml")
    assert {"tab1", "tab2", "tab5", "tab6", "tab7", "tab8", "tab9", "tab10", "tab11", "tab12"} <= set(p.ablations)
    assert p.ablations["tab5"].title == "Tab 5 — task conditioning"
    # Tab 6 compares colormaps in the single-task segmentation setting, as the paper does
    assert all(v["train.tasks"] == ["segmentation"] for v in p.ablations["tab6"].variants.values())
    # Tab 9 labels every clip anew with SAM2, prompted by point grids or by the first-frame entity model
    tab9 = p.ablations["tab9"].variants
    assert list(tab9) == ["grid-8x8", "grid-12x12", "entity-model"]
    assert all(v["data.panda70m.seg_dir"] is None for v in tab9.values())
    annotators = {name: load_params(REPO / "params.yaml", profile="cogvideox-5b").with_overrides(v)
                  .active.data.panda70m.segmentation_annotator for name, v in tab9.items()}
    assert [annotators[n].options.get("points_per_side") for n in tab9] == [8, 12, None]
    assert [annotators[n].entities is not None for n in tab9] == [False, False, True]


def test_tiny_tables_pass_the_checks_and_the_rest_name_the_key_that_cannot_take_effect():
    p = load_params(REPO / "params.yaml", profile="tiny")
    assert len(plan(p, ["tab1", "tab2", "tab5", "tab6", "tab7"], None)) == 12
    with pytest.raises(ParamsError, match=r"tab10\.variants\.random: override transformer\.channel_expansion"):
        plan(p, ["tab10"], None)
    with pytest.raises(ParamsError, match=r"data\.panda70m\.depth_annotator: profile 'tiny' synthesises"):
        plan(p, ["tab8"], None)
    with pytest.raises(ParamsError, match="unknown ablation"):
        plan(p, ["tab99"], None)
    with pytest.raises(ParamsError, match="none of"):
        plan(p, ["tab5"], ["no-such-variant"])


def test_all_tables_on_tiny_runs_the_ones_that_can_and_names_the_others(monkeypatch):
    """`python -m flows ablation` (no table) on tiny: the tables whose overrides can take effect,
    each other one named with its reason; no experiment is run here (dvc is stubbed)."""
    import flows.ablation as fa

    planned = []
    monkeypatch.setattr(fa, "_require_git_commit", lambda env: None)
    monkeypatch.setattr(fa, "existing_experiments", lambda env: (_ for _ in ()).throw(RuntimeError("stop")))
    real_plan = fa.plan
    monkeypatch.setattr(fa, "plan", lambda p, tables, variants: planned.append(tables) or real_plan(p, tables,
                                                                                                   variants))
    with pytest.raises(RuntimeError, match="stop"):
        fa.ablation_flow.fn(None, "tiny")
    assert planned[-1] == ["tab1", "tab2", "tab1-2", "rgb-given", "token-size", "train-vs-held-out",
                          "model-size", "reconstruction-guidance", "dense-guidance", "tab5", "tab6", "tab7"]


def test_the_small_scale_tabs_1_2_are_one_command_of_four_variants():
    """Multi-task, single-task segmentation and depth, and RGB-only, at the same steps, prompts and
    seeds: `python -m flows ablation tab1-2` on the `small` profile."""
    p = load_params(REPO / "params.yaml", profile="small")
    rows = plan(p, ["tab1-2"], None)
    assert [name for _, name, _ in rows] == ["cogvideox", "udpdiff-segmentation", "udpdiff-depth",
                                             "udpdiff-multi-task"]
    assert not any(k.startswith(("train.steps", "seed", "sample.")) for _, _, o in rows for k in o)
    # read clip by clip against the multi-task model (Tab 2) and the RGB-only one (Tab 1); a table that
    # names none is read against the profile as it stands, else its first variant
    assert p.ablations["tab1-2"].references == ["udpdiff-multi-task", "cogvideox"]
    assert p.ablations["tab2"].references == ["udpdiff-multi-task"] and p.ablations["tab1"].references == ["cogvideox"]


@pytest.mark.parametrize("compare_with, error", [(["udpdiff-joint"], "'udpdiff-joint', not a variant"),
                                                 (["base", "base"], "names a variant twice")])
def test_compare_with_names_the_tables_variants_once(tmp_path, compare_with, error):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["ablations"] = {"tabx": {"title": "x", "compare_with": compare_with,
                                 "variants": {"base": {}, "fewer": {"sample.num_samples": 2}}}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ParamsError, match=error):
        load_params(tmp_path / "params.yaml")


def test_paper_profiles_accept_every_table_but_an_architecture_change_of_pretrained_weights():
    p = load_params(REPO / "params.yaml", profile="cogvideox-5b")
    tables = [t for t in p.ablations if t not in ("token-size", "model-size")]
    assert len(plan(p, tables, None)) == sum(len(p.ablations[t].variants) for t in tables)
    # the weights fix the patch size: refused before any work, naming the key (small trains from scratch)
    with pytest.raises(ParamsError, match=r"patch-1: override transformer\.config\.patch_size: profile 'cogvideox-5b' "
                                          r"loads pretrained weights"):
        plan(p, ["token-size"], None)
    with pytest.raises(ParamsError, match=r"6-layers: override transformer\.config\.num_layers: profile 'cogvideox-5b' "
                                          r"loads pretrained weights"):
        plan(p, ["model-size"], None)
    small = load_params(REPO / "params.yaml", profile="small")
    assert len(plan(small, ["token-size"], None)) == 2
    assert [o.get("transformer.config.num_layers") for _, _, o in plan(small, ["model-size"], None)] == [6, 12, 24]


def test_from_scratch_builds_the_profiles_architecture():
    """Tab 11's scratch rows: `pretrained: null` on a CogVideoX profile builds that profile's shape,
    not diffusers' class default; a config that cannot describe a model is refused at load."""
    p = load_params(REPO / "params.yaml", profile="cogvideox-5b").with_overrides({"transformer.pretrained": None})
    cfg = p.active.transformer.config
    assert (cfg["num_attention_heads"], cfg["num_layers"], cfg["use_rotary_positional_embeddings"]) == (48, 42, True)
    with pytest.raises(ParamsError, match="must give the architecture"):
        load_params(REPO / "params.yaml", profile="tiny").with_overrides(
            {"transformer.pretrained": None, "transformer.config": {"num_layers": 2}})


@pytest.mark.slow
def test_an_ablation_runs_as_dvc_experiments_logs_a_table_and_reruns_nothing(repro_workspace, tmp_path):
    ws = repro_workspace.copy(tmp_path / "ws")
    params = yaml.safe_load((ws.path / "params.yaml").read_text())
    # a cheap table for CI (the number of samples touches sample → evaluate → report only; the
    # sampling steps would retrain too: the training previews use them); the paper's tables run
    # the same code with retraining variants
    params["ablations"]["tabci"] = {"title": "Tab CI — samples per task",
                                    "variants": {"fewer-samples": {"sample.num_samples": 2}, "base": {}}}
    (ws.path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False, allow_unicode=True))
    # as a user would after `make repro`: commit the reproduced pipeline (dvc.lock, uncached metrics)
    ws.run("git", "add", "-A")
    ws.run("git", "commit", "-qm", "reproduced, and a CI ablation table")
    first = ws.run(sys.executable, "-m", "flows", "ablation", "tabci", activated=False, timeout=1200)
    log = first.stdout + first.stderr
    assert "Running stage 'sample'" in log and "Running stage 'train'" not in log, log[-3000:]

    shown = json.loads(ws.run(sys.executable, "-m", "dvc", "exp", "show", "--json").stdout)
    exps = {r["name"]: r["data"] for b in shown for e in (b.get("experiments") or []) for r in e["revs"]}
    assert {"tabci-fewer-samples", "tabci-base"} <= set(exps)
    samples = {n: exps[n]["params"]["params.yaml"]["data"]["profiles"]["tiny"]["sample"]["num_samples"]
               for n in ("tabci-fewer-samples", "tabci-base")}
    assert samples == {"tabci-fewer-samples": 2, "tabci-base": 4}
    for name in ("tabci-fewer-samples", "tabci-base"):
        ev = exps[name]["metrics"]["outputs/tiny/evaluation/metrics.json"]["data"]["metrics"]
        assert 0 < ev["depth"]["motion_smoothness_flow"] <= 1

    db = sqlite3.connect(ws.path / "mlruns.db")
    parent_id, = db.execute("SELECT run_uuid FROM runs WHERE name='Tab CI — samples per task'").fetchone()
    children = dict(db.execute("SELECT r.name, r.run_uuid FROM runs r JOIN tags t ON t.run_uuid=r.run_uuid "
                               "WHERE t.key='mlflow.parentRunId' AND t.value=?", (parent_id,)))
    assert set(children) == {"fewer-samples", "base"}
    params_of = dict(db.execute("SELECT key, value FROM params WHERE run_uuid=?", (children["fewer-samples"],)))
    assert params_of["sample.num_samples"] == "2"
    metric_keys = {k for k, in db.execute("SELECT key FROM metrics WHERE run_uuid=?", (children["base"],))}
    assert "depth/motion_smoothness_flow" in metric_keys
    # the variant's stage runs nest under the variant run (grandchildren of the table's run)
    grandchildren = {n for n, in db.execute("SELECT r.name FROM runs r JOIN tags t ON t.run_uuid=r.run_uuid WHERE "
                                           "t.key='mlflow.parentRunId' AND t.value=?", (children["fewer-samples"],))}
    assert {"sample · fewer-samples", "evaluate · fewer-samples", "report · fewer-samples"} <= grandchildren
    assert (ws.path / "outputs" / "tiny" / "ablations" / "tabci.md").read_text().count("\n|") >= 3
    # beside the table, the variant minus the profile as it stands ({}), over the clips both generated:
    # read from the experiments' commits; one model and the same seeds, so the two videos they share agree
    paired, = db.execute("SELECT value FROM tags WHERE run_uuid=? AND key='mlflow.loggedArtifacts'",
                         (parent_id,)).fetchone()
    assert "ablation_paired.json" in paired
    # Fig 8 across the variants, from the validation histories the experiments committed
    assert (ws.path / "outputs" / "tiny" / "ablations" / "tabci-validation.png").read_bytes()[:4] == b"\x89PNG"
    md = (ws.path / "outputs" / "tiny" / "ablations" / "tabci-paired.md").read_text()
    assert "minus `base`" in md
    rows = [r.split("|")[1:-1] for r in md.splitlines() if r.startswith("| fewer-samples")]
    assert rows and all(int(r[4]) == 2 for r in rows)  # n: the 2 videos of the smaller variant
    ms = next(r for r in rows if r[3].strip() == "motion_smoothness_flow" and r[2].strip() == "depth / depth")
    assert abs(float(ms[7].split("±")[0])) < 1e-3, ms

    runs_before = db.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
    again = ws.run(sys.executable, "-m", "flows", "ablation", "tabci", activated=False, timeout=600)
    assert "nothing to run" in again.stdout + again.stderr
    assert "Running stage" not in again.stdout + again.stderr
    assert db.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == runs_before
