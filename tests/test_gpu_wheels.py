"""benchmarks/gpu_wheels.py (offline part): a wheel too big for the device carry travels unzipped and
xz'd; what the device unpacks must be the wheel's files, byte for byte, but for shared objects' debug
sections."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_wheels  # noqa: E402
import pytest  # noqa: E402


def test_an_unpacked_wheel_holds_its_files(tmp_path: Path):
    files = {"pkg/__init__.py": b"VERSION = '1'\n", "pkg/_ext.abi3.so": bytes(range(256)) * 40,
             "pkg-1.0.dist-info/METADATA": b"Name: pkg\nVersion: 1.0\n"}
    wheel = tmp_path / "pkg-1.0-cp311-abi3-manylinux_2_28_x86_64.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("pkg/", b"")  # a directory entry: not a file to ship
        for name, data in files.items():
            z.writestr(name, data)
    packed = gpu_wheels.unpack_xz(wheel)
    assert packed.name == "pkg-1.0-cp311-abi3-manylinux_2_28_x86_64.unpacked.tar.xz" and not wheel.exists()
    with tarfile.open(packed) as tar:
        got = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        modes = {m.name: m.mode for m in tar.getmembers()}
    assert got == files
    assert modes["pkg/_ext.abi3.so"] == 0o755 and modes["pkg/__init__.py"] == 0o644


def test_every_pin_is_this_environments_version():
    import importlib.metadata

    for pin in gpu_wheels.pins(gpu_wheels.WHEELS + gpu_wheels.SDISTS):
        name, version = pin.split("==")
        assert importlib.metadata.version(name) == version
    assert "array-api-compat" in gpu_wheels.WHEELS  # pixelplanes imports it; the device image lacks it


@pytest.mark.skipif(shutil.which("strip") is None or shutil.which("readelf") is None, reason="needs binutils")
def test_shared_objects_lose_debug_sections_only(tmp_path: Path):
    """PyAV's own extension (built with debug sections) shrinks; its dynamic symbols, what the loader
    and Python's import use, are unchanged; a versioned library name counts as a shared object."""
    import av

    real = Path(av.__file__).parent / "video/frame.abi3.so"
    original = real.read_bytes()
    wheel = tmp_path / "pkg-1.0-cp311-abi3-manylinux_2_28_x86_64.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("pkg/frame.abi3.so", original)
        z.writestr("pkg.libs/libfoo-1a2b.so.7.0.1", original)
    with tarfile.open(gpu_wheels.unpack_xz(wheel)) as tar:
        got = {m.name: (tar.extractfile(m).read(), m.mode) for m in tar.getmembers()}
    assert not list(tmp_path.glob("*.strip"))  # the scratch file is gone

    def dynamic_symbols(data: bytes) -> str:
        path = tmp_path / "probe.so"
        path.write_bytes(data)
        return subprocess.run(["readelf", "--dyn-syms", "--wide", str(path)], capture_output=True, text=True,
                              check=True).stdout

    for data, mode in got.values():
        assert mode == 0o755 and len(data) < len(original) * 0.5
        assert dynamic_symbols(data) == dynamic_symbols(original)
    assert b".debug_info" in original and b".debug_info" not in got["pkg/frame.abi3.so"][0]
