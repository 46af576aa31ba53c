"""dvc.yaml against the code it runs: each stage's ``deps`` are exactly the modules its
``udpdiff.stages.<stage>`` imports (derived from the source), its ``params`` exactly the keys it
reads (recorded while the stages run), every listed key exists in every profile, and running a
stage twice on the same inputs gives byte-identical outputs, so DVC never re-runs a consumer for
nothing."""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

import pytest
import yaml

from udpdiff.stage_code import stage_files
from udpdiff.stages import STAGES

REPO = Path(__file__).resolve().parents[1]
DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())
PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())
# keys a stage reads only for another data source than the tiny profile's: the section is listed whole
READ_ONLY_FOR_OTHER_SOURCES = {"data": {"profiles.${profile}.data"}}


# -- deps -----------------------------------------------------------------------------------------
def listed_code(stage: str) -> set[str]:
    files = set()
    for dep in DVC["stages"][stage]["deps"]:
        path = REPO / dep
        if dep.endswith(".py") or (path.is_dir() and any(path.rglob("*.py"))):
            files |= {str(f.relative_to(REPO)) for f in ([path] if path.is_file() else path.rglob("*.py"))}
    return files


def test_the_stage_list_is_dvc_yamls():
    assert list(DVC["stages"]) == list(STAGES)


@pytest.mark.parametrize("stage", STAGES)
def test_stage_deps_are_exactly_the_code_it_imports(stage):
    derived = stage_files(stage)
    listed = listed_code(stage)
    assert listed == derived, (f"dvc.yaml stage {stage!r}: add {sorted(derived - listed)}, "
                               f"remove {sorted(listed - derived)}")


def test_report_code_does_not_invalidate_the_models():
    """The complaint that started this: editing the report's code retrained the model."""
    for stage in ("autoencoder", "latents", "train"):
        assert "udpdiff/evaluation/tables.py" not in listed_code(stage)
        assert "udpdiff/stages/report.py" not in listed_code(stage)


# -- params ---------------------------------------------------------------------------------------
def listed_params(stage: str) -> set[str]:
    out = set()
    for entry in DVC["stages"][stage].get("params", []):
        out |= set(entry) if isinstance(entry, dict) else {entry}
    return out


def _lookup(tree: dict, dotted: str):
    node = tree
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            raise KeyError(key)
        node = node[key]
    return node


@pytest.mark.parametrize("profile", sorted(PARAMS["profiles"]))
def test_every_listed_param_exists_in_every_profile(profile):
    """DVC stops with 'missing params' when a listed key is absent, so a profile that relied on a
    code default for it could not run: params.yaml spells out every key some stage reads."""
    missing = []
    for stage in STAGES:
        for key in listed_params(stage):
            try:
                _lookup(PARAMS, key.replace("${profile}", profile))
            except KeyError:
                missing.append(f"{stage}: {key}")
    assert not missing, f"profile {profile!r} lacks keys that dvc.yaml stages read: {missing}"


# -- running every stage twice ------------------------------------------------------------------
MICRO = {  # the tiny profile, smaller still: every stage runs, in seconds
    "data.num_clips": 5, "vae.train.steps": 3, "train.steps": 4, "train.checkpoint_every": 2,
    "train.sample_every": 2, "train.log_every": 2, "sample.num_samples": 1, "sample.num_inference_steps": 2,
    "sample.gallery_size": 1, "sample.runtime_trials": 0,
}


def _digest(path: Path) -> dict[str, str]:
    files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file())
    return {str(f.relative_to(path.parent)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


# outputs that hold wall-clock figures (seconds, samples/s): uncached metrics and plots that only
# the report (which prints Tab 4) depends on; every other output must be byte-identical
TIMINGS = {"outputs/${profile}/metrics/runtime.json", "outputs/${profile}/metrics/sample.json",
           "outputs/${profile}/metrics/train.json", "outputs/${profile}/metrics/train_history.csv"}


def _outs(stage: str, profile: str) -> list[str]:
    outs = []
    for key in ("outs", "metrics", "plots"):
        for entry in DVC["stages"][stage].get(key, []):
            name, opts = (next(iter(entry.items())) if isinstance(entry, dict) else (entry, {}))
            # resumable checkpoints are state, not a result; the metrics JSON is the flow's to write
            if not (opts or {}).get("persist") and name not in TIMINGS and not name.endswith(f"metrics/{stage}.json"):
                outs.append(name.replace("${profile}", profile))
    return outs


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """The whole pipeline in-process twice, in two folders, recording the params each stage reads."""
    import importlib

    from udpdiff.config import load_params, recording_reads
    from udpdiff.paths import ProjectPaths

    p = load_params(REPO / "params.yaml", profile="tiny").with_overrides(MICRO)
    runs, reads = [], {}
    for i in range(2):
        root = tmp_path_factory.mktemp(f"run{i}")
        shutil.copytree(REPO / "infra", root / "infra")
        paths = ProjectPaths(root, "tiny")
        for stage in STAGES:
            with recording_reads() as keys:
                importlib.import_module(f"udpdiff.stages.{stage}").run(p, paths)
            reads[stage] = {re.sub(r"^profiles\.tiny\.", "profiles.${profile}.", k) for k in keys}
        runs.append(root)
    return runs, reads


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_stage_params_are_exactly_the_keys_it_reads(two_runs, stage):
    _, reads = two_runs
    listed = listed_params(stage)
    exempt = READ_ONLY_FOR_OTHER_SOURCES.get(stage, set())
    covered = {k for k in reads[stage] if any(k == x or k.startswith(f"{x}.") for x in listed)}
    assert covered == reads[stage], f"{stage}: reads {sorted(reads[stage] - covered)} that dvc.yaml does not list"
    unread = [x for x in listed - exempt if not any(k == x or k.startswith(f"{x}.") for k in reads[stage])]
    assert not unread, f"{stage}: dvc.yaml lists {unread}, which the stage never reads"
    for section in listed - exempt:  # a whole section listed: the stage reads all of it
        node = _lookup(PARAMS, section.replace("${profile}", "tiny"))
        if isinstance(node, dict):
            leaves = {f"{section}.{k}" for k in node}
            partly = {x for x in leaves if not any(k == x or k.startswith(f"{x}.") for k in reads[stage])}
            assert not partly, f"{stage}: lists {section} whole but never reads {sorted(partly)}: list the keys"


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_stage_outputs_are_byte_identical_when_run_twice(two_runs, stage):
    (first, second), _ = two_runs
    for out in _outs(stage, "tiny"):
        a, b = _digest(first / out), _digest(second / out)
        assert a, f"{stage}: declared output {out} was not written"
        differ = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
        assert not differ, f"{stage}: {out} differs between two runs on the same inputs: {differ[:10]}"


def test_no_stage_depends_on_timings():
    """Timings differ run to run: they are metrics (uncached), and only the report, which prints
    them (Tab 4), reads one; no model or score is recomputed because a clock moved."""
    declared = set()
    for stage in STAGES:
        for key in ("metrics", "plots"):
            declared |= {next(iter(e)) if isinstance(e, dict) else e for e in DVC["stages"][stage].get(key, [])}
    assert TIMINGS <= declared, "timings are uncached metrics or plots"
    for stage in STAGES:
        used = set(DVC["stages"][stage]["deps"]) & TIMINGS
        assert used <= ({"outputs/${profile}/metrics/runtime.json"} if stage == "report" else set()), (stage, used)
