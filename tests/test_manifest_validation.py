"""Tests for the manifest schema (udpdiff.io.manifest) and the GX data contract."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from udpdiff.data.synthetic import synthesize_dataset
from udpdiff.data.validation import DataContractError, assert_valid, validate_manifest
from udpdiff.io.dense import load_ids, save_ids
from udpdiff.io.manifest import (
    MANIFEST_COLUMNS,
    ManifestError,
    aesthetic_proxy,
    assign_splits,
    read_manifest,
    resolve,
    write_manifest,
)

T, H, W = 9, 32, 32


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pristine")
    synthesize_dataset(root / "ds", 6, T, H, W, fps=8, seed=11, val_fraction=0.2)
    return root / "ds"


@pytest.fixture
def dataset(pristine: Path, tmp_path: Path) -> Path:
    """A fresh, writable copy of the good dataset; returns its manifest path."""
    shutil.copytree(pristine, tmp_path / "ds")
    return tmp_path / "ds" / "manifest.parquet"


def _edit(manifest: Path, **changes: tuple[int, object]) -> list[str]:
    """Set ``column=(row, value)`` in the manifest (bypassing write_manifest's checks)."""
    df = pd.read_parquet(manifest)
    for column, (row, value) in changes.items():
        df.loc[row, column] = value
    df.to_parquet(manifest, index=False)
    return df["clip_id"].tolist()


# ------------------------------------------------------------------------------------ schema


def test_schema_round_trip(dataset: Path) -> None:
    df = read_manifest(dataset)
    assert list(df.columns) == list(MANIFEST_COLUMNS)
    out = dataset.with_name("copy.parquet")
    write_manifest(df.sample(frac=1.0, random_state=0), out)
    back = read_manifest(out)
    assert sorted(back["clip_id"]) == sorted(df["clip_id"])
    assert resolve(dataset, df["video_path"][0]) == dataset.parent / df["video_path"][0]


def test_missing_column_names_file(dataset: Path) -> None:
    df = pd.read_parquet(dataset).drop(columns=["depth_path"])
    df.to_parquet(dataset, index=False)
    with pytest.raises(ManifestError, match=r"manifest\.parquet.*missing columns \['depth_path'\]"):
        read_manifest(dataset)


def test_write_manifest_rejects_bad_dtypes(tmp_path: Path, dataset: Path) -> None:
    df = read_manifest(dataset)
    bad = df.assign(num_frames=df["num_frames"].astype(float))
    with pytest.raises(ManifestError, match="num_frames"):
        write_manifest(bad, tmp_path / "m.parquet")
    bad = df.assign(extra=1)
    with pytest.raises(ManifestError, match="unknown columns"):
        write_manifest(bad, tmp_path / "m.parquet")
    assert not (tmp_path / "m.parquet").exists()


def test_assign_splits_deterministic() -> None:
    ids = [f"c{i}" for i in range(20)]
    a = assign_splits(ids, 0.25, seed=1)
    assert a == assign_splits(list(reversed(ids)), 0.25, seed=1)[::-1]  # order independent
    assert a.count("val") == 5
    assert assign_splits(ids[:1], 0.5) == ["train"]


def test_aesthetic_proxy_range() -> None:
    assert aesthetic_proxy(np.full((2, 8, 8, 3), 128, np.uint8)) == 0.0
    rng = np.random.default_rng(0)
    value = aesthetic_proxy((rng.random((2, 8, 8, 3)) * 255).astype(np.uint8))
    assert 0.3 < value <= 1.0


# ---------------------------------------------------------------------------------- contract


def test_good_dataset_validates(dataset: Path, tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    result = assert_valid(dataset, min_frames=T, expected_size=(H, W), report_path=report)
    assert result.success, result.failures
    assert result.failures == [] and result.num_rows == 6
    data = json.loads(report.read_text())
    assert data["success"] is True
    types = {r["expectation_config"]["type"] for r in data["results"]}
    assert {
        "expect_table_columns_to_match_set",
        "expect_column_values_to_be_unique",
        "expect_column_values_to_be_in_set",
        "expect_column_value_lengths_to_be_between",
    } <= types


def test_broken_dataset_fails_with_named_problems(dataset: Path, tmp_path: Path) -> None:
    df = read_manifest(dataset)
    ids = df["clip_id"].tolist()
    root = dataset.parent
    # 1. delete a depth file
    (root / df.loc[0, "depth_path"]).unlink()
    # 2. truncate a seg map to fewer frames
    seg = root / df.loc[1, "seg_path"]
    save_ids(seg, load_ids(seg)[:4])
    # 3. empty caption, 4. too few frames, 5. duplicate id, 6. bad split
    _edit(dataset, caption_short=(2, ""), num_frames=(3, 5), clip_id=(4, ids[5]), split=(5, "test"))

    report = tmp_path / "report.json"
    with pytest.raises(DataContractError, match="does not exist") as info:
        assert_valid(dataset, min_frames=T, expected_size=(H, W), report_path=report)
    data = json.loads(report.read_text())
    assert data["success"] is False
    failures = data["meta"]["udpdiff"]["failures"]
    assert all(f in str(info.value) for f in failures)  # the exception lists every failure
    text = "\n".join(failures)
    assert f"{ids[0]}: depth file depth/{ids[0]}.npz does not exist" in text
    assert f"seg file seg/{ids[1]}.npz has shape (T,H,W)=(4, {H}, {W})" in text
    assert any("caption_short" in f and repr(ids[2]) in f for f in failures)
    assert any("num_frames" in f and repr(ids[3]) in f and "value=5" in f for f in failures)
    assert any("expect_column_values_to_be_unique" in f and ids[5] in f for f in failures)
    assert any("'split'" in f and "'test'" in f for f in failures)
    # the frame-count lie is also caught by opening the video
    assert f"{ids[3]}: video videos/{ids[3]}.mp4 has {T} frames, manifest says 5" in text


def test_expected_size_and_missing_column(dataset: Path, tmp_path: Path) -> None:
    result = validate_manifest(dataset, T, expected_size=(H, 2 * W), report_path=tmp_path / "r")
    assert not result.success
    assert any("'width'" in f and f"value={W}" in f for f in result.failures)

    df = pd.read_parquet(dataset).drop(columns=["motion_score"])
    df.to_parquet(dataset, index=False)
    result = validate_manifest(dataset, T, report_path=tmp_path / "r2")
    assert not result.success
    assert any("motion_score" in f and "mismatched" in f for f in result.failures)
    assert (tmp_path / "r2").exists()


def test_unreadable_manifest(tmp_path: Path) -> None:
    bad = tmp_path / "manifest.parquet"
    bad.write_text("nope")
    result = validate_manifest(bad, 1, report_path=tmp_path / "r.json")
    assert not result.success and "manifest.parquet" in result.failures[0]
    assert json.loads((tmp_path / "r.json").read_text())["success"] is False
