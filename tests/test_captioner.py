"""The Video-LLaVA re-captioner (udpdiff.data.captioner) on a tiny random VideoLlavaForConditionalGeneration
saved to a folder with a character-level tokenizer and its image processor, as the real -hf checkpoints are."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from udpdiff.data.captioner import VideoLlavaCaptioner, caption_stats, recaption_clips
from udpdiff.data.curation_params import RecaptionParams
from udpdiff.evaluation.consistency import MetricModelUnavailable
from udpdiff.io.video import write_video


@pytest.fixture(scope="module")
def tiny_video_llava(tiny_video_llava_dir: Path) -> Path:
    return tiny_video_llava_dir


def _video(seed: int, t: int = 9, h: int = 32, w: int = 48) -> np.ndarray:
    return (np.random.default_rng(seed).random((t, h, w, 3)) * 255).astype(np.uint8)


def test_video_llava_captions_a_clip(tiny_video_llava: Path) -> None:
    cap = VideoLlavaCaptioner(tiny_video_llava, num_frames=4, max_new_tokens=12)
    text = cap(_video(0))
    assert isinstance(text, str) and text and len(text) <= 12  # one character per token here
    assert cap(_video(0)) == text  # greedy: the same clip, the same caption
    with pytest.raises(ValueError, match="uint8"):
        cap(np.zeros((4, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="exactly once"):
        VideoLlavaCaptioner(tiny_video_llava, prompt="USER: describe. ASSISTANT:")
    with pytest.raises(MetricModelUnavailable, match="no-such-model"):
        VideoLlavaCaptioner(tiny_video_llava.parent / "no-such-model")


def test_recaption_clips_caches_and_records_failures(tiny_video_llava: Path, tmp_path: Path) -> None:
    clips = tmp_path / "videos"
    for i in range(2):
        write_video(clips / f"c{i}.mp4", _video(i), fps=8)
    records = [
        {"clip_id": "c0", "caption_short": "a clip", "caption_long": "a clip"},
        {"clip_id": "c1", "caption_short": "another", "caption_long": "A long caption the CSV already had."},
        {"clip_id": "gone", "caption_short": "missing", "caption_long": "missing"},
    ]
    params = RecaptionParams(path=str(tiny_video_llava), num_frames=4, max_new_tokens=8, dtype="float32")
    built: list[int] = []

    def build():
        built.append(1)
        return VideoLlavaCaptioner(params.path, num_frames=params.num_frames, max_new_tokens=params.max_new_tokens)

    out = recaption_clips(records, clips, tmp_path / "captions", params, build)
    by_id = {r["clip_id"]: r for r in out.records}
    assert sorted(by_id) == ["c0", "c1"] and out.captioned == 1 and built == [1]
    assert by_id["c0"]["caption_long"] and by_id["c0"]["caption_long_source"] == "video-llava"
    assert by_id["c1"]["caption_long"].startswith("A long caption") and by_id["c1"]["caption_long_source"] == "csv"
    assert out.rejects[0]["clip_id"] == "gone" and out.rejects[0]["reason"].startswith("caption_error")
    assert "gone.mp4" in out.rejects[0]["reason"]

    again = recaption_clips(records[:2], clips, tmp_path / "captions", params, build)
    assert again.cached == 1 and again.captioned == 0 and built == [1]  # nothing loaded
    assert {r["clip_id"]: r["caption_long"] for r in again.records} == {k: v["caption_long"] for k, v in by_id.items()}
    overwrite = params.model_copy(update={"overwrite": True})
    assert recaption_clips(records[:2], clips, tmp_path / "captions", overwrite, build).captioned == 1  # c1 now


def test_caption_stats() -> None:
    stats = caption_stats(["a b c", "a b c d e", "x"], "caption_long")
    assert stats["caption_long_words_mean"] == 3 and stats["caption_long_words_median"] == 3
    assert stats["caption_long_words_max"] == 5 and caption_stats([], "x") == {}
