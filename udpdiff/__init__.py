"""UDPDiff: unified dense prediction with video diffusion (library layer).

This package is pure compute and I/O. It never imports Prefect or DVC; orchestration lives in
``flows/`` and ``dvc.yaml``.
"""

import logging

__version__ = "0.1.0"


class _KnownThirdPartyNoise(logging.Filter):
    """Drops warnings that every diffusers import prints once torchao (the 8-bit optimizer and float8
    extras; the dev install) is present, none of which concerns this project: torchao's CUDA kernels
    failing to load into a CPU-only torch, torch's deprecation notice for torchao's Enum registrations,
    and diffusers 0.42 not finding tensor classes torchao 0.18 removed (used only to load
    torchao-serialised checkpoints). Anything else from these loggers passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if record.name == "torchao":
            import torch

            return not (torch.version.cuda is None and msg.startswith("Failed to load"))
        if record.name == "torch.utils._pytree":
            return "Calling register_constant() on Enum subclasses is deprecated" not in msg
        return not msg.startswith("Unable to import `torchao` Tensor objects")


for _name in ("torchao", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer"):
    logging.getLogger(_name).addFilter(_KnownThirdPartyNoise())
