"""The `validate` stage: the Great Expectations data contract."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from udpdiff.stages.common import (
    StepResult,
    write_json,
)

if TYPE_CHECKING:
    from udpdiff.config import Params
    from udpdiff.paths import ProjectPaths

logger = logging.getLogger(__name__)


def run(p: Params, paths: ProjectPaths) -> StepResult:
    """The data contract; raises DataContractError (report already written) when it breaks."""
    from udpdiff.data.validation import DataContractError, validate_manifest

    d = p.active.data
    report = paths.validation / "report.json"
    result = validate_manifest(paths.manifest, min_frames=d.num_frames, expected_size=(d.height, d.width),
                               report_path=report)
    metrics = {"contract_success": float(result.success), "contract_failures": float(len(result.failures))}
    write_json(paths.validation / "summary.json", {**metrics, "failures": result.failures})
    if not result.success:
        err = DataContractError(f"{paths.manifest}: data contract failed (report: {report}):\n  - "
                                + "\n  - ".join(result.failures))
        err.artifacts = [report, paths.validation / "summary.json"]  # for the caller to keep/log
        raise err
    return StepResult(metrics=metrics, artifacts=[report])
