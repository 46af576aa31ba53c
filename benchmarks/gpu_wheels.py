"""The wheels a lent GPU machine lacks, for ``benchmarks/small_gpu_device.sh`` to install there
(``run`` with ``carry: [".whl", ...]``): the machines have torch, numpy and transformers but no
diffusers, DeepSpeed, pydantic, PyAV or array-api-compat, and no network.

    python benchmarks/gpu_wheels.py [--out .whl] [--python 3.12]

Versions are this environment's own (the ones CI tests), downloaded from the package index for the
machine's Python and platform. DeepSpeed comes as its sdist (built there without ops). A wheel too
big for the 64 MiB carry (PyAV, 36 MB) is unzipped, its shared objects' debug sections stripped (PyAV's
own extensions ship them: 31 of its 36 MB) and xz'd (``NAME.unpacked.tar.xz``, 20 MB), which the device
script unpacks into its site folder; so is diffusers (6.3 MB as a wheel, 1.9 MB so: the checkout's result
gifs grow the carry every run). Prints what the carry will weigh with the checkout.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import carry_size

from udpdiff.io.atomic import atomic_path

REPO = Path(__file__).resolve().parents[1]
#: distributions the device image lacks; each pinned to this environment's version
WHEELS = ("diffusers", "pydantic", "pydantic_core", "typing_inspection", "annotated_types", "av", "hjson",
          "importlib_metadata", "array-api-compat", "torchao")
SDISTS = ("deepspeed",)
UNPACK = ("av", "diffusers")  # shipped unzipped and xz'd: the carry holds the checkout, wheels and a VAE in 64 MiB
SHARED_OBJECT = re.compile(r"\.so(\.\d+)*$")


def pins(names: tuple[str, ...]) -> list[str]:
    return [f"{n}=={importlib.metadata.version(n)}" for n in names]


def download(out: Path, python: str, platform: str) -> None:
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(out)]
    # the older manylinux tag too: pip does not fall back to it by itself (pydantic_core is manylinux2014)
    subprocess.run([*pip, "--only-binary=:all:", "--python-version", python, "--implementation", "cp",
                    "--platform", platform, "--platform", "manylinux2014_x86_64", *pins(WHEELS)], check=True)
    subprocess.run([*pip, "--no-binary=:all:", *pins(SDISTS)], check=True)


def strip_debug(data: bytes, scratch: Path) -> bytes:
    """A shared object without its debug sections (``strip --strip-debug``: code and symbols stay), or
    ``data`` unchanged where binutils is missing or the file is not one strip reads."""
    if not data.startswith(b"\x7fELF") or shutil.which("strip") is None:
        return data
    scratch.write_bytes(data)
    done = subprocess.run(["strip", "--strip-debug", str(scratch)], capture_output=True)
    return scratch.read_bytes() if done.returncode == 0 else data


def unpack_xz(wheel: Path) -> Path:
    """``wheel`` as a tar.xz of its contents (what pip would put in site-packages, shared objects
    without debug sections), beside it."""
    target = wheel.with_name(wheel.name.removesuffix(".whl") + ".unpacked.tar.xz")
    scratch = wheel.with_name(wheel.name + ".strip")
    with atomic_path(target) as tmp, zipfile.ZipFile(wheel) as z, tarfile.open(tmp, "w:xz", preset=9) as tar:
        for info in z.infolist():
            if info.is_dir():
                continue
            data, shared = z.read(info), bool(SHARED_OBJECT.search(info.filename))
            if shared:
                data = strip_debug(data, scratch)
            member = tarfile.TarInfo(info.filename)
            member.size, member.mode = len(data), 0o755 if shared else 0o644
            tar.addfile(member, io.BytesIO(data))
    scratch.unlink(missing_ok=True)
    wheel.unlink()
    return target


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / ".whl")
    ap.add_argument("--python", default="3.12", help="the device's Python (its image: 3.12)")
    ap.add_argument("--platform", default="manylinux_2_28_x86_64")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    download(args.out, args.python, args.platform)
    for name in UNPACK:
        for wheel in args.out.glob(f"{name}-*.whl"):
            print(f"unzipped and xz'd: {unpack_xz(wheel).name}", flush=True)
    # what a run carrying the wheels and .gpu-carry takes, checkout included (exit 1 when over the limit)
    carried = [os.path.relpath(p, REPO) for p in (args.out, REPO / ".gpu-carry") if p.is_dir()]
    return carry_size.main(["--repo", str(REPO), *carried])


if __name__ == "__main__":
    raise SystemExit(main())
