"""Fixtures shared by test files (helpers live here, never imported from another test file)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = str(Path(sys.executable).parent)
# what a fresh clone would not have: outputs of earlier runs, caches, the venv
TOP_LEVEL_SKIP = {".git", ".venv", "data", "models", "outputs", "mlruns.db", "mlartifacts", ".prefect", ".whl",
                  ".device-out", ".pytest_cache", ".hypothesis"}
ANYWHERE_SKIP = shutil.ignore_patterns("__pycache__", "*.egg-info")


def _ignore(directory: str, names: list[str]) -> set[str]:
    skip = set(ANYWHERE_SKIP(directory, names))
    if Path(directory) == REPO:
        skip |= TOP_LEVEL_SKIP & set(names)
    if Path(directory) == REPO / ".dvc":
        skip |= {"cache", "tmp"} & set(names)
    return skip


def run_checked(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 1500) -> subprocess.CompletedProcess:
    """Run a command; on failure the assertion shows the tails of its output."""
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc


@dataclass
class Workspace:
    """A fresh copy of the repository (a git repo with one commit, as a clone is) and the
    environment a user's shell would give its commands."""

    path: Path
    env: dict[str, str]            # the venv *not* activated: what `make repro` sees
    first_repro: subprocess.CompletedProcess | None = None

    @property
    def activated_env(self) -> dict[str, str]:
        return {**self.env, "PATH": f"{VENV_BIN}{os.pathsep}{self.env['PATH']}"}

    def run(self, *cmd: str, timeout: int = 1500, activated: bool = True) -> subprocess.CompletedProcess:
        return run_checked(list(cmd), self.path, self.activated_env if activated else self.env, timeout)

    def copy(self, dest: Path) -> Workspace:
        """An independent copy (its DVC cache, MLflow store and git history included) to change freely."""
        shutil.copytree(self.path, dest, symlinks=True, ignore=shutil.ignore_patterns(".prefect"))
        env = {**self.env, "PREFECT_HOME": str(dest / ".prefect")}
        return Workspace(dest, env)


def new_workspace(dest: Path) -> Workspace:
    shutil.copytree(REPO, dest, ignore=_ignore)
    # what git tracks under the output folders comes with a clone (the uncached tables and metrics,
    # DVC's .gitignore files): copy exactly those, so the copy meets what a clone meets
    tracked = subprocess.run(["git", "ls-files", "-z", "--", "data", "models", "outputs"], cwd=REPO,
                             capture_output=True, text=True, timeout=60).stdout.split("\0")
    for rel in filter(None, tracked):
        if (REPO / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dest / rel)
    bare_path = os.pathsep.join(d for d in os.environ.get("PATH", "").split(os.pathsep) if d != VENV_BIN)
    env = {**os.environ, "PREFECT_HOME": str(dest / ".prefect"), "PYTHONUNBUFFERED": "1", "PATH": bare_path,
           "GIT_AUTHOR_NAME": "udpdiff-test", "GIT_AUTHOR_EMAIL": "test@udpdiff.invalid",
           "GIT_COMMITTER_NAME": "udpdiff-test", "GIT_COMMITTER_EMAIL": "test@udpdiff.invalid"}
    for var in ("PREFECT_API_URL", "UDPDIFF_MLFLOW_PARENT_RUN_ID", "UDPDIFF_MLFLOW_TRACKING_URI", "UDPDIFF_MLFLOW_TAGS",
                "UDPDIFF_MLFLOW_ARTIFACT_ROOT",
                "UDPDIFF_PREFECT_PARENT_FLOW_RUN_ID", "UDPDIFF_ROOT"):
        env.pop(var, None)
    ws = Workspace(dest, env)
    ws.run("git", "init", "-q", activated=False)
    ws.run("git", "add", "-A", activated=False)
    ws.run("git", "commit", "-q", "-m", "fresh clone", activated=False)
    return ws


@pytest.fixture(scope="session")
def repro_workspace(tmp_path_factory) -> Workspace:
    """The whole `tiny` pipeline run once, exactly as `make repro` runs it (venv not activated,
    one shared Prefect server). Read-only: tests that change anything use ``repro_workspace.copy``."""
    ws = new_workspace(tmp_path_factory.mktemp("e2e") / "udpdiff")
    ws.first_repro = ws.run(sys.executable, "-m", "flows", "repro", activated=False)
    return ws


@pytest.fixture(scope="session")
def tiny_mask2former_dir(tmp_path_factory) -> Path:
    """A randomly initialised tiny Mask2Former (tiny Swin backbone, 8 queries, 5 classes) and its image
    processor config, saved hub-shaped (config.json, weights, preprocessor_config.json) for
    ``from_pretrained(path, local_files_only=True)``. Inputs: shortest edge 64, longest 128, sides
    rounded up to multiples of 32."""
    import torch
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig
    from transformers.models.mask2former.image_processing_pil_mask2former import Mask2FormerImageProcessorPil

    swin = SwinConfig(image_size=64, patch_size=4, embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                      window_size=4, out_features=["stage1", "stage2", "stage3", "stage4"])
    # the pixel decoder's GroupNorm(32, ...) needs widths that are multiples of 32
    config = Mask2FormerConfig(backbone_config=swin, feature_size=32, mask_feature_size=32, hidden_dim=32,
                               encoder_feedforward_dim=32, encoder_layers=1, decoder_layers=2, num_attention_heads=2,
                               dim_feedforward=32, num_queries=8, num_labels=5)
    path = tmp_path_factory.mktemp("tiny-mask2former")
    torch.manual_seed(0)
    Mask2FormerForUniversalSegmentation(config).save_pretrained(path)
    Mask2FormerImageProcessorPil(size={"shortest_edge": 64, "longest_edge": 128}, size_divisor=32).save_pretrained(path)
    return path
