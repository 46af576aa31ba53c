"""Does a generated video show the scene its caption names? A weight-free check of text following for
captions of the synthetic source, which end "… over a striped teal ground under a gray sky; …".

The sky is read at the top of the frame and the ground at the bottom (per-channel medians over
frames and pixels, so entities crossing a band do not decide it), each classified by the nearest of
the generator's own colours: a sky by its distance to the gradient from its zenith to its horizon
colour, a ground by the nearest ground colour. The score is the fraction of videos whose sky (ground)
is the caption's. Chance is 1/4 for the sky and 1/7 for the ground; the real clips the captions
describe score near 1, the ceiling beside the generated sets. A prompt that names no synthetic scene
(any other data source) scores NaN, which the evaluate stage's means skip.
"""
from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from udpdiff.data.synthetic import GROUND_COLOURS, GROUND_PATTERNS, PALETTE, SKIES

#: the caption's scene clause (``_captions`` in udpdiff.data.synthetic writes it; a plain ground is unnamed)
SCENE_CLAUSE = re.compile(rf"over an? (?:(?:{'|'.join(p for p in GROUND_PATTERNS if p != 'plain')}) )?"
                          r"(?P<ground>[a-z]+) ground under an? (?P<sky>[a-z ]+?) sky")
SKY_BAND = 0.08  # of the frame's height: above the lowest horizon the generator draws (22 %)
GROUND_BAND = 0.12


def caption_scene(prompt: str) -> tuple[str, str] | None:
    """(ground colour, sky) a synthetic caption names, or None for a caption that names neither."""
    m = SCENE_CLAUSE.search(prompt)
    if m is None or m["ground"] not in GROUND_COLOURS or m["sky"] not in SKIES:
        return None
    return m["ground"], m["sky"]


def _to_segment(c: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    t = np.clip(np.dot(c - a, b - a) / np.dot(b - a, b - a), 0.0, 1.0)
    return float(np.linalg.norm(c - (a + t * (b - a))))


def observed_scene(video: np.ndarray) -> tuple[str, str]:
    """(ground colour, sky) a uint8 (T, H, W, 3) video shows, by nearest generator colour."""
    h = video.shape[1]
    top = np.median(video[:, : max(1, round(SKY_BAND * h))].reshape(-1, 3), axis=0).astype(np.float64)
    bottom = np.median(video[:, h - max(1, round(GROUND_BAND * h)):].reshape(-1, 3), axis=0).astype(np.float64)
    sky = min(SKIES, key=lambda s: _to_segment(top, np.asarray(SKIES[s][0], float), np.asarray(SKIES[s][1], float)))
    ground = min(GROUND_COLOURS, key=lambda g: float(np.linalg.norm(bottom - np.asarray(PALETTE[g], float))))
    return ground, sky


def scene_following(videos: np.ndarray | Sequence[np.ndarray], prompts: Sequence[str]) -> dict[str, list[float]]:
    """Per video: ``caption_sky`` / ``caption_ground`` 1.0 where it shows the prompt's sky / ground
    colour, 0.0 where not, NaN where the prompt names no synthetic scene."""
    if len(videos) != len(prompts):
        raise ValueError(f"{len(videos)} videos but {len(prompts)} prompts")
    out: dict[str, list[float]] = {"caption_sky": [], "caption_ground": []}
    for video, prompt in zip(videos, prompts, strict=True):
        named = caption_scene(prompt)
        if named is None:
            out["caption_sky"].append(float("nan"))
            out["caption_ground"].append(float("nan"))
            continue
        seen = observed_scene(np.asarray(video))
        out["caption_ground"].append(float(seen[0] == named[0]))
        out["caption_sky"].append(float(seen[1] == named[1]))
    return out
