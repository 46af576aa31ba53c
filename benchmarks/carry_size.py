"""What a device ``run`` would carry, against the 64 MiB it takes: the checkout's tracked and untracked
(not ignored) files plus the ignored paths named as ``carry``. A call over the limit is refused; in the
middle of a run's sequence of calls (an idle machine is released in 30 s) that loses the run.

    python benchmarks/carry_size.py .whl .gpu-carry        # exit 1 when over, naming the largest items

Over the limit, move aside what the run does not need (the `small` runs need no torchao wheel) and
check again.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

LIMIT_MIB = 64


def checkout_files(repo: Path) -> list[Path]:
    """Tracked and untracked-but-not-ignored files: what the device copies of the working tree."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=repo,
                         check=True, capture_output=True).stdout
    return [repo / name for name in out.decode().split("\0") if name]


def carried_files(repo: Path, path: str) -> list[Path]:
    root = repo / path
    if not root.exists():
        raise SystemExit(f"carry path {path!r} does not exist under {repo}")
    return [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())


def measure(repo: Path, carry: list[str]) -> dict:
    """Bytes per part (``checkout`` and each carry path) and the carried files' sizes, largest first."""
    def size(p: Path) -> int:
        return p.stat().st_size if p.is_file() and not p.is_symlink() else 0

    checkout = checkout_files(repo)
    parts = {"checkout": sum(size(p) for p in checkout)}
    in_checkout = set(checkout)
    items = []
    for path in carry:
        # a carry path may hold tracked files too (.gpu-carry/vae-small.tar.xz): the checkout counts those
        sized = [(size(p), str(p.relative_to(repo))) for p in carried_files(repo, path) if p not in in_checkout]
        parts[path] = sum(n for n, _ in sized)
        items += sized
    return {"parts": parts, "total": sum(parts.values()), "largest": sorted(items, reverse=True)[:5]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("carry", nargs="*", help="ignored paths the run carries, relative to the repository root")
    ap.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[1])
    ap.add_argument("--limit-mib", type=float, default=LIMIT_MIB)
    args = ap.parse_args(argv)
    m = measure(args.repo, args.carry)
    mib = 1 << 20
    for part, n in m["parts"].items():
        print(f"{part:>12}  {n / mib:7.1f} MiB")
    print(f"{'total':>12}  {m['total'] / mib:7.1f} MiB of {args.limit_mib:g} MiB")
    if m["total"] <= args.limit_mib * mib:
        return 0
    over = (m["total"] - args.limit_mib * mib) / mib
    biggest = ", ".join(f"{name} ({n / mib:.1f} MiB)" for n, name in m["largest"])
    print(f"over by {over:.1f} MiB: the device refuses this carry. Largest carried files: {biggest}",
          file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
