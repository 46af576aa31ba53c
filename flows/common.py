"""What every flow shares: locating the repository and loading the validated params."""

from __future__ import annotations

import os
from pathlib import Path

# Prefect's server would otherwise phone home and race on its telemetry row; set before import.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from udpdiff.config import Params, load_params  # noqa: E402
from udpdiff.paths import ProjectPaths  # noqa: E402

REPO_ROOT = Path(os.environ.get("UDPDIFF_ROOT", Path(__file__).resolve().parents[1]))


def load(profile: str | None = None) -> tuple[Params, ProjectPaths]:
    """Params and paths of the active profile (``profile`` overrides params.yaml's)."""
    p = load_params(REPO_ROOT / "params.yaml", profile=profile)
    return p, ProjectPaths(REPO_ROOT, p.profile)
