"""The ablation table (paper Tabs 5-7) as a DataFrame: columns, order, missing values, bad input; and the one
table renderer (pandas) that writes it and the paper tables as markdown and HTML."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pandas as pd
import pytest

from udpdiff.evaluation.tables import (
    ABLATION_MS_FLOW_NOTE,
    Table,
    ablation_columns,
    ablation_frame,
    html_document,
    markdown_document,
)

ROWS = [
    {"variant": "base (params.yaml)", "depth/subject_consistency": 0.91, "depth/motion_smoothness_flow": 0.97,
     "depth/fvd": 410.5, "depth/gt_delta1": 0.62, "segmentation/gt_miou": 0.41, "depth/num_videos": 8,
     "rgb/pixel_frame_consistency": 0.88, "rgb/caption_sky": 0.75},
    {"variant": "text-prompt", "depth/subject_consistency": 0.90, "depth/motion_smoothness_flow": 0.96,
     "segmentation/background_consistency": 0.93, "depth/gt_delta1": None},
]
OVERRIDES = {"text-prompt": {"train.task_conditioning": "text", "train.tasks": ["depth"]}}


def test_columns_in_the_papers_order_and_only_those_some_row_has():
    assert ablation_columns(ROWS) == [
        ("depth/subject_consistency", "depth SC (↑)"),
        ("depth/motion_smoothness_flow", "depth MS† (↑)"),
        ("depth/fvd", "depth FVD (↓)"),
        ("segmentation/background_consistency", "seg BC (↑)"),
        ("depth/gt_delta1", "depth δ1 GT (↑)"),
        ("segmentation/gt_miou", "seg mIoU GT (↑)"),
        ("rgb/pixel_frame_consistency", "rgb pixel consistency (↑)"),
        ("rgb/caption_sky", "rgb sky as captioned (↑)"),  # text following last: not a paper column
    ]


def test_amt_motion_smoothness_is_ms_and_flow_prior_is_ms_dagger():
    cols = dict(ablation_columns([{"variant": "a", "rgb/motion_smoothness": 0.98, "rgb/motion_smoothness_flow": 0.9}]))
    assert cols == {"rgb/motion_smoothness": "rgb MS (↑)", "rgb/motion_smoothness_flow": "rgb MS† (↑)"}


def test_frame_one_row_per_variant():
    df = ablation_frame(ROWS, OVERRIDES)
    assert list(df.columns) == ["variant", "depth SC (↑)", "depth MS† (↑)", "depth FVD (↓)", "seg BC (↑)",
                                "depth δ1 GT (↑)", "seg mIoU GT (↑)", "rgb pixel consistency (↑)",
                                "rgb sky as captioned (↑)", "overrides"]
    assert list(df["variant"]) == ["base (params.yaml)", "text-prompt"]
    assert df.loc[0, "depth FVD (↓)"] == 410.5 and math.isnan(df.loc[1, "depth FVD (↓)"])
    assert math.isnan(df.loc[1, "depth δ1 GT (↑)"])  # None: not computed
    assert df.loc[0, "overrides"] == "" and json.loads(df.loc[1, "overrides"]) == OVERRIDES["text-prompt"]
    assert df.attrs["keys"]["depth SC (↑)"] == "depth/subject_consistency"
    assert df.attrs["notes"] == [ABLATION_MS_FLOW_NOTE]
    assert all(df[c].dtype.kind == "f" for c in df.columns if c not in ("variant", "overrides"))


def test_no_flow_prior_no_note_and_markdown_renders():
    df = ablation_frame([{"variant": "a", "depth/motion_smoothness": 0.98}], {})
    assert df.attrs["notes"] == []
    assert "depth MS (↑)" in df.to_markdown(index=False)


@pytest.mark.parametrize(("rows", "error", "match"), [
    ([], ValueError, "at least one variant"),
    ({"variant": "a"}, TypeError, "list of dicts"),
    (["a"], TypeError, "row 0 must be a dict"),
    ([{"depth/fvd": 1.0}], ValueError, "non-empty 'variant'"),
    ([{"variant": "a"}, {"variant": "a"}], ValueError, "appears twice"),
    ([{"variant": "a", "depth/fvd": "high"}], ValueError, r"'a': depth/fvd \(depth FVD"),
    ([{"variant": "a", "depth/fvd": True}], ValueError, "must be a number"),
])
def test_bad_rows_are_reported(rows, error, match):
    with pytest.raises(error, match=match):
        ablation_frame(rows, {})


def test_bad_overrides_are_reported():
    with pytest.raises(TypeError, match="overrides must be a dict"):
        ablation_frame([{"variant": "a"}], [("a", {})])


def test_table_markdown_keeps_formatted_cells_and_escapes_pipes():
    t = Table("Generation", ["Model", "SC (↑)", "FVD (↓)"], [["UDPDiff|depth", "95.10", ""], ["real", "1.00", "3"]],
              ["SC in %."])
    lines = t.markdown().splitlines()
    assert lines[0] == "### Generation"
    cells = [[c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]] for line in lines[2:6]]  # unescaped pipes
    assert cells[0] == ["Model", "SC (↑)", "FVD (↓)"]
    assert cells[1][0].startswith(":") and cells[1][1].endswith(":")  # names left, numbers right
    assert cells[2] == ["UDPDiff\\|depth", "95.10", ""]  # "95.10" stays as formatted, not 95.1
    assert cells[3] == ["real", "1.00", "3"]
    assert "SC in %." in lines[-1]


def test_table_html_escapes_and_documents_hold_every_table():
    a = Table("A <1>", ["Model", "x"], [["a<b", "0.5000"]], ["note & more"])
    b = Table("", ["variant", "y"], [["v", ""]])
    page = html_document("Report", [a, b], notes=["general"])
    assert page.startswith("<!doctype html>") and "<h1>Report</h1>" in page
    assert "<h3>A &lt;1&gt;</h3>" in page and "<td>a&lt;b</td>" in page and "note &amp; more" in page
    assert page.count("<table") == 2 and page.count("<h3>") == 2  # A's title and "Notes"; b is untitled
    md = markdown_document("Report", [a, b], notes=["general"])
    assert md.startswith("# Report\n") and md.count("### ") == 2 and "- general" in md


def test_table_from_frame_formats_floats_and_blanks_missing_values():
    df = pd.DataFrame({"variant": ["a", "b"], "δ1": [0.123456, np.nan], "steps": [10, 20], "overrides": ["{}", ""]})
    t = Table.from_frame("", df, floatfmt=".3f", footnotes=["n"])
    assert t.columns == ["variant", "δ1", "steps", "overrides"]
    assert t.rows == [["a", "0.123", "10", "{}"], ["b", "", "20", ""]]
    assert t.footnotes == ["n"] and not t.markdown().startswith("###")


def test_ground_truth_depth_table_says_when_a_fit_flipped_the_prediction():
    from udpdiff.evaluation.tables import ground_truth_tables

    def notes(reversed_: float) -> str:
        m = {"depth": {"gt_delta1": 0.9, "gt_abs_rel": 0.1, "gt_rmse": 0.05, "gt_fit_reversed": reversed_}}
        (table,) = ground_truth_tables(m)
        return " ".join(table.footnotes)

    assert "negative scale" not in notes(0.0)
    assert "25% of the predictions were aligned with a negative scale" in notes(0.25)
