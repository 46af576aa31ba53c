"""Per-clip work on several processes gives the bytes of the plain loop (udpdiff/workers.py)."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest

from udpdiff import workers
from udpdiff.config import load_params
from udpdiff.data.synthetic import synthesize_dataset
from udpdiff.paths import ProjectPaths
from udpdiff.stages import autoencoder, encode, latents

ROOT = Path(__file__).resolve().parents[1]


def _digests(folder: Path) -> dict[str, str]:
    return {f"{folder.name}/{f.relative_to(folder)}": hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(folder.rglob("*")) if f.is_file()}


def test_worker_count_follows_items_and_cores(monkeypatch):
    monkeypatch.setattr(workers, "available_cores", lambda: 16)
    assert workers.worker_count(24) == 1  # tiny: stays in this process
    assert workers.worker_count(2000) == 16  # one per core
    assert workers.worker_count(100) == 3  # no more than one per ITEMS_PER_WORKER items
    assert workers.worker_count(10, workers=4) == 4
    with pytest.raises(ValueError, match="workers must be >= 1"):
        workers.worker_count(10, workers=0)


def test_map_clips_keeps_order_and_raises_worker_errors():
    assert workers.map_clips(abs, [-3, 2, -1, 0], desc="t", workers=2) == [3, 2, 1, 0]
    with pytest.raises(TypeError):
        workers.map_clips(abs, [-1, "x", 2, 3], desc="t", workers=2)


@pytest.mark.slow
def test_data_and_encode_on_two_processes_equal_one(tmp_path, monkeypatch):
    """The data, encode and latents stages' files are byte for byte the same with 2 worker processes
    as in one process (per-clip seeds; results gathered in order)."""
    p = load_params(ROOT / "params.yaml", profile="tiny").with_overrides({"data.num_clips": 8, "vae.train.steps": 2})
    digests = []
    for name, per_worker in (("one", 10**6), ("two", 4)):
        monkeypatch.setattr(workers, "ITEMS_PER_WORKER", per_worker)
        monkeypatch.setattr(workers, "available_cores", lambda: 2)
        paths = ProjectPaths(tmp_path / name, "tiny")
        d = p.active.data
        synthesize_dataset(paths.clips, num_clips=d.num_clips, num_frames=d.num_frames, height=d.height,
                           width=d.width, fps=d.fps, seed=p.seed, val_fraction=d.val_fraction)
        encode.run(p, paths)
        autoencoder.run(p, paths)
        latents.run(p, paths)  # reads ahead on the worker processes
        digests.append({**_digests(paths.clips), **_digests(paths.pixelplanes), **_digests(paths.latents)})
    assert len(digests[0]) == 8 * 6 + 4  # per clip: video, ids, depth, 2 colormaps, latents; manifest, palettes,
    # the empty prompt's embedding, the cache's digest
    assert digests[0] == digests[1]


def _slow_square(x: int) -> int:
    time.sleep(0.01 * (x % 3))  # finishing out of order must not reorder the results
    return x * x


def _inverse(x: int) -> float:
    return 1 / x


@pytest.mark.parametrize("processes", [1, 2])
def test_read_ahead_keeps_order(processes):
    assert list(workers.read_ahead(_slow_square, list(range(40)), workers=processes, ahead=3)) == \
        [x * x for x in range(40)]


def test_read_ahead_raises_the_items_error_in_its_place():
    out = workers.read_ahead(_inverse, [2, 1, 0, 4], workers=2)
    assert next(out) == 0.5 and next(out) == 1.0
    with pytest.raises(ZeroDivisionError):
        next(out)
