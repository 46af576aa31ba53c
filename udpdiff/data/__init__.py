"""Data: synthetic clips with exact ground truth, Panda-70M-style curation, the data contract."""
