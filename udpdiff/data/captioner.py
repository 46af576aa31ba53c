"""Re-captioning of curated clips (paper §3: "we have enhanced the existing captions using the
Video-LLaVA, providing more detailed and comprehensive descriptions"): the long caption
(``caption_long``) of a clip comes from a video-language model; Panda-70M's own caption stays the
short one (``caption_short``).

:class:`Captioner` is the interface (``uint8 (T, H, W, 3)`` RGB video -> text);
:class:`VideoLlavaCaptioner` runs ``transformers.VideoLlavaForConditionalGeneration`` (e.g.
``LanguageBind/Video-LLaVA-7B-hf``) on ``num_frames`` frames spread uniformly over the clip, with
greedy decoding (the same clip always gets the same caption). Preprocessing uses the model folder's
tokenizer and ``VideoLlavaImageProcessor`` frame by frame and expands the prompt's ``<video>`` token
to one token per visual feature, as ``VideoLlavaProcessor`` does (its video processor would need
torchvision, which the project does not install).

:func:`caption_stats` gives the caption-length statistics the stage logs (paper Fig 7 compares
the lengths of Panda-70M's captions and the re-captioned ones).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from tqdm.auto import tqdm

from udpdiff.data.curation_params import RecaptionParams
from udpdiff.devices import default_device
from udpdiff.io.atomic import write_text
from udpdiff.io.video import read_video, uniform_indices

logger = logging.getLogger(__name__)

VIDEO_LLAVA_ID = "LanguageBind/Video-LLaVA-7B-hf"
DEFAULT_PROMPT = "USER: <video>\nDescribe this video in detail. ASSISTANT:"
VIDEO_TOKEN = "<video>"


class Captioner(ABC):
    """A video captioner: ``uint8 (T, H, W, 3)`` RGB frames -> one caption (stripped, non-empty)."""

    name: ClassVar[str]

    @abstractmethod
    def caption(self, video: np.ndarray) -> str:
        """The caption of one clip."""

    def __call__(self, video: np.ndarray) -> str:
        video = np.asarray(video)
        if video.ndim != 4 or video.shape[-1] != 3 or video.dtype != np.uint8 or video.shape[0] < 1:
            raise ValueError(f"a captioner needs a uint8 (T, H, W, 3) video, got {video.dtype} {video.shape}")
        text = " ".join(self.caption(video).split())
        if not text:
            raise ValueError(f"the {self.name} captioner returned an empty caption")
        return text


class VideoLlavaCaptioner(Captioner):
    """Video-LLaVA (``VideoLlavaForConditionalGeneration``) from a local folder or hub id.

    Args:
        model_path_or_id: a folder with the model, its tokenizer and ``preprocessor_config.json``
            (``VideoLlavaImageProcessor``), or a hub id (``local_files_only=False`` to download).
        prompt: the chat prompt, with ``<video>`` exactly once where the clip goes.
        num_frames: frames sampled uniformly over the clip (Video-LLaVA was trained on 8).
        max_new_tokens: the longest caption, in tokens.
        dtype: the model's dtype (e.g. ``torch.bfloat16`` on GPUs).

    Raises :class:`udpdiff.evaluation.consistency.MetricModelUnavailable` naming the path when the
    weights cannot be loaded.
    """

    name = "video-llava"

    def __init__(self, model_path_or_id: str | os.PathLike = VIDEO_LLAVA_ID, *, prompt: str = DEFAULT_PROMPT,
                 num_frames: int = 8, max_new_tokens: int = 200, dtype: torch.dtype | None = None,
                 device: str | torch.device | None = None, local_files_only: bool = True) -> None:
        if prompt.count(VIDEO_TOKEN) != 1:
            raise ValueError(f"the captioning prompt must contain {VIDEO_TOKEN} exactly once, got {prompt!r}")
        if num_frames < 1 or max_new_tokens < 1:
            raise ValueError(f"num_frames and max_new_tokens must be >= 1, got {num_frames}, {max_new_tokens}")
        from transformers import AutoTokenizer, VideoLlavaForConditionalGeneration, VideoLlavaImageProcessor

        from udpdiff.evaluation.consistency import _load_pretrained, _weights_hint

        hint = _weights_hint("VideoLlavaCaptioner", VIDEO_LLAVA_ID)
        what = "Video-LLaVA captioner"
        kwargs = {"local_files_only": local_files_only}
        self.model = _load_pretrained(VideoLlavaForConditionalGeneration, what, model_path_or_id, hint,
                                      **kwargs, **({"dtype": dtype} if dtype is not None else {}))
        self.tokenizer = _load_pretrained(AutoTokenizer, what, model_path_or_id, hint, **kwargs)
        self.image_processor = _load_pretrained(VideoLlavaImageProcessor, what, model_path_or_id, hint, **kwargs)
        self.device = default_device(device)
        self.model = self.model.to(self.device).eval()
        self.prompt, self.num_frames, self.max_new_tokens = prompt, int(num_frames), int(max_new_tokens)
        self.path = str(model_path_or_id)
        self._dtype = next(iter(self.model.parameters())).dtype

    def _pixel_values(self, frames: np.ndarray) -> torch.Tensor:
        out = self.image_processor(images=list(frames), return_tensors="pt", input_data_format="channels_last")
        pixel_values = out["pixel_values"] if "pixel_values" in out else out["pixel_values_images"]
        return pixel_values[None].to(self.device, self._dtype)  # (1, T, 3, h, w)

    def _video_tokens(self, pixel_values: torch.Tensor) -> int:
        """Visual features the model puts in place of ``<video>``: per frame the patches plus CLS."""
        patch = int(self.model.config.vision_config.patch_size)
        t, _, h, w = pixel_values.shape[1:]
        return ((h // patch) * (w // patch) + 1) * t

    @torch.inference_mode()
    def caption(self, video: np.ndarray) -> str:
        frames = video[uniform_indices(len(video), self.num_frames)]
        pixel_values = self._pixel_values(frames)
        text = self.prompt.replace(VIDEO_TOKEN, VIDEO_TOKEN * self._video_tokens(pixel_values))
        enc = self.tokenizer(text, return_tensors="pt").to(self.device)
        out = self.model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                  pixel_values_videos=pixel_values, max_new_tokens=self.max_new_tokens,
                                  do_sample=False)
        return self.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


#: captioner type (``curation.recaption.type``) -> class
CAPTIONER_CLASSES: dict[str, type[Captioner]] = {"video-llava": VideoLlavaCaptioner}


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_captioner(params: RecaptionParams, device: str | torch.device | None = None) -> Captioner:
    """The captioner a ``recaption`` section names, loaded (raises if its weights cannot be)."""
    cls = CAPTIONER_CLASSES[params.type]
    return cls(params.path, prompt=params.prompt, num_frames=params.num_frames,  # type: ignore[call-arg]
               max_new_tokens=params.max_new_tokens, dtype=_DTYPES[params.dtype], device=device,
               local_files_only=params.local_files_only)


def captioner_fingerprint(params: RecaptionParams) -> str:
    """What decides a caption (model, prompt, frames, length, dtype): the key of the caption cache."""
    spec = params.model_dump(mode="json", exclude={"overwrite", "local_files_only"})
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class RecaptionResult:
    """``records`` with ``caption_long`` (and ``caption_long_source``) set; ``rejects`` the clips
    that could not be captioned; ``captioned`` clips captioned now; ``cached`` taken from the cache."""

    records: list[dict] = field(default_factory=list)
    rejects: list[dict] = field(default_factory=list)
    captioned: int = 0
    cached: int = 0


def recaption_clips(records: Iterable[dict], clip_dir: str | os.PathLike, cache_dir: str | os.PathLike,
                    params: RecaptionParams, captioner: Callable[[], Captioner]) -> RecaptionResult:
    """Give each clip (a :func:`udpdiff.data.filters.curate_clips` record, video at
    ``<clip_dir>/<clip_id>.mp4``) a model-written ``caption_long``.

    A clip whose CSV row had a long caption keeps it unless ``params.overwrite``. Captions are cached
    in ``<cache_dir>/<clip_id>.json`` under :func:`captioner_fingerprint`, so a rerun captions only
    what is new. ``captioner`` builds the model on first need (a run where every caption is cached
    loads nothing); its failure to load stops the run, while a clip that fails becomes a reject
    (``caption_error``) and the run goes on.
    """
    clip_dir, cache_dir = Path(clip_dir), Path(cache_dir)
    key = captioner_fingerprint(params)
    model: Captioner | None = None
    result = RecaptionResult()
    for rec in tqdm(list(records), desc="re-captioning", unit="clip", disable=None):
        rec = dict(rec)
        cid = str(rec["clip_id"])
        has_long = bool(rec.get("caption_long")) and rec.get("caption_long") != rec.get("caption_short")
        if has_long and not params.overwrite:
            rec["caption_long_source"] = "csv"
            result.records.append(rec)
            continue
        cache = cache_dir / f"{cid}.json"
        text = None
        with contextlib.suppress(FileNotFoundError, ValueError, KeyError, TypeError):
            entry = json.loads(cache.read_text())
            if entry["key"] == key and isinstance(entry["caption"], str) and entry["caption"].strip():
                text = entry["caption"]
                result.cached += 1
        if text is None:
            if model is None:
                model = captioner()
            video_path = clip_dir / f"{cid}.mp4"
            try:
                text = model(read_video(video_path))
            except Exception as exc:  # one clip must not stop the run
                logger.exception("captioning %s failed", video_path)
                result.rejects.append({"clip_id": cid, "path": str(video_path),
                                       "reason": f"caption_error: {video_path}: {exc.__class__.__name__}: {exc}"})
                continue
            write_text(cache, json.dumps({"key": key, "caption": text}))
            result.captioned += 1
        rec["caption_long"] = text
        rec["caption_long_source"] = params.type
        result.records.append(rec)
    return result


def caption_stats(captions: Iterable[str], prefix: str) -> dict[str, float]:
    """Caption lengths in words: ``<prefix>_words_mean``, ``_median``, ``_p10``, ``_p90``, ``_max``."""
    words = np.asarray([len(str(c).split()) for c in captions], np.float64)
    if words.size == 0:
        return {}
    return {f"{prefix}_words_mean": float(words.mean()), f"{prefix}_words_median": float(np.median(words)),
            f"{prefix}_words_p10": float(np.percentile(words, 10)),
            f"{prefix}_words_p90": float(np.percentile(words, 90)), f"{prefix}_words_max": float(words.max())}


__all__ = ["CAPTIONER_CLASSES", "DEFAULT_PROMPT", "VIDEO_LLAVA_ID", "Captioner", "RecaptionResult",
           "VideoLlavaCaptioner", "build_captioner", "caption_stats", "captioner_fingerprint", "recaption_clips"]
