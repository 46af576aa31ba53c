"""Evaluation metrics (paper section 4): depth, entity segmentation, VBench-style temporal
consistency, motion smoothness (VBench's AMT-S or a weight-free flow prior), and FVD. Pure compute;
models are only loaded when an extractor or interpolator is constructed."""

from udpdiff.evaluation.consistency import (
    ClipImageFeatures,
    DinoFeatures,
    FeatureExtractor,
    MetricModelUnavailable,
    background_consistency,
    pixel_frame_consistency,
    subject_consistency,
    vbench_consistency,
    vbench_consistency_per_video,
)
from udpdiff.evaluation.depth import ScaleShift, align_scale_shift, depth_metrics
from udpdiff.evaluation.fvd import I3DFeatures, feature_statistics, frechet_distance, fvd_from_features
from udpdiff.evaluation.motion import (
    AMTInterpolator,
    FlowInterpolator,
    FrameInterpolator,
    motion_smoothness,
    motion_smoothness_flow,
    vbench_amt_scale,
)
from udpdiff.evaluation.segmentation import hungarian_miou, iou_matrix, temporal_id_consistency

__all__ = [
    "AMTInterpolator",
    "ClipImageFeatures",
    "DinoFeatures",
    "FeatureExtractor",
    "FlowInterpolator",
    "FrameInterpolator",
    "I3DFeatures",
    "MetricModelUnavailable",
    "ScaleShift",
    "align_scale_shift",
    "background_consistency",
    "depth_metrics",
    "feature_statistics",
    "frechet_distance",
    "fvd_from_features",
    "hungarian_miou",
    "iou_matrix",
    "motion_smoothness",
    "motion_smoothness_flow",
    "pixel_frame_consistency",
    "subject_consistency",
    "temporal_id_consistency",
    "vbench_amt_scale",
    "vbench_consistency",
    "vbench_consistency_per_video",
]
