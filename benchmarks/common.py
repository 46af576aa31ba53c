"""What the benchmark scripts share: parameter counts, the machine record, atomic JSON + markdown output."""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import platform
import socket
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

GIB = 1024**3


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def write_outputs(result: dict[str, Any], out: Path, render_markdown: Callable[[dict[str, Any]], str]) -> None:
    """The JSON and a markdown table beside it (``.md``), both written atomically."""
    from udpdiff.io.atomic import write_text

    write_text(out, json.dumps(result, indent=2, default=str) + "\n")
    write_text(out.with_suffix(".md"), render_markdown(result))


def machine_info(device: torch.device, packages: Sequence[str]) -> dict[str, Any]:
    """Host, versions of ``packages`` (plus torch/CUDA/cuDNN), and the GPU with nvidia-smi's view of it."""
    info: dict[str, Any] = {"host": socket.gethostname(), "platform": platform.platform(),
                            "python": platform.python_version(), "cpu_count": os.cpu_count()}
    versions: dict[str, Any] = {}
    for name in packages:
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    versions["torch"] = torch.__version__
    versions["cuda"] = torch.version.cuda
    versions["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    info["versions"] = versions
    info["device"] = str(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = {"name": props.name, "memory_gib": props.total_memory / GIB,
                       "multiprocessors": props.multi_processor_count, "count": torch.cuda.device_count()}
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=30, check=True)
            info["nvidia_smi"] = smi.stdout.strip().splitlines()
        except (OSError, subprocess.SubprocessError) as exc:
            info["nvidia_smi"] = f"unavailable: {exc}"
    return info
