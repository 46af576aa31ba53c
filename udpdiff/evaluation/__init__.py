"""Evaluation metrics (paper section 4): depth (``depth``), entity segmentation (``segmentation``),
VBench-style temporal consistency (``consistency``), motion smoothness (``motion``: VBench's AMT-S
or a weight-free flow prior), FVD (``fvd``), runtime (``runtime``), the metric suite (``runner``)
and the paper's table layouts (``tables``). Pure compute; models are only loaded when an extractor
or interpolator is constructed. Import the submodule you need: this package re-exports nothing, so
a stage that renders tables does not depend on the metric code."""
