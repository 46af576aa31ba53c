"""benchmarks/probe_rgb_reliance.py: the dense half's x0 error with the clip's own RGB half against a
shuffled clip's, on a tiny random pipeline and hand-made latent caches."""

from __future__ import annotations

import json

import pytest
import torch


@pytest.fixture
def probe(benchmark_script):
    return benchmark_script("probe_rgb_reliance")


@pytest.fixture
def caches(tmp_path):
    """Three clips' cached posteriors (RGB, depth, segmentation) and text, as the latents stage writes them."""
    from udpdiff.latents import record_path, save_record

    g = torch.Generator().manual_seed(0)
    for i in range(3):
        rec = {"clip_id": f"c{i}", "text:long": torch.randn(16, 32, generator=g)}
        for key in ("rgb", "depth", "segmentation"):
            rec[f"{key}_mean"], rec[f"{key}_std"] = torch.randn(16, 3, 8, 8, generator=g), torch.ones(16, 3, 8, 8)
        save_record(record_path(tmp_path / "latents", f"c{i}"), rec)
    return tmp_path / "latents"


def test_a_model_blind_to_the_rgb_half_relies_on_it_not_at_all(probe, caches, tmp_path, tiny_pipeline):
    pipe = tiny_pipeline()
    pipe.save_pretrained(tmp_path / "reads-both")
    proj = pipe.transformer.patch_embed.proj  # patch embedding over (RGB 16 | dense 16) channels
    with torch.no_grad():  # the RGB half's input weights zeroed: the output cannot depend on it
        proj.weight.view(proj.weight.shape[0], 32, -1)[:, :16] = 0
    pipe.save_pretrained(tmp_path / "blind")
    out = tmp_path / "blind.json"
    assert probe.main(["--pipeline", str(tmp_path / "blind"), "--latents", str(caches), "--timesteps", "300,700",
                       "--out", str(out)]) == 0
    assert torch.is_grad_enabled()  # main() leaves the process's autograd mode as it found it
    blind = json.loads(out.read_text())["tasks"]
    assert sorted(blind) == ["depth", "segmentation"] and sorted(blind["depth"]) == ["300", "700"]
    for rows in blind.values():
        for row in rows.values():
            assert row["reliance"] == pytest.approx(0.0, abs=1e-6) and row["prior"] > 0
    reads = probe.probe(tmp_path / "reads-both", caches, clips=3, timesteps=[300])["tasks"]
    assert any(abs(r["300"]["reliance"]) > 1e-4 for r in reads.values())  # a random model does read both halves


def test_one_clip_cannot_be_probed(probe, caches, tmp_path, tiny_pipeline):
    tiny_pipeline().save_pretrained(tmp_path / "p")
    with pytest.raises(SystemExit, match="at least 2"):
        probe.probe(tmp_path / "p", caches, clips=1, timesteps=[500])
