"""benchmarks/probe_text_binding.py: a position-free reader of the caption's ground and sky from the
text encoder's states, at CPU-second sizes."""

from __future__ import annotations

import json

import pytest
import torch


@pytest.fixture
def probe(benchmark_script):
    return benchmark_script("probe_text_binding")


def test_the_reader_ignores_token_order(probe):
    """What the probe stands for: CogVideoX's text tokens carry no position, so neither may the reader."""
    torch.manual_seed(0)
    reader = probe.PositionFreeReader(8).eval()
    x, mask = torch.randn(2, 6, 8), torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    with torch.no_grad():
        g, s = reader(x, mask)
        g2, s2 = reader(x[:1, perm], mask[:1, perm])
        g3, _ = reader(torch.cat([x[1:, :4], torch.randn(1, 2, 8)], 1), mask[1:])  # padding is not read
    assert torch.allclose(g[:1], g2, atol=1e-5) and torch.allclose(s[:1], s2, atol=1e-5)
    assert torch.allclose(g[1:], g3, atol=1e-5)


def test_a_run_reads_every_encoder_and_records_the_pretraining(tmp_path, probe):
    out = tmp_path / "probe.json"
    assert probe.main(["--clips", "40", "--frames", "5", "--size", "32", "--epochs", "1", "--mlm-steps", "3",
                       "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["held_out"] == 6 and result["chance"] == pytest.approx({"ground": 1 / 7, "sky": 1 / 4})
    assert list(result["accuracy"]) == ["word embeddings (no context)", "random T5 (the small profile's)",
                                        "T5 after 3 masked-word steps"]
    for acc in result["accuracy"].values():  # of 6 held-out captions
        assert {k: round(v * 6, 6) % 1 for k, v in acc.items()} == {"ground": 0, "sky": 0}
    losses = result["masked_word_pretraining"]["loss_by_tenth"]
    assert len(losses) == 3 and losses[-1] < losses[0]
