"""benchmarks/carry_size.py: the bytes a device `run` would carry (checkout + carry paths) against the limit."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import carry_size  # noqa: E402


def _repo(tmp_path: Path) -> Path:
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / ".gitignore").write_text(".whl/\nbuild/\n")
    (tmp_path / "tracked.txt").write_bytes(b"a" * 1000)
    (tmp_path / "untracked.txt").write_bytes(b"b" * 300)           # not ignored: the device copies it
    (tmp_path / "build").mkdir()
    (tmp_path / "build" / "big.bin").write_bytes(b"c" * 50_000)   # ignored, not carried: not counted
    (tmp_path / ".whl" / "sub").mkdir(parents=True)
    (tmp_path / ".whl" / "x.whl").write_bytes(b"d" * 2000)
    (tmp_path / ".whl" / "sub" / "y.tar.xz").write_bytes(b"e" * 700)
    subprocess.run(["git", "add", ".gitignore", "tracked.txt"], cwd=tmp_path, check=True)
    return tmp_path


def test_counts_the_checkout_and_the_carried_paths_only(tmp_path):
    repo = _repo(tmp_path)
    m = carry_size.measure(repo, [".whl"])
    assert m["parts"] == {"checkout": len(".whl/\nbuild/\n") + 1000 + 300, ".whl": 2700}
    assert m["total"] == sum(m["parts"].values())
    assert m["largest"][0] == (2000, ".whl/x.whl")


def test_exit_status_and_message_name_the_limit_and_the_largest_files(tmp_path, capsys):
    repo = _repo(tmp_path)
    assert carry_size.main(["--repo", str(repo), ".whl", "--limit-mib", "1"]) == 0
    assert carry_size.main(["--repo", str(repo), ".whl", "--limit-mib", str(3000 / 2**20)]) == 1
    err = capsys.readouterr().err
    assert "over by" in err and ".whl/x.whl" in err


def test_a_missing_carry_path_is_named(tmp_path):
    with pytest.raises(SystemExit, match="'.gpu-carry' does not exist"):
        carry_size.measure(_repo(tmp_path), [".gpu-carry"])


def test_a_tracked_file_under_a_carry_path_counts_once(tmp_path):
    repo = _repo(tmp_path)
    (repo / ".gitignore").write_text(".whl/\nbuild/\n.gpu-carry/*\n!.gpu-carry/vae.tar.xz\n")
    (repo / ".gpu-carry").mkdir()
    (repo / ".gpu-carry" / "vae.tar.xz").write_bytes(b"f" * 4000)   # tracked: part of the checkout
    (repo / ".gpu-carry" / "other.tar").write_bytes(b"g" * 500)     # ignored: carried only when named
    subprocess.run(["git", "add", ".gitignore", ".gpu-carry/vae.tar.xz"], cwd=repo, check=True)
    m = carry_size.measure(repo, [".whl", ".gpu-carry"])
    assert m["parts"]["checkout"] == len(".whl/\nbuild/\n.gpu-carry/*\n!.gpu-carry/vae.tar.xz\n") + 1000 + 300 + 4000
    assert m["parts"][".gpu-carry"] == 500
