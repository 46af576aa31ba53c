"""Where each stage reads and writes, per profile. dvc.yaml names the same paths (via
``${profile}``), so changing a layout here means changing it there too."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ProjectPaths:
    """An ablation variant is a DVC experiment of the same pipeline (``python -m flows ablation``),
    so it uses these same paths in its own workspace."""

    root: Path
    profile: str

    @property
    def data(self) -> Path:
        return self.root / "data" / self.profile

    @property
    def clips(self) -> Path:
        return self.data / "clips"

    @property
    def manifest(self) -> Path:
        return self.clips / "manifest.parquet"

    @property
    def validation(self) -> Path:
        return self.data / "validation"

    @property
    def pixelplanes(self) -> Path:
        return self.data / "pixelplanes"

    @property
    def latents(self) -> Path:
        return self.data / "latents"

    @property
    def models(self) -> Path:
        return self.root / "models" / self.profile

    @property
    def vae(self) -> Path:
        return self.models / "vae"

    @property
    def text_encoder(self) -> Path:
        return self.models / "text_encoder"

    @property
    def checkpoints(self) -> Path:
        return self.models / "checkpoints"

    @property
    def pipeline(self) -> Path:
        return self.models / "pipeline"

    @property
    def outputs(self) -> Path:
        return self.root / "outputs" / self.profile

    @property
    def samples(self) -> Path:
        return self.outputs / "samples"

    @property
    def metrics(self) -> Path:
        return self.outputs / "metrics"

    @property
    def dataset_figure(self) -> Path:
        """The data stage's picture of the dataset: entities per clip (paper Fig 6), caption lengths (Fig 7)."""
        return self.outputs / "dataset" / "dataset.png"

    @property
    def evaluation(self) -> Path:
        """metrics.json (DVC metrics), per-video scores, the paper's tables (md, html)."""
        return self.outputs / "evaluation"

    @property
    def fvd_reference(self) -> Path:
        """Cached I3D statistics of real clips, one file per split / frame count / I3D file."""
        return self.data / "fvd_reference"

    @property
    def report(self) -> Path:
        return self.outputs / "report"
