"""UDPDiff: unified dense prediction with video diffusion (library layer).

This package is pure compute and I/O. It never imports Prefect or DVC; orchestration lives in
``flows/`` and ``dvc.yaml``.
"""

__version__ = "0.1.0"
