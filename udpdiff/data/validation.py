"""Data contract for the clip manifest, checked with Great Expectations (GX 1.x).

One report covers two kinds of checks:

* table/column expectations GX evaluates directly on the manifest (schema, types, ranges, sets,
  uniqueness, non-empty captions, minimum frame count, expected frame size);
* per-row checks GX cannot do (they open files): computed here in Python and stored as derived
  boolean columns ``video_ok`` and ``dense_maps_ok``, which GX then expects to be all ``True``.
  The reason each row failed is kept and merged into the human-readable failures and into the
  report's ``meta["udpdiff"]``.

The full GX validation result (JSON) is written to ``report_path`` atomically.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

# GX logs chatty INFO records (e.g. about its docs decorators) while importing; unless the
# application configured the "great_expectations" logger itself, keep it at WARNING.
if logging.getLogger("great_expectations").level == logging.NOTSET:
    logging.getLogger("great_expectations").setLevel(logging.WARNING)

import great_expectations as gx
from great_expectations.data_context.types.base import (
    DataContextConfig,
    InMemoryStoreBackendDefaults,
    ProgressBarsConfig,
)

from udpdiff.io.atomic import write_text
from udpdiff.io.dense import DenseMapError, load_depth, load_ids
from udpdiff.io.manifest import MANIFEST_COLUMNS, SOURCES, SPLITS, is_extra_column, resolve
from udpdiff.io.video import VideoReadError, probe_video

logger = logging.getLogger(__name__)

DERIVED_COLUMNS = ("video_ok", "dense_maps_ok")
_PY_TYPES = {"str": ["str"], "int": ["int64", "int32"], "float": ["float64", "float32"]}
#: How many offending values / clip ids a failure message quotes.
MAX_EXAMPLES = 5


class DataContractError(RuntimeError):
    """The manifest violates the data contract; the message lists every failure."""


@dataclass
class ValidationResult:
    success: bool
    failures: list[str]
    report_path: Path
    num_rows: int = 0
    row_problems: dict[str, list[str]] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# per-row checks (things GX cannot see: the files)
# ----------------------------------------------------------------------------------------------


def _as_int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _check_video(manifest: Path, row: dict, check_decode: bool) -> list[str]:
    rel = row.get("video_path")
    if not isinstance(rel, str) or not rel:
        return ["video_path is empty"]
    path = resolve(manifest, rel)
    if not path.is_file():
        return [f"video file {rel} does not exist"]
    if not check_decode:
        return []
    try:
        info = probe_video(path)
    except VideoReadError as exc:
        return [f"video {rel} unreadable: {exc.problem}"]
    problems = []
    n = _as_int(row.get("num_frames"))
    if n is not None and info.num_frames != n:
        problems.append(f"video {rel} has {info.num_frames} frames, manifest says {n}")
    hw = (_as_int(row.get("height")), _as_int(row.get("width")))
    if hw != (info.height, info.width):
        problems.append(f"video {rel} is {info.height}x{info.width}, manifest says {hw[0]}x{hw[1]}")
    return problems


def _check_dense(manifest: Path, row: dict, require_dense: bool) -> list[str]:
    problems: list[str] = []
    expected = (
        _as_int(row.get("num_frames")),
        _as_int(row.get("height")),
        _as_int(row.get("width")),
    )
    for kind, column in (("seg", "seg_path"), ("depth", "depth_path")):
        rel = row.get(column)
        if not isinstance(rel, str) or not rel:
            if require_dense:
                problems.append(f"{column} is empty")
            continue
        path = resolve(manifest, rel)
        if not path.exists():
            problems.append(f"{kind} file {rel} does not exist")
            continue
        try:
            array = load_ids(path) if kind == "seg" else load_depth(path)
        except DenseMapError as exc:
            problems.append(f"{kind} file {rel}: {exc.problem}")
            continue
        if array.shape != expected:
            problems.append(
                f"{kind} file {rel} has shape (T,H,W)={array.shape}, manifest says {expected}"
            )
        if kind == "seg":
            found = int(np.count_nonzero(np.unique(array) > 0))
            declared = _as_int(row.get("num_entities"))
            if declared is not None and found != declared:
                problems.append(
                    f"seg file {rel} has {found} entity ids, manifest num_entities={declared}"
                )
    return problems


# ----------------------------------------------------------------------------------------------
# GX suite
# ----------------------------------------------------------------------------------------------


def _context() -> Any:
    # In-memory context, no usage statistics, no progress bars (they spam logs in pipelines).
    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(),
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False, metric_calculations=False),
    )
    return gx.get_context(mode="ephemeral", project_config=config)


def _build_suite(
    columns: list[str], min_frames: int, expected_size: tuple[int, int] | None
) -> gx.ExpectationSuite:
    expect = gx.expectations
    suite = gx.ExpectationSuite(name="udpdiff_manifest_contract")
    present = set(columns)

    def add(expectation: Any) -> None:
        suite.add_expectation(expectation)

    # optional curation_* columns (filter scores, provenance) are allowed; any other extra is not
    extras = sorted(c for c in columns if is_extra_column(c))
    add(
        expect.ExpectTableColumnsToMatchSet(
            column_set=[*MANIFEST_COLUMNS, *extras, *DERIVED_COLUMNS], exact_match=True
        )
    )
    add(expect.ExpectTableRowCountToBeBetween(min_value=1))
    # Column-level expectations only for columns that exist: a missing column is reported once,
    # by the table expectation above, instead of as a crash of every expectation using it.
    for name, kind in MANIFEST_COLUMNS.items():
        if name not in present:
            continue
        add(expect.ExpectColumnValuesToNotBeNull(column=name))
        add(expect.ExpectColumnValuesToBeInTypeList(column=name, type_list=_PY_TYPES[kind]))

    for name in extras:  # numbers (NaN = not measured) or strings
        add(expect.ExpectColumnValuesToBeInTypeList(column=name, type_list=_PY_TYPES["float"] + _PY_TYPES["str"]))

    def has(*names: str) -> bool:
        return all(n in present for n in names)

    if has("clip_id"):
        add(expect.ExpectColumnValuesToBeUnique(column="clip_id"))
        add(expect.ExpectColumnValuesToMatchRegex(column="clip_id", regex=r"^[A-Za-z0-9_.-]+$"))
    if has("num_frames"):
        add(expect.ExpectColumnValuesToBeBetween(column="num_frames", min_value=min_frames))
    for name in ("caption_long", "caption_short"):
        if has(name):
            add(expect.ExpectColumnValueLengthsToBeBetween(column=name, min_value=1))
            add(expect.ExpectColumnValuesToMatchRegex(column=name, regex=r"\S"))
    for name in ("video_path", "seg_path", "depth_path"):
        if has(name):  # stored paths are relative to the manifest's folder
            add(expect.ExpectColumnValuesToNotMatchRegex(column=name, regex=r"^/"))
    if has("video_path"):
        add(expect.ExpectColumnValueLengthsToBeBetween(column="video_path", min_value=1))
    if has("fps"):
        add(expect.ExpectColumnValuesToBeBetween(column="fps", min_value=0, strict_min=True))
    for name in ("height", "width"):
        if has(name):
            add(expect.ExpectColumnValuesToBeBetween(column=name, min_value=1))
    if expected_size is not None:
        for name, value in zip(("height", "width"), expected_size, strict=True):
            if has(name):
                add(
                    expect.ExpectColumnValuesToBeBetween(
                        column=name, min_value=value, max_value=value
                    )
                )
    if has("num_entities"):
        add(expect.ExpectColumnValuesToBeBetween(column="num_entities", min_value=0))
    if has("motion_score"):
        add(expect.ExpectColumnValuesToBeBetween(column="motion_score", min_value=0))
    if has("aesthetic_score"):
        add(
            expect.ExpectColumnValuesToBeBetween(column="aesthetic_score", min_value=0, max_value=1)
        )
    if has("split"):
        add(expect.ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLITS)))
    if has("source"):
        add(expect.ExpectColumnValuesToBeInSet(column="source", value_set=list(SOURCES)))
    for name in DERIVED_COLUMNS:
        add(expect.ExpectColumnValuesToBeInSet(column=name, value_set=[True]))
    return suite


# what differs between two validations of the same data (random ids, clock times): left out, so the
# report is a pure function of the manifest and DVC never re-runs the stages after it for nothing
# (when it ran is on the stage's MLflow run)
_RUN_IDENTITY = {"id", "validation_id", "run_id", "run_time", "validation_time", "ge_load_time"}


def _without_run_identity(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _without_run_identity(v) for k, v in obj.items() if k not in _RUN_IDENTITY}
    if isinstance(obj, list):
        return [_without_run_identity(v) for v in obj]
    return obj


def _describe(result: dict, derived_problems: dict[str, dict[str, list[str]]]) -> str:
    config = result["expectation_config"]
    etype = config["type"]
    column = config["kwargs"].get("column")
    res = result.get("result", {}) or {}
    head = f"{etype}" + (f" on column {column!r}" if column else "")
    exc = result.get("exception_info") or {}
    if exc.get("raised_exception"):
        return f"{head}: could not be evaluated ({exc.get('exception_message')})"
    kwargs = {
        k: v
        for k, v in config["kwargs"].items()
        if k not in ("column", "batch_id", "result_format") and v is not None
    }
    if column in DERIVED_COLUMNS:
        per_clip = derived_problems.get(column, {})
        clips = list(per_clip)
        details = "; ".join(f"{cid}: {', '.join(per_clip[cid])}" for cid in clips[:MAX_EXAMPLES])
        more = f" (+{len(clips) - MAX_EXAMPLES} more)" if len(clips) > MAX_EXAMPLES else ""
        return f"{head}: {len(clips)} clip(s) failed file checks: {details}{more}"
    if "details" in res and "mismatched" in (res["details"] or {}):
        return f"{head}: columns mismatched {res['details']['mismatched']}"
    if "unexpected_count" in res:
        idx = res.get("unexpected_index_list") or []
        examples = [
            f"clip_id={item.get('clip_id')!r} value={item.get(column)!r}"
            if isinstance(item, dict)
            else repr(item)
            for item in idx[:MAX_EXAMPLES]
        ] or [repr(v) for v in (res.get("partial_unexpected_list") or [])[:MAX_EXAMPLES]]
        return f"{head} {kwargs}: {res['unexpected_count']} unexpected value(s), e.g. " + ", ".join(
            examples
        )
    return f"{head} {kwargs}: observed {res.get('observed_value')!r}"


def validate_manifest(
    manifest_path: str | os.PathLike,
    min_frames: int,
    expected_size: tuple[int, int] | None = None,
    report_path: str | os.PathLike | None = None,
    require_dense: bool = True,
    check_videos: bool = True,
) -> ValidationResult:
    """Check a manifest and its files against the data contract; write one JSON report.

    Args:
        min_frames: every clip needs at least this many frames.
        expected_size: ``(H, W)`` every clip must have (a training profile), or ``None``.
        report_path: where the GX result JSON goes (default: ``validation_report.json`` beside
            the manifest).
        require_dense: empty ``seg_path`` / ``depth_path`` fail (set False for raw real clips
            awaiting annotation; maps that are present are still checked).
        check_videos: also open every video and compare its frame count and size with the row
            (cheap: demux only, no decoding); when False only existence is checked.
    """
    manifest = Path(manifest_path)
    report = (
        Path(report_path)
        if report_path is not None
        else manifest.with_name("validation_report.json")
    )
    try:
        df = pd.read_parquet(manifest)
    except Exception as exc:
        failure = f"manifest {manifest} is not a readable parquet file ({exc})"
        write_text(report, json.dumps({"success": False, "failures": [failure]}, indent=2))
        return ValidationResult(False, [failure], report)

    # Per-row file checks -> derived columns.
    row_problems: dict[str, list[str]] = {}  # clip_id -> every file problem of that clip
    derived: dict[str, list[bool]] = {name: [] for name in DERIVED_COLUMNS}
    derived_problems: dict[str, dict[str, list[str]]] = {name: {} for name in DERIVED_COLUMNS}
    for i, row in enumerate(df.to_dict("records")):
        cid = str(row.get("clip_id", f"<row {i}>"))
        checks = {
            "video_ok": _check_video(manifest, row, check_videos),
            "dense_maps_ok": _check_dense(manifest, row, require_dense),
        }
        for name, problems in checks.items():
            derived[name].append(not problems)
            if problems:
                derived_problems[name][cid] = problems
                row_problems.setdefault(cid, []).extend(problems)

    data = df.copy()
    for name, kind in MANIFEST_COLUMNS.items():
        # object dtype makes GX check the Python type of every value (so a stray int in a string
        # column is caught per row) instead of comparing pandas' string dtype name.
        if kind == "str" and name in data.columns:
            data[name] = data[name].astype(object)
    for name in data.columns:
        if is_extra_column(name) and not pd.api.types.is_numeric_dtype(data[name]):
            data[name] = data[name].astype(object)
    for name, values in derived.items():
        data[name] = pd.Series(values, index=data.index, dtype=bool)

    context = _context()
    batch_def = (
        context.data_sources.add_pandas("manifest")
        .add_dataframe_asset("clips")
        .add_batch_definition_whole_dataframe("all_clips")
    )
    suite = context.suites.add(_build_suite(list(df.columns), min_frames, expected_size))
    validation = context.validation_definitions.add(
        gx.ValidationDefinition(name="manifest_contract", data=batch_def, suite=suite)
    )
    result_format: dict[str, Any] = {"result_format": "COMPLETE"}
    if "clip_id" in data.columns:
        result_format["unexpected_index_column_names"] = ["clip_id"]
    gx_result = validation.run(batch_parameters={"dataframe": data}, result_format=result_format)
    as_dict = gx_result.to_json_dict()

    failures = [_describe(r, derived_problems) for r in as_dict["results"] if not r["success"]]
    success = bool(as_dict["success"]) and not failures
    as_dict = _without_run_identity(as_dict)
    as_dict.setdefault("meta", {})["udpdiff"] = {
        "manifest": os.path.relpath(manifest, Path(report).parent),
        "min_frames": min_frames,
        "expected_size": list(expected_size) if expected_size else None,
        "failures": failures,
        "row_problems": row_problems,
    }
    write_text(report, json.dumps(as_dict, indent=2, default=str))
    level = logging.INFO if success else logging.ERROR
    logger.log(
        level,
        "manifest %s: %s (%d rows, %d failures; report %s)",
        manifest,
        "valid" if success else "INVALID",
        len(df),
        len(failures),
        report,
    )
    return ValidationResult(success, failures, report, len(df), row_problems)


def assert_valid(
    manifest_path: str | os.PathLike,
    min_frames: int,
    expected_size: tuple[int, int] | None = None,
    report_path: str | os.PathLike | None = None,
    **kwargs: Any,
) -> ValidationResult:
    """:func:`validate_manifest`, raising :class:`DataContractError` listing the failures."""
    result = validate_manifest(manifest_path, min_frames, expected_size, report_path, **kwargs)
    if not result.success:
        listing = "\n".join(f"  - {f}" for f in result.failures)
        raise DataContractError(
            f"manifest {manifest_path} violates the data contract "
            f"({len(result.failures)} failures; report {result.report_path}):\n{listing}"
        )
    return result
