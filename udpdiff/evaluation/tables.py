"""Result tables in the paper's layouts (Tabs 1-4), as markdown and as standalone HTML.

Input is the ``metrics`` dict the evaluate step writes (``{set: {metric: value}}``, sets being
``real``, ``segmentation``, ``depth`` or ``rgb``) plus the runtime measured by the sample step.
SC, BC and MS are shown as percentages with two decimals, as in the paper; FVD with two decimals;
depth with four. A metric that was not computed is an empty cell, explained in the notes.
"""

from __future__ import annotations

import html
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

MS_AMT, MS_FLOW = "motion_smoothness", "motion_smoothness_flow"


@dataclass
class Table:
    """One titled table of formatted cells; rendered by pandas (``to_markdown`` / ``to_html``), the
    project's one table renderer, for the reports, the evaluate step and the ablation tables."""

    title: str
    columns: list[str]                   # header labels
    rows: list[list[str]]                # formatted cells
    footnotes: list[str] = field(default_factory=list)

    @classmethod
    def from_frame(cls, title: str, df: pd.DataFrame, floatfmt: str = ".4f",
                   footnotes: Sequence[str] = ()) -> Table:
        """A DataFrame's values as cells: floats with ``floatfmt``, NaN/None as empty cells."""
        import pandas as pd

        def cell(v: object) -> str:
            if pd.isna(v):  # None, NaN of any float type
                return ""
            if isinstance(v, numbers.Real) and not isinstance(v, numbers.Integral):  # numpy floats included
                return format(float(v), floatfmt)
            return str(v)

        rows = [[cell(v) for v in record] for record in df.itertuples(index=False, name=None)]
        return cls(title, [str(c) for c in df.columns], rows, list(footnotes))

    def frame(self) -> pd.DataFrame:
        import pandas as pd

        return pd.DataFrame(self.rows, columns=self.columns, dtype=object)

    def markdown(self) -> str:
        # cells are already formatted: tabulate must not re-parse "95.10" as 95.1; a pipe would split a cell
        df = self.frame().map(lambda c: str(c).replace("|", "\\|").replace("\n", " "))
        df.columns = [c.replace("|", "\\|") for c in self.columns]
        body = df.to_markdown(index=False, disable_numparse=True,
                              colalign=("left", *("right",) * (len(self.columns) - 1)))
        notes = "".join(f"\n{n}\n" for n in self.footnotes)
        heading = f"### {self.title}\n\n" if self.title else ""  # untitled: the document's title says it
        return f"{heading}{body}\n{notes}"

    def html(self) -> str:
        notes = "".join(f"<p class='note'>{html.escape(n)}</p>" for n in self.footnotes)
        heading = f"<h3>{html.escape(self.title)}</h3>" if self.title else ""
        return f"{heading}{self.frame().to_html(index=False, border=0)}{notes}"


def _fmt(value: float | None, scale: float = 1.0, digits: int = 2) -> str:
    if value is None or not math.isfinite(float(value)):
        return ""
    return f"{float(value) * scale:.{digits}f}"


def _count(value: float | None) -> str:
    return "" if value is None else str(int(value))


def set_label(name: str) -> str:
    return {"real": "Real clips (reference)", "rgb": "CogVideoX, fine-tuned RGB only (16 ch)",
            "segmentation": "UDPDiff (seg)", "depth": "UDPDiff (depth)"}.get(name, f"UDPDiff ({name})")


def generation_table(metrics: Mapping[str, Mapping[str, float]], sets: Sequence[str]) -> Table:
    """Tabs 1-2: SC | BC | MS | FVD per sample set (plus the real clips' own scores)."""
    uses_flow = any(MS_FLOW in metrics.get(s, {}) for s in sets)
    ms = "MS† (↑)" if uses_flow else "MS (↑)"
    following = any(math.isfinite(metrics.get(s, {}).get("caption_sky", math.nan)) for s in ["real", *sets])
    cols = ["Model", "SC (↑)", "BC (↑)", ms, "FVD (↓)", *(["sky as captioned (↑)", "ground as captioned (↑)"]
                                                          if following else []), "videos", "frames"]
    rows = []
    for s in ["real", *sets]:
        m = metrics.get(s)
        if m is None:
            continue
        rows.append([set_label(s), _fmt(m.get("subject_consistency"), 100), _fmt(m.get("background_consistency"), 100),
                     _fmt(m.get(MS_AMT, m.get(MS_FLOW)), 100), _fmt(m.get("fvd")),
                     *([_fmt(m.get("caption_sky"), 100), _fmt(m.get("caption_ground"), 100)] if following else []),
                     _count(m.get("num_videos")), _count(m.get("num_frames"))])
    notes = ["SC, BC, MS in %. FVD against the cached I3D statistics of the real split; it is biased by the "
             "number of videos and of frames, shown beside it."]
    if following:
        notes.append("Sky / ground as captioned: % of videos whose sky and ground colour are the ones the prompt "
                     "names (synthetic captions; nearest of the generator's colours; chance 25 % / 14 %). The "
                     "real clips' row is the check's own ceiling.")
    scored = [metrics[s] for s in sets if "fvd" in metrics.get(s, {})]
    fvd_frames = {int(m["fvd_num_frames"]) for m in scored}
    fvd_reference = {int(m["fvd_reference_videos"]) for m in scored}
    if fvd_frames:
        notes.append(f"FVD uses the first {'/'.join(map(str, sorted(fvd_frames)))} frames of each video; reference: "
                     f"{'/'.join(map(str, sorted(fvd_reference)))} real clips.")
    if uses_flow:
        notes.append("† MS from the offline OpenCV optical-flow prior, not VBench's AMT model: "
                     "not comparable to the paper's MS column.")
    return Table("Generation quality (paper Tabs 1–2)", cols, rows, notes)


def depth_pseudo_gt_table(metrics: Mapping[str, Mapping[str, float]], names: Mapping[str, str]) -> Table | None:
    """Tab 3: δ1 | RMSE of depth on generated videos against the annotator's pseudo ground truth."""
    m = metrics.get("depth", {})
    if "pseudo_delta1" not in m:
        return None
    rows = []
    if "baseline_delta1" in m:
        rows.append([names.get("depth_baseline", "baseline"), _fmt(m["baseline_delta1"], digits=4),
                     _fmt(m.get("baseline_rmse"), digits=4)])
    rows.append(["UDPDiff (depth)", _fmt(m["pseudo_delta1"], digits=4), _fmt(m.get("pseudo_rmse"), digits=4)])
    return Table("Depth of generated videos vs pseudo ground truth (paper Tab 3)", ["Model", "δ1 (↑)", "RMSE (↓)"],
                 rows, [f"Pseudo ground truth: {names.get('depth_annotator', 'depth annotator')} run on each generated "
                        "video; predictions aligned by least-squares scale and shift (evaluate.depth_alignment)."])


def ground_truth_tables(metrics: Mapping[str, Mapping[str, float]]) -> list[Table]:
    """Dense prediction *of* real clips (RGB half fixed) against their exact or annotated ground truth."""
    out = []
    d, s = metrics.get("depth", {}), metrics.get("segmentation", {})
    if "gt_delta1" in d:
        keys = ["gt_delta1", "gt_abs_rel", "gt_rmse"]
        header = ["Model", "δ1 (↑)", "AbsRel (↓)", "RMSE (↓)"]
        notes = ["δ1 / AbsRel / RMSE: normalised disparity aligned by least-squares scale and shift (the paper's "
                 "protocol)."]
        if "gt_delta1_depth" in d:
            keys += ["gt_delta1_depth", "gt_abs_rel_depth"]
            header += ["δ1, depth space (↑)", "AbsRel, depth space (↓)"]
            notes.append("Depth space: aligned in true disparity, converted to depth and scored there (the protocol "
                         "of DepthCrafter and Depth Anything; comparable with the literature's figures).")
        rows = _ensemble_rows("UDPDiff (depth)", d, keys)
        if "gt_delta1_single" in d:
            notes.append(f"Ensemble: each clip predicted with several seeds, the members aligned in scale and shift "
                         f"and fused by their median (Marigold's test-time ensembling, sample.dense_ensemble_size); "
                         f"one sample: its first member alone. The members disagree by "
                         f"{_fmt(d.get('ensemble_uncertainty'), digits=3)} (median absolute deviation, mean).")
        if d.get("gt_fit_reversed", 0.0) > 0:  # the fit flipped these: near and far swapped, forgiven by δ1
            notes.append(f"{d['gt_fit_reversed']:.0%} of the predictions were aligned with a negative scale: read "
                         "backwards (near and far swapped), which the scale-and-shift fit forgives.")
        out.append(Table("Depth of real validation clips vs ground truth", header, rows, notes))
    if "gt_miou" in s or "pseudo_miou" in s:
        notes = ["mIoU after Hungarian matching of decoded entities per video; temporal id consistency = fraction "
                 "of pixels inside a ground-truth entity whose predicted id is unchanged between consecutive frames."]
        if "gt_miou_single" in s:
            notes.append(f"Ensemble: each clip predicted with several seeds, the members' entities matched to each "
                         f"other (Hungarian on IoU) and voted per pixel (sample.dense_ensemble_size); one sample: its "
                         f"first member alone. The members disagree on {_fmt(s.get('ensemble_uncertainty'), digits=3)} "
                         f"of the pixels (mean). The annotator's score is of the generated videos, not ensembled.")
        out.append(Table("Entity segmentation", ["Model", "mIoU vs GT (↑)", "temporal id consistency (↑)",
                                                 "mIoU vs annotator on generated (↑)"],
                         _ensemble_rows("UDPDiff (seg)", s, ["gt_miou", "gt_temporal_id_consistency", "pseudo_miou"]),
                         notes))
    return out


def _ensemble_rows(model: str, metrics: Mapping[str, float], keys: list[str]) -> list[list[str]]:
    """One row of ``keys``; with sample.dense_ensemble_size > 1 two: the ensemble, and its first member alone
    (the ``_single`` scores, where a key has them)."""
    if f"{keys[0]}_single" not in metrics:
        return [[model, *(_fmt(metrics.get(k), digits=4) for k in keys)]]
    return [[f"{model}, {label}", *(_fmt(metrics.get(k + suffix), digits=4) for k in keys)]
            for label, suffix in (("ensemble", ""), ("one sample", "_single"))]


def runtime_table(runtime: Mapping[str, Mapping[str, float]] | None) -> Table | None:
    """Tab 4: seconds per sample and per denoising step, stock architecture beside ours."""
    if not runtime:
        return None
    order = sorted(runtime, key=lambda k: k != "stock")  # the baseline first, as in the paper
    rows = [[("CogVideoX (stock architecture)" if k == "stock" else set_label(k)),
             _fmt(runtime[k].get("seconds_per_sample"), digits=3), _fmt(runtime[k].get("seconds_per_step"), digits=4)]
            for k in order if isinstance(runtime[k], Mapping)]
    return Table("Inference time (paper Tab 4)", ["Model", "s / sample", "s / step"], rows,
                 ["Same prompt, seed, frames, size and steps; text encoding and VAE decoding included "
                  "(ours decodes the dense latent too). Medians over the timed runs."])


def all_tables(metrics: Mapping[str, Mapping[str, float]], sets: Sequence[str], names: Mapping[str, str],
               runtime: Mapping[str, Mapping[str, float]] | None = None) -> list[Table]:
    tables = [generation_table(metrics, sets), depth_pseudo_gt_table(metrics, names), *ground_truth_tables(metrics),
              runtime_table(runtime)]
    return [t for t in tables if t is not None]


_CSS = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:70em}table{border-collapse:collapse;margin:.5em 0}"
        "th,td{border:1px solid #bbb;padding:.3em .7em;text-align:right}th:first-child,td:first-child{text-align:left}"
        "th{background:#eee}.note{color:#555;font-size:.9em}")


def html_document(title: str, tables: Sequence[Table], notes: Sequence[str] = ()) -> str:
    items = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    body = "".join(t.html() for t in tables) + (f"<h3>Notes</h3><ul>{items}</ul>" if items else "")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>\n")


def markdown_document(title: str, tables: Sequence[Table], notes: Sequence[str] = ()) -> str:
    parts = [f"# {title}", "", *(t.markdown() for t in tables)]
    if notes:
        parts += ["### Notes", "", *(f"- {n}" for n in notes), ""]
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------- ablations

ABLATION_SETS = ("depth", "segmentation", "rgb")
_SET_LABEL = {"depth": "depth", "segmentation": "seg", "rgb": "rgb"}
# the paper's ablation columns (Tabs 5-7): SC | BC | MS | FVD per sample set
_ABLATION_GENERATION = (("subject_consistency", "SC (↑)"), ("background_consistency", "BC (↑)"), (MS_AMT, "MS (↑)"),
                        (MS_FLOW, "MS† (↑)"), ("fvd", "FVD (↓)"))
# then the dense-prediction scores
_ABLATION_DENSE = (("depth/gt_delta1", "depth δ1 GT (↑)"), ("depth/gt_rmse", "depth RMSE GT (↓)"),
                   ("depth/gt_delta1_depth", "depth δ1 GT, depth space (↑)"),
                   ("depth/pseudo_delta1", "depth δ1 pseudo-GT (↑)"), ("depth/pseudo_rmse", "depth RMSE pseudo-GT (↓)"),
                   ("segmentation/gt_miou", "seg mIoU GT (↑)"), ("segmentation/pseudo_miou", "seg mIoU annotator (↑)"),
                   ("depth/pixel_frame_consistency", "depth pixel consistency (↑)"),
                   ("segmentation/pixel_frame_consistency", "seg pixel consistency (↑)"),
                   ("rgb/pixel_frame_consistency", "rgb pixel consistency (↑)"))
# last, where the captions name a synthetic scene: does each set's text-to-video follow it
_ABLATION_FOLLOWING = (("caption_sky", "sky as captioned (↑)"), ("caption_ground", "ground as captioned (↑)"))
ABLATION_COLUMNS: tuple[tuple[str, str], ...] = (
    *((f"{s}/{key}", f"{_SET_LABEL[s]} {label}") for s in ABLATION_SETS for key, label in _ABLATION_GENERATION),
    *_ABLATION_DENSE,
    *((f"{s}/{key}", f"{_SET_LABEL[s]} {label}") for s in ABLATION_SETS for key, label in _ABLATION_FOLLOWING),
)
ABLATION_MS_FLOW_NOTE = ("† MS from the offline OpenCV optical-flow prior (motion_smoothness_flow), not VBench's AMT "
                         "model: not comparable to the paper's MS column.")


def _check_ablation_rows(rows: Sequence[Mapping[str, object]]) -> None:
    if isinstance(rows, Mapping) or not isinstance(rows, Sequence):
        raise TypeError(f"ablation rows must be a list of dicts (one per variant), got {type(rows).__name__}")
    seen: set[str] = set()
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise TypeError(f"ablation row {i} must be a dict, got {type(row).__name__}")
        variant = row.get("variant")
        if not isinstance(variant, str) or not variant:
            raise ValueError(f"ablation row {i} needs a non-empty 'variant' name, got {variant!r}")
        if variant in seen:
            raise ValueError(f"ablation variant {variant!r} appears twice")
        seen.add(variant)
        for key, label in ABLATION_COLUMNS:
            value = row.get(key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
                raise ValueError(f"ablation variant {variant!r}: {key} ({label}) must be a number, got {value!r}")


def ablation_columns(rows: Sequence[Mapping[str, object]]) -> list[tuple[str, str]]:
    """``(metric key, column label)`` of the paper's ablation columns that some row has a value for,
    in the paper's order: SC | BC | MS (MS† for the flow prior) | FVD per sample set (depth,
    segmentation, rgb), then depth δ1/RMSE and segmentation mIoU, then pixel consistency, then
    sky / ground as captioned per set (synthetic captions)."""
    _check_ablation_rows(rows)
    return [(key, label) for key, label in ABLATION_COLUMNS if any(r.get(key) is not None for r in rows)]


def ablation_frame(rows: Sequence[Mapping[str, object]], overrides: Mapping[str, Mapping[str, object]]) -> pd.DataFrame:
    """The ablation table as a pandas DataFrame: one row per variant (rows as ``{"variant": name,
    "depth/subject_consistency": 0.93, …}``, keys as the evaluate step flattens them), first column
    ``variant``, then the columns of :func:`ablation_columns` (values as measured, NaN where missing),
    then ``overrides`` (the variant's params.yaml overrides as JSON, empty for the base run).

    ``df.attrs["keys"]`` maps each column label to its metric key; ``df.attrs["notes"]`` holds the
    footnotes (the MS† caveat when the flow prior was used)."""
    import json

    import pandas as pd

    if not isinstance(overrides, Mapping):
        raise TypeError(f"overrides must be a dict of variant -> overrides, got {type(overrides).__name__}")
    columns = ablation_columns(rows)
    if not rows:
        raise ValueError("an ablation table needs at least one variant row")
    records = []
    for r in rows:
        record: dict[str, object] = {"variant": r["variant"]}
        for key, label in columns:
            value = r.get(key)
            record[label] = float(value) if value is not None else math.nan
        ov = overrides.get(str(r["variant"]))
        record["overrides"] = json.dumps(dict(ov), sort_keys=True, default=str) if ov else ""
        records.append(record)
    df = pd.DataFrame.from_records(records, columns=["variant", *(label for _, label in columns), "overrides"])
    df.attrs["keys"] = {label: key for key, label in columns}
    df.attrs["notes"] = [ABLATION_MS_FLOW_NOTE] if any(key.endswith(f"/{MS_FLOW}") for key, _ in columns) else []
    return df
