"""udpdiff.evaluation.scene_following: the captioned sky and ground, read back from videos.

- every synthetic caption's scene clause parses, to the scene the generator drew; other text does not;
- the generator's own clips show their caption's sky and ground (at the `small` and `tiny` sizes);
- the same clips under each other's captions score what their skies and grounds share, not 1;
- a prompt without a synthetic scene scores NaN, which the evaluate stage's means skip;
- Fig 8's validation scores carry the same shares for the videos they score, when given their captions.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from udpdiff.data.synthetic import GROUND_COLOURS, SKIES, clip_seed, render_clip
from udpdiff.evaluation.scene_following import caption_scene, observed_scene, scene_following


@pytest.fixture(scope="module")
def clips():
    return [render_clip(clip_seed(1234, i), 9, 64, 64) for i in range(40)]


def test_captions_name_the_scene_the_generator_drew(clips):
    for c in clips:
        bg = c.scene.background
        assert caption_scene(c.caption_long) == (bg.ground_name, bg.sky)
    assert caption_scene("over an orange ground under an orange sunset sky") == ("orange", "orange sunset")
    assert caption_scene("A cat on a sofa in a sunny room.") is None
    assert caption_scene("over a pink ground under a gray sky") is None  # pink is never a ground
    assert {c.scene.background.sky for c in clips} == set(SKIES)  # the check covers every sky
    assert len({c.scene.background.ground_name for c in clips}) >= 6


@pytest.mark.parametrize("size,frames", [(64, 9), (48, 9), (128, 17)])
def test_real_clips_show_their_captioned_sky_and_ground(size, frames):
    clips = [render_clip(clip_seed(77, i), frames, size, size) for i in range(24)]
    scores = scene_following(np.stack([c.frames for c in clips]), [c.caption_long for c in clips])
    assert scores["caption_sky"] == [1.0] * len(clips)
    assert scores["caption_ground"] == [1.0] * len(clips)


def test_other_clips_captions_score_only_what_they_share(clips):
    prompts = [c.caption_long for c in clips]
    shifted = [clips[(i + 1) % len(clips)].frames for i in range(len(clips))]
    scores = scene_following(shifted, prompts)
    same_sky = [float(clips[(i + 1) % len(clips)].scene.background.sky == clips[i].scene.background.sky)
                for i in range(len(clips))]
    same_ground = [float(clips[(i + 1) % len(clips)].scene.background.ground_name
                         == clips[i].scene.background.ground_name) for i in range(len(clips))]
    assert scores["caption_sky"] == same_sky and scores["caption_ground"] == same_ground
    assert np.mean(same_sky) < 0.5 and np.mean(same_ground) < 0.5


def test_a_prompt_without_a_synthetic_scene_scores_nan(clips):
    scores = scene_following([clips[0].frames, clips[1].frames], ["a dog runs on a beach", clips[1].caption_long])
    assert math.isnan(scores["caption_sky"][0]) and math.isnan(scores["caption_ground"][0])
    assert scores["caption_sky"][1] == 1.0
    with pytest.raises(ValueError, match="2 videos but 1 prompts"):
        scene_following([clips[0].frames, clips[1].frames], ["x"])


def test_a_flat_video_reads_as_its_colours():
    """A video of one sky colour above one ground colour: the nearest of the generator's colours."""
    video = np.zeros((3, 40, 40, 3), np.uint8)
    video[:, :20] = SKIES["dark night"][0]
    video[:, 20:] = (40, 160, 50)  # the palette's green
    assert observed_scene(video) == ("green", "dark night")
    assert "green" in GROUND_COLOURS


def test_fig8_validation_scores_follow_the_captions_they_are_given(clips):
    from udpdiff.stages.train import validation_scores

    videos, captions = [c.frames for c in clips[:8]], [c.caption_long for c in clips[:8]]
    own = validation_scores("depth", videos, [], captions=captions)
    assert own["val/depth/caption_sky"] == own["val/depth/caption_ground"] == 1.0
    others = validation_scores("depth", videos, [], captions=captions[1:] + captions[:1])
    expected = scene_following(videos, captions[1:] + captions[:1])
    assert others["val/depth/caption_ground"] == pytest.approx(np.mean(expected["caption_ground"]))
    assert others["val/depth/caption_ground"] < 1.0
    assert others["val/depth/caption_sky"] == pytest.approx(np.mean(expected["caption_sky"]))
    # captions naming no synthetic scene are skipped as the evaluation skips them; none named: no score
    mixed = validation_scores(None, videos[:2], [], captions=["a dog runs on a beach", captions[1]])
    assert mixed["val/rgb/caption_sky"] == 1.0
    assert "val/rgb/caption_sky" not in validation_scores(None, videos[:1], [], captions=["a dog on a beach"])
    assert "val/depth/caption_sky" not in validation_scores("depth", videos[:1], [])  # no captions given
