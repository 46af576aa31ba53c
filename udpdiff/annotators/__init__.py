"""Dense annotators run on RGB videos: pseudo ground truth for the evaluation (paper Tab 3) and
labels for curation. Depth: DepthCrafter, Depth Anything V2; entity segmentation: SAM2 video."""
