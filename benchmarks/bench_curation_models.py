"""Curation cost of the *model* steps: seconds per clip, clips/min and peak GPU memory per step, and where
the time goes, for one clip of the Panda-Dense profile (default 49 frames x 480x720, uint8, a smooth random
texture panning at up to ~1.3 px/frame).

Every model is built from its transformers/diffusers config class **at its published size with random
weights** (``torch.manual_seed(0)``, built directly on ``--device``, nothing is downloaded) and run through the
project's own annotator code, so the cost is the real one while the outputs mean nothing:

* ``entities_m2f_384`` / ``entities_m2f_800`` — first-frame entity model: Mask2Former with a Swin-L backbone
  (``facebook/mask2former-swin-large-coco-panoptic``'s shape: Swin embed 192, depths 2-2-18-2, heads
  6-12-24-48, window 12; 200 queries, 133 classes) on frame 0. If ``udpdiff/annotators/entities.py``
  provides the entity segmenter, that class is timed with ``model=`` injection; otherwise the bare
  ``Mask2FormerForUniversalSegmentation`` forward with ``Mask2FormerImageProcessor`` (CPU resize) and
  panoptic post-processing (threshold 0: every query goes through the per-query loop, the worst case).
  ``384``: the HF checkpoints' processor size (384x384); ``800``: Mask2Former's detectron2 test size
  (short side 800, long side <= 1333), shown as an alternative.
* ``sam2_grid_8x8`` / ``sam2_grid_12x12`` — ``Sam2VideoAnnotator.first_frame_entities`` (SAM2 point-grid
  prompts on frame 0; the automatic alternative to the entity model). sam2.1-hiera-large shape.
* ``sam2_propagate_k8`` / ``sam2_propagate_k24`` — ``Sam2VideoAnnotator(video, first_frame_ids=...)``:
  preprocessing, propagation through the whole clip and composition. Random weights would give an
  arbitrary number of grid masks, so the number of tracked objects is fixed instead: ``first_frame_ids``
  is a grid of K equal blocks (propagation cost grows with K).
* ``depthcrafter`` — ``DepthCrafterAnnotator`` at real size (SVD-xt UNet with per-frame CLIP conditioning,
  SVD's temporal-decoder VAE, OpenCLIP ViT-H/14 image encoder), 5 steps, one 110-frame window; float16 on
  CUDA by default (the annotator's own default: its VAE encode is upcast to fp32 in fp16).
* ``depth_anything_v2`` — ``DepthAnythingV2Annotator`` (Depth-Anything-V2-Large: DINOv2 ViT-L/14), with the
  DA-V2 image processor (CPU bicubic resize), every frame.
* ``recaption`` — ``VideoLlavaCaptioner`` (the real class; its loader is pointed at a random
  Video-LLaVA-7B-shaped model: Vicuna-7B text model, two CLIP ViT-L/14 towers, vocab 32064, and a
  word-level stand-in tokenizer) on 8 frames (2056 video tokens), greedy, exactly ``--max-new-tokens``
  new tokens (``min_new_tokens`` = max, so random weights cannot stop early). Prefill (the same call with
  one new token: frame preprocessing, vision towers, LLM prefill) and decode (the rest) are reported
  with decode tokens/s.
* ``cpu:*`` — the CPU steps (probe, cut, write, filters, ``curate_clips`` total) from
  ``benchmarks/bench_curation.py``'s ``bench_source`` on a 720x1280 source (``--cpu-steps run``), or read
  from its JSON (``--cpu-steps json``).

Each measurement: one warm-up call, then the median of ``--repeats`` calls, wall clock with
``torch.cuda.synchronize()`` before and after; peak GiB = ``torch.cuda.max_memory_allocated`` over the timed
calls (reset per step, weights included). The per-clip total adds one row per curation stage (CPU total,
entity model, SAM2 propagation of ``--total-entities`` objects, DepthCrafter, re-captioning); the grid rows,
the other K and Depth Anything V2 are alternatives, shown but not added. The JSON (machine record via
``benchmarks/common.py``) and a markdown table beside it are rewritten after every measurement, so a run cut
short keeps what it measured; a failing step (OOM, a missing class) records its error and the rest still run.

``--size full`` needs a GPU (it is refused on the CPU: Video-LLaVA-7B alone is 14 GB in bf16); on one H200 it
takes about 3-4 minutes with the default ``--repeats 2`` (most of it SAM2 propagation, DepthCrafter and
Video-LLaVA decoding), well inside one 10-minute call; ``--budget-s`` (default 480 s) skips the steps that
would start later. ``--size tiny`` runs the same code on tiny configs of the same classes and a 9x64x96 clip
(CPU, well under 2 minutes): the logic check CI runs, not a measurement.

    python benchmarks/bench_curation_models.py --size full --out benchmarks/results/curation-models-h200.json
    python benchmarks/bench_curation_models.py --size tiny --device cpu --repeats 1 --out /tmp/cm.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import json
import logging
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.bench_eval import (  # noqa: E402
    depth_anything_model,
    depthcrafter_pipeline,
    sam2_config,
    synthetic_videos,
)
from benchmarks.common import GIB, machine_info, n_params, write_outputs  # noqa: E402
from udpdiff.evaluation.runtime import measure_calls  # noqa: E402

logger = logging.getLogger("bench_curation_models")

PACKAGES = ("torch", "transformers", "diffusers", "numpy", "av", "opencv-python-headless", "scenedetect-headless")

SIZES: dict[str, dict[str, Any]] = {
    "full": dict(frames=49, height=480, width=720, max_new_tokens=200, cpu_source=(720, 1280), cpu_seconds=8.0),
    # tiny: the same classes and code paths on toy configs and a toy clip (CPU, seconds)
    "tiny": dict(frames=9, height=64, width=96, max_new_tokens=8, cpu_source=(240, 360), cpu_seconds=3.0),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
GROUPS = ("entities", "sam2", "depthcrafter", "depth_anything_v2", "recaption", "cpu")
CPU_SOURCE_LABEL = "720x1280@30"  # the bench_curation column used with --cpu-steps json


# --------------------------------------------------------------------------------------------
# bookkeeping
# --------------------------------------------------------------------------------------------


class Bench:
    """Timing, memory and the result file; every row is written as soon as it is measured."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.dtype = DTYPES[args.dtype]
        self.tiny = args.size == "tiny"
        self.t_start = time.perf_counter()
        self.result: dict[str, Any] = {"rows": []}
        self._video: np.ndarray | None = None

    # --- device ---
    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def allocated_gib(self) -> float | None:
        return torch.cuda.memory_allocated(self.device) / GIB if self.cuda else None

    def elapsed(self) -> float:
        return time.perf_counter() - self.t_start

    @contextlib.contextmanager
    def build(self) -> Iterator[dict[str, float]]:
        """Seeded construction directly on the device; yields a dict that receives ``build_s``."""
        info: dict[str, float] = {}
        torch.manual_seed(0)
        self.sync()
        t0 = time.perf_counter()
        with torch.device(self.device):
            yield info
        self.sync()
        info["build_s"] = time.perf_counter() - t0

    def video(self) -> np.ndarray:
        if self._video is None:
            a = self.args
            self._video = synthetic_videos(1, a.frames, a.height, a.width, seed=0)[0]
        return self._video

    # --- timing ---
    def measure(self, fn: Callable[[], Any], repeats: int | None = None) -> dict[str, Any]:
        """One warm-up call, then ``repeats`` timed calls: median/min seconds and the peak memory of the timed
        calls (weights included: the peak is reset after the model is built, not freed)."""
        repeats = self.args.repeats if repeats is None else repeats
        m = measure_calls(fn, repeats, before_timed=self.reset_peak)
        return {"median_s": m.median, "min_s": min(m.times), "times_s": m.times, "repeats": repeats,
                "peak_gib": torch.cuda.max_memory_allocated(self.device) / GIB if self.cuda else None}

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    # --- rows ---
    def done(self, step: str) -> bool:
        return any(r["step"] == step for r in self.result["rows"])

    def record(self, row: dict[str, Any]) -> None:
        if "median_s" in row:
            row["s_per_clip"] = row["median_s"]
            row["clips_per_min"] = 60.0 / row["median_s"] if row["median_s"] > 0 else None
        self.result["rows"].append(row)
        self.result["summary"] = summary(self.result["rows"])
        self.save()

    def step(self, step: str, group: str, fn: Callable[[], Any], *, in_total: bool, notes: str = "",
             extra: Callable[[], dict[str, Any]] | None = None, **meta: Any) -> dict[str, Any]:
        """Measure ``fn`` as one row; a failure (OOM included) becomes the row's error and the run goes on."""
        row: dict[str, Any] = {"step": step, "group": group, "in_total": in_total, **meta}
        try:
            row.update(self.measure(fn))
        except Exception as exc:  # noqa: BLE001 - one failing measurement must not lose the others
            logger.error("%s failed: %s", step, traceback.format_exc())
            row.update(status="failed", error=f"{type(exc).__name__}: {exc}"[:500])
            self.free()
        if extra is not None and "median_s" in row:
            try:  # the breakdown beside the timing; its failure leaves the timing standing
                row.update(extra())
            except Exception as exc:  # noqa: BLE001
                logger.error("%s: breakdown failed: %s", step, traceback.format_exc())
                row["extra_error"] = f"{type(exc).__name__}: {exc}"[:300]
                self.free()
        if notes:
            row["notes"] = notes
        self.record(row)
        if "median_s" in row:
            logger.info("%-22s %9.3f s/clip  peak %s GiB", step, row["median_s"],
                        "-" if row["peak_gib"] is None else f"{row['peak_gib']:.2f}")
        return row

    def save(self) -> None:
        self.result["wall_s"] = self.elapsed()
        if self.args.out is not None:
            write_outputs(self.result, self.args.out, render_markdown)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# --------------------------------------------------------------------------------------------
# model configs (published sizes; tiny ones of the same classes for --size tiny)
# --------------------------------------------------------------------------------------------


def mask2former_config(tiny: bool):
    from transformers import Mask2FormerConfig, SwinConfig

    stages = ["stage1", "stage2", "stage3", "stage4"]
    if tiny:
        backbone = SwinConfig(image_size=64, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=4,
                              out_features=stages)
        return Mask2FormerConfig(backbone_config=backbone, feature_size=32, mask_feature_size=32, hidden_dim=32,
                                 encoder_feedforward_dim=64, encoder_layers=1, decoder_layers=2, num_attention_heads=2,
                                 dim_feedforward=64, num_queries=8, num_labels=5), "tiny"
    # facebook/mask2former-swin-large-coco-panoptic: Swin-L (IN-21k, 384) backbone; 200 queries as in
    # Mask2Former's maskformer2_swin_large_IN21k_384_bs16_100ep.yaml; the other head sizes are the defaults.
    backbone = SwinConfig(image_size=384, embed_dim=192, depths=[2, 2, 18, 2], num_heads=[6, 12, 24, 48],
                          window_size=12, drop_path_rate=0.3, out_features=stages)
    return Mask2FormerConfig(backbone_config=backbone, num_queries=200, num_labels=133), \
        "Mask2Former Swin-L (mask2former-swin-large-coco-panoptic shape, 200 queries)"


def video_llava_parts(tiny: bool) -> tuple[Any, Any, Any, str]:
    """(config, tokenizer, image processor, description) of a Video-LLaVA-7B-shaped model."""
    from transformers import CLIPVisionConfig, LlamaConfig, VideoLlavaConfig, VideoLlavaImageProcessor

    if tiny:
        vocab, image_id = 128, 100
        text = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                           pad_token_id=image_id + 2, bos_token_id=1, eos_token_id=2)
        vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=28, patch_size=14, projection_dim=32)
        processor = VideoLlavaImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
        desc = "tiny"
        cfg = VideoLlavaConfig(vision_config=vision, text_config=text, image_token_index=image_id,
                               video_token_index=image_id + 1, vision_feature_layer=-1, video_seq_length=40)
    else:
        # LanguageBind/Video-LLaVA-7B-hf: text = lmsys/vicuna-7b-v1.5 (Llama-2-7B shape) with the vocabulary
        # grown by <image>, <video>, <pad> and padded to a multiple of 64 (the HF conversion script); vision =
        # openai/clip-vit-large-patch14 (VideoLlavaConfig's defaults), image and video towers.
        vocab, image_id = 32064, 32000
        text = LlamaConfig(vocab_size=vocab, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                           num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                           rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=image_id + 2,
                           tie_word_embeddings=False)
        cfg = VideoLlavaConfig(text_config=text, image_token_index=image_id, video_token_index=image_id + 1)
        processor = VideoLlavaImageProcessor()  # CLIP: shortest edge 224, centre crop 224
        desc = "Video-LLaVA-7B shape (Vicuna-7B + 2x CLIP ViT-L/14, vocab 32064)"
    return cfg, stand_in_tokenizer(vocab, image_id), processor, desc


def stand_in_tokenizer(vocab_size: int, image_id: int):
    """A word-level tokenizer with the model's vocabulary size and special ids (<image>, <video>, <pad> at
    ``image_id``, +1, +2): the real Llama tokenizer cannot be downloaded here. The prompt's text tokenizes to a
    few words (Llama's would be ~20 tokens); its 2056 video tokens are exact."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "USER", ":", "Describe", "this", "video", "in", "detail", ".", "ASSISTANT"]
    vocab = {w: i for i, w in enumerate(words)}
    vocab.update({f"w{i}": i for i in range(len(words), image_id)})
    vocab.update({"<image>": image_id, "<video>": image_id + 1, "<pad>": image_id + 2})
    vocab.update({f"w{i}": i for i in range(image_id + 3, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", additional_special_tokens=["<image>", "<video>"])


def entity_blocks(k: int, h: int, w: int) -> np.ndarray:
    """int32 ``(h, w)`` ids ``1..k``: a rows x cols grid of equal blocks (rows = the largest divisor <= sqrt k)."""
    rows = max(d for d in range(1, int(k**0.5) + 1) if k % d == 0)
    cols = k // rows
    ys, xs = np.mgrid[0:h, 0:w]
    return ((ys * rows // h) * cols + xs * cols // w + 1).astype(np.int32)


# --------------------------------------------------------------------------------------------
# steps
# --------------------------------------------------------------------------------------------


def _entity_segmenter_class() -> type | None:
    """``udpdiff.annotators.entities.EntitySegmenter`` where that module exists, else None (bare forward)."""
    try:
        from udpdiff.annotators.entities import EntitySegmenter
    except ImportError:
        return None
    return EntitySegmenter


def run_entities(bench: Bench) -> None:
    from transformers import Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor

    cfg, desc = mask2former_config(bench.tiny)
    with bench.build() as built:
        model = Mask2FormerForUniversalSegmentation._from_config(cfg, dtype=bench.dtype).eval()
    frame = bench.video()[0]
    h, w = frame.shape[:2]
    meta = {"model": desc, "params_m": n_params(model) / 1e6, "dtype": _dtype_name(bench.dtype),
            "build_s": built["build_s"], "weights_gib": bench.allocated_gib()}
    small = 64 if bench.tiny else 384
    sizes = {"entities_m2f_384": {"height": small, "width": small},
             "entities_m2f_800": {"shortest_edge": 2 * small if bench.tiny else 800,
                                  "longest_edge": 2 * small if bench.tiny else 1333}}
    cls = _entity_segmenter_class()
    for i, (step, size) in enumerate(sizes.items()):
        processor = Mask2FormerImageProcessor(size=size, size_divisor=32)
        if cls is not None:
            seg = cls(model=model, processor=processor, device=bench.device)
            how = f"{cls.__module__}.{cls.__name__} (model= injected): preprocess + forward + queries_to_ids"
            fn = lambda seg=seg: seg(frame)  # noqa: E731

            def forward(seg=seg) -> Any:
                with torch.inference_mode():
                    return seg.model(pixel_values=seg.preprocess(frame)[0])

            def extra(seg=seg, forward=forward) -> dict[str, Any]:
                return {"input_hw": list(seg.input_size(h, w)[1]), "entities_found": int(seg(frame).max()),
                        "forward_only_s": measure_calls(forward, bench.args.repeats, warmup=0).median}
        else:
            how = "bare Mask2FormerForUniversalSegmentation: processor + forward + panoptic post-process (thr 0)"

            def forward(processor=processor) -> Any:
                inputs = processor(images=[frame], return_tensors="pt", input_data_format="channels_last")
                pixel_values = inputs["pixel_values"].to(bench.device, bench.dtype)
                with torch.inference_mode():
                    return model(pixel_values=pixel_values, pixel_mask=inputs["pixel_mask"].to(bench.device))

            def fn(processor=processor, forward=forward) -> Any:
                out = forward()
                with torch.inference_mode():
                    return processor.post_process_panoptic_segmentation(out, threshold=0.0, target_sizes=[(h, w)])

            def extra(processor=processor, forward=forward) -> dict[str, Any]:
                shape = processor(images=[frame], return_tensors="pt", input_data_format="channels_last")[
                    "pixel_values"].shape
                return {"input_hw": list(shape[-2:]),
                        "forward_only_s": measure_calls(forward, bench.args.repeats, warmup=0).median}
        label = "HF checkpoint processor size (384x384)" if i == 0 else "detectron2 test size (short 800, long 1333)"
        bench.step(step, "entities", fn, in_total=i == 0, extra=extra, how=how, processor_size=size,
                   notes=f"frame 0, {label}; {how}; random weights: the kept-query count is arbitrary"
                   + ("" if i == 0 else "; alternative, not in the total"), **meta)


def run_sam2(bench: Bench) -> None:
    from transformers import Sam2VideoModel

    from udpdiff.annotators.segmentation import Sam2VideoAnnotator

    a = bench.args
    cfg, cfg_name = sam2_config(bench.tiny)
    with bench.build() as built:
        model = Sam2VideoModel._from_config(cfg, dtype=bench.dtype).eval()
    video = bench.video()
    h, w = video.shape[1:3]
    meta = {"model": f"Sam2VideoAnnotator, {cfg_name}", "params_m": n_params(model) / 1e6,
            "dtype": _dtype_name(bench.dtype), "build_s": built["build_s"], "weights_gib": bench.allocated_gib()}
    for side in a.grids:
        ann = Sam2VideoAnnotator(model=model, device=bench.device, dtype=bench.dtype, points_per_side=side)
        bench.step(f"sam2_grid_{side}x{side}", "sam2", lambda ann=ann: ann.first_frame_entities(video[0]),
                   in_total=False,
                   extra=lambda ann=ann: {"entities_found": int(ann.first_frame_entities(video[0]).max())},
                   notes=f"point grid {side}x{side} on frame 0 (alternative to the entity model; random weights: "
                         "the surviving mask count is arbitrary)", **meta)
    ann = Sam2VideoAnnotator(model=model, device=bench.device, dtype=bench.dtype)
    for k in a.entities:
        ids = entity_blocks(k, h, w)
        bench.step(f"sam2_propagate_k{k}", "sam2", lambda ids=ids: ann(video, first_frame_ids=ids),
                   in_total=k == a.total_entities, entities=k, frames=int(video.shape[0]),
                   notes=f"{k} tracked objects (first_frame_ids = {k} blocks), {video.shape[0]} frames"
                         + ("" if k == a.total_entities else "; alternative K, not in the total"), **meta)


def run_depthcrafter(bench: Bench) -> None:
    from udpdiff.annotators.depth import DepthCrafterAnnotator, depthcrafter_processing_size

    a = bench.args
    dtype = DTYPES[a.depthcrafter_dtype]
    torch.manual_seed(0)
    bench.sync()
    t0 = time.perf_counter()
    pipe = depthcrafter_pipeline(bench.tiny, a.frames, bench.device).to(bench.device, dtype)
    bench.sync()
    build_s = time.perf_counter() - t0
    ann = DepthCrafterAnnotator(pipeline=pipe, device=bench.device, dtype=dtype)
    video = bench.video()
    params = {k: round(n_params(m) / 1e6, 1) for k, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
    size = depthcrafter_processing_size(a.height, a.width, ann.max_res)
    bench.step("depthcrafter", "depth", lambda: ann(video), in_total=True,
               model="DepthCrafterAnnotator: SVD-xt UNet (per-frame cond.) + SVD VAE + CLIP ViT-H/14"
               if not bench.tiny else "DepthCrafterAnnotator (tiny)",
               params_m=params, dtype=_dtype_name(dtype), build_s=build_s, weights_gib=bench.allocated_gib(),
               steps=ann.num_inference_steps, window=ann.window_size, processing_size=list(size),
               notes=f"{ann.num_inference_steps} steps, 1 window, {size[0]}x{size[1]}, {_dtype_name(dtype)}")


def run_depth_anything(bench: Bench) -> None:
    from udpdiff.annotators.depth import DepthAnythingV2Annotator, depth_anything_v2_processor

    with bench.build() as built:
        model = depth_anything_model(bench.tiny).to(bench.dtype).eval()
    ann = DepthAnythingV2Annotator(model=model, processor=depth_anything_v2_processor(), device=bench.device)
    video = bench.video()

    def extra() -> dict[str, Any]:  # where its time goes: the processor (PIL bicubic resize on the CPU) alone
        frames = list(video[: ann.batch_size])
        t = measure_calls(lambda: ann.processor(images=frames, return_tensors="pt",
                                                input_data_format="channels_last"), 1, warmup=0).median
        return {"processor_s": t * video.shape[0] / len(frames)}

    bench.step("depth_anything_v2", "depth", lambda: ann(video), in_total=False, extra=extra,
               model="DepthAnythingV2Annotator, Depth-Anything-V2-Large shape (DINOv2 ViT-L/14)"
               if not bench.tiny else "DepthAnythingV2Annotator (tiny)",
               params_m=n_params(model) / 1e6, dtype=_dtype_name(bench.dtype), build_s=built["build_s"],
               weights_gib=bench.allocated_gib(), batch_size=ann.batch_size,
               notes="every frame, batch 8; alternative depth model, not in the total")


def run_recaption(bench: Bench) -> None:
    from transformers import AutoTokenizer, VideoLlavaForConditionalGeneration, VideoLlavaImageProcessor

    from udpdiff.data.captioner import VideoLlavaCaptioner

    a = bench.args
    cfg, tokenizer, processor, desc = video_llava_parts(bench.tiny)
    with bench.build() as built:
        model = VideoLlavaForConditionalGeneration._from_config(cfg, dtype=bench.dtype).eval()
    parts = {VideoLlavaForConditionalGeneration: model, AutoTokenizer: tokenizer, VideoLlavaImageProcessor: processor}

    def load(cls: type, *_: Any, **__: Any) -> Any:  # the captioner's loader, pointed at the random parts
        return parts[cls]

    with mock.patch("udpdiff.evaluation.consistency._load_pretrained", load):
        cap = VideoLlavaCaptioner("random-weights", max_new_tokens=a.max_new_tokens, dtype=bench.dtype,
                                  device=bench.device)
    gen = cap.model.generation_config
    gen.pad_token_id = cfg.text_config.pad_token_id
    counts: dict[str, int] = {}
    generate = cap.model.generate

    def counting_generate(*args: Any, **kwargs: Any) -> torch.Tensor:
        out = generate(*args, **kwargs)
        counts["prompt_tokens"] = int(kwargs["input_ids"].shape[1])
        counts["new_tokens"] = int(out.shape[1] - kwargs["input_ids"].shape[1])
        return out

    cap.model.generate = counting_generate
    video = bench.video()
    n = a.max_new_tokens

    def run(tokens: int) -> Callable[[], str]:
        def fn() -> str:
            cap.max_new_tokens = gen.min_new_tokens = tokens  # exactly `tokens` new tokens: no early EOS
            return cap.caption(video)
        return fn

    def extra() -> dict[str, Any]:
        full_counts = dict(counts)
        pre = bench.measure(run(1))
        row_prefill = pre["median_s"]
        cap.max_new_tokens = gen.min_new_tokens = n
        return {"prefill_s": row_prefill, "prefill_times_s": pre["times_s"], **full_counts}

    row = bench.step("recaption", "recaption", run(n), in_total=True, extra=extra, model=f"VideoLlavaCaptioner, {desc}",
                     params_m=n_params(model) / 1e6, dtype=_dtype_name(bench.dtype), build_s=built["build_s"],
                     weights_gib=bench.allocated_gib(), num_frames=cap.num_frames, max_new_tokens=n)
    if "median_s" in row and "prefill_s" in row:
        # two medians of separate runs: on a loaded machine a tiny model's decode can vanish in their
        # noise, and a negative time is no measurement
        decode = row["median_s"] - row["prefill_s"]
        row["decode_s"] = decode if decode > 0 else None
        row["decode_tokens_per_s"] = (n - 1) / decode if decode > 0 and n > 1 else None
        row["notes"] = (f"{cap.num_frames} frames, {row.get('prompt_tokens')} prompt tokens, {row.get('new_tokens')} "
                        f"new tokens (greedy, forced); prefill {row['prefill_s']:.3f} s + "
                        + (f"decode {decode:.3f} s" if decode > 0 else
                           f"decode not resolved ({n} tokens' median within the timing noise of 1 token's)")
                        + (f" = {row['decode_tokens_per_s']:.1f} tok/s" if row["decode_tokens_per_s"] else ""))
        bench.result["summary"] = summary(bench.result["rows"])
        bench.save()


def run_cpu(bench: Bench) -> None:
    """The CPU steps through benchmarks/bench_curation.py (run here, or its JSON)."""
    a = bench.args
    if a.cpu_steps == "json":
        r = json.loads(Path(a.cpu_json).read_text())
        rows = [x for x in r["results"] if "median_s" in x]
        sources = list(dict.fromkeys(x["source"] for x in rows))
        source = CPU_SOURCE_LABEL if CPU_SOURCE_LABEL in sources else sources[0]
        origin = f"from {a.cpu_json} ({source} source, {r['machine'].get('cpu_count')} CPUs, {r['machine']['host']})"
        found = [x for x in rows if x["source"] == source]
    else:
        from benchmarks.bench_curation import bench_source

        h, w = SIZES[a.size]["cpu_source"]
        ns = argparse.Namespace(src_fps=30, seconds=SIZES[a.size]["cpu_seconds"], num_frames=a.frames, fps=8.0,
                                height=a.height, width=a.width, repeats=a.repeats)
        with tempfile.TemporaryDirectory(prefix="bench_curation_models_") as tmp:
            found = [x for x in bench_source((h, w), ns, Path(tmp)) if "median_s" in x]
        origin = f"bench_curation.bench_source on this machine ({h}x{w}@30 source, {os.cpu_count()} CPUs)"
    for x in found:
        step = f"cpu:{x['step']}"
        total = x["step"] == "total"
        bench.record({"step": step, "group": "cpu", "in_total": total, "device": "cpu", "median_s": x["median_s"],
                      "min_s": x["min_s"], "repeats": x["repeats"], "peak_gib": None, "source": x["source"],
                      "notes": ("curate_clips on one clip (probe, cut, filters, write)" if total
                                else "part of cpu:total") + f"; {origin}"})


RUNNERS: dict[str, Callable[[Bench], None]] = {
    "entities": run_entities,
    "sam2": run_sam2,
    "depthcrafter": run_depthcrafter,
    "depth_anything_v2": run_depth_anything,
    "recaption": run_recaption,
    "cpu": run_cpu,
}


def total_steps(args: argparse.Namespace) -> set[str]:
    """The one row per curation stage that the per-clip total adds up."""
    return {"cpu:total", "entities_m2f_384", f"sam2_propagate_k{args.total_entities}", "depthcrafter", "recaption"}


def planned_steps(args: argparse.Namespace) -> dict[str, list[str]]:
    """The rows each group writes (the CPU group's names come from bench_curation; its total is listed)."""
    return {
        "entities": ["entities_m2f_384", "entities_m2f_800"],
        "sam2": [f"sam2_grid_{s}x{s}" for s in args.grids] + [f"sam2_propagate_k{k}" for k in args.entities],
        "depthcrafter": ["depthcrafter"],
        "depth_anything_v2": ["depth_anything_v2"],
        "recaption": ["recaption"],
        "cpu": ["cpu:total"],
    }


# --------------------------------------------------------------------------------------------
# summary and table
# --------------------------------------------------------------------------------------------


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-clip total of the ``in_total`` rows measured so far and each one's share of it."""
    counted = [r for r in rows if r.get("in_total") and "median_s" in r]
    total = sum(r["median_s"] for r in counted)
    missing = [r["step"] for r in rows if r.get("in_total") and "median_s" not in r]
    if not counted or total <= 0:
        return {"total_s_per_clip": None, "missing": missing}
    shares = sorted(((r["step"], r["median_s"], r["median_s"] / total) for r in counted), key=lambda x: -x[1])
    gpu = sum(r["median_s"] for r in counted if r.get("group") != "cpu")
    return {"total_s_per_clip": total, "clips_per_min": 60.0 / total, "model_s_per_clip": gpu,
            "clips_per_model_hour": 3600.0 / gpu if gpu else None, "cpu_s_per_clip": total - gpu,
            "shares": [{"step": s, "s_per_clip": t, "share": f} for s, t, f in shares], "missing": missing}


def _f(x: Any, fmt: str = "{:.3f}") -> str:
    return "—" if x is None else fmt.format(x)


def render_markdown(r: dict[str, Any]) -> str:
    m, c = r.get("machine", {}), r.get("config", {})
    dev = (m.get("gpu") or {}).get("name") or m.get("device", "?")
    lines = [f"# Curation model steps per clip — {dev}", ""]
    if c.get("size") == "tiny":
        lines += ["**TINY RUN** (toy configs and clip): checks the code paths; the numbers mean nothing.", ""]
    lines += [f"{r.get('date', '')}; torch {m.get('versions', {}).get('torch')}; clip {c.get('clip')}; "
              f"{c.get('size')} configs, RANDOM WEIGHTS; dtype {c.get('dtype')} (DepthCrafter "
              f"{c.get('depthcrafter_dtype')}); median of {c.get('repeats')} after one warm-up; wall clock, "
              "device synchronised; peak = max_memory_allocated during the timed calls (weights included).", "",
              "| step | s/clip | clips/min | peak GiB | notes |", "|---|---:|---:|---:|---|"]
    for x in r.get("rows", []):
        name = x["step"] + ("" if x.get("in_total") else " *(alt/part)*")
        if "median_s" not in x:
            lines.append(f"| {name} | {x.get('status', '?')} | | | {x.get('error', x.get('reason', ''))[:160]} |")
            continue
        lines.append(f"| {name} | {_f(x['median_s'])} | {_f(x.get('clips_per_min'), '{:.2f}')} | "
                     f"{_f(x.get('peak_gib'), '{:.2f}')} | {x.get('notes', '')} |")
    s = r.get("summary") or {}
    if s.get("total_s_per_clip"):
        lines += ["", "## Where the time goes (one clip, the rows not marked alt/part)", "",
                  "| step | s/clip | share |", "|---|---:|---:|"]
        lines += [f"| {x['step']} | {x['s_per_clip']:.3f} | {100 * x['share']:.1f} % |" for x in s["shares"]]
        lines += [f"| **total** | **{s['total_s_per_clip']:.3f}** | 100 % |", "",
                  f"{s['clips_per_min']:.2f} clips/min with the steps one after another on this machine; the model "
                  f"steps alone ({dev}) {s['model_s_per_clip']:.2f} s/clip = "
                  f"{_f(s.get('clips_per_model_hour'), '{:.0f}')} clips per hour; the CPU steps "
                  f"{s['cpu_s_per_clip']:.2f} s/clip on the host CPU (they can overlap other clips' model steps)."]
        for x in r.get("rows", []):
            if x["step"] == "recaption" and "prefill_s" in x and x.get("decode_s") is not None:
                lines.append(f"Re-captioning: prefill {x['prefill_s']:.3f} s, decode {x['decode_s']:.3f} s "
                             f"({_f(x.get('decode_tokens_per_s'), '{:.1f}')} tokens/s).")
            if x["step"] == "depth_anything_v2" and "processor_s" in x:
                lines.append(f"Depth Anything V2: its CPU image processor takes {x['processor_s']:.3f} s of "
                             f"{x['median_s']:.3f} s.")
            if x["step"].startswith("entities_m2f") and "forward_only_s" in x:
                lines.append(f"{x['step']}: preprocess + forward {x['forward_only_s']:.3f} s of {x['median_s']:.3f} s "
                             f"(input {x.get('input_hw')}); the rest is the post-processing, whose cost depends "
                             "on how many queries survive (arbitrary with random weights).")
        if s.get("missing"):
            lines.append(f"Not in the total (failed or skipped): {', '.join(s['missing'])}.")
    if r.get("notes"):
        lines += [""] + [f"- {n}" for n in r["notes"]]
    return "\n".join(lines).rstrip() + "\n"


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers, got {text!r}") from exc
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=("tiny", "full"), default="full", help="model configs (default full)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--depthcrafter-dtype", choices=tuple(DTYPES), default=None,
                   help="default float16 on CUDA (DepthCrafterAnnotator's default), else --dtype")
    p.add_argument("--repeats", type=int, default=2, help="timed calls per measurement, after one warm-up")
    p.add_argument("--groups", default=",".join(GROUPS), help=f"comma list of {GROUPS}")
    p.add_argument("--frames", type=int, default=None, help="clip frames (default 49; tiny 9)")
    p.add_argument("--height", type=int, default=None, help="clip height (default 480; tiny 64)")
    p.add_argument("--width", type=int, default=None, help="clip width (default 720; tiny 96)")
    p.add_argument("--grids", type=_int_list, default=[8, 12], help="SAM2 point grids per side (default 8,12)")
    p.add_argument("--entities", type=_int_list, default=[8, 24], help="SAM2 tracked objects K (default 8,24)")
    p.add_argument("--total-entities", type=int, default=None, help="the K counted in the total (default: largest)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="caption tokens (default 200 = RecaptionParams)")
    p.add_argument("--cpu-steps", choices=("run", "json"), default="run",
                   help="run bench_curation's CPU steps here (default) or read them from --cpu-json")
    p.add_argument("--cpu-json", type=Path, default=ROOT / "benchmarks" / "results" / "curation-cpu.json")
    p.add_argument("--budget-s", type=float, default=480.0, help="skip groups that would start after this many s")
    p.add_argument("--out", type=Path, default=None, help="JSON path (a .md table is written beside it)")
    args = p.parse_args(argv)
    size = SIZES[args.size]
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here")
    if args.size == "full" and device.type != "cuda":
        p.error("--size full builds real-size models (Video-LLaVA-7B alone is 14 GB in bf16, 28 GB in fp32) and "
                "is refused off the GPU; use --size tiny on the CPU")
    args.dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    args.depthcrafter_dtype = args.depthcrafter_dtype or ("float16" if device.type == "cuda" else args.dtype)
    for key in ("frames", "height", "width", "max_new_tokens"):
        if getattr(args, key) is None:
            setattr(args, key, size[key])
    if args.frames < 8:
        p.error("--frames must be >= 8 (the captioner samples 8 frames)")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    args.total_entities = args.total_entities or max(args.entities)
    if args.total_entities not in args.entities:
        p.error(f"--total-entities {args.total_entities} is not one of --entities {args.entities}")
    groups = [g for g in args.groups.split(",") if g]
    unknown = set(groups) - set(GROUPS)
    if unknown:
        p.error(f"unknown groups {sorted(unknown)}; choose from {GROUPS}")
    args.group_list = [g for g in GROUPS if g in groups]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("diffusers", "transformers", "udpdiff.annotators"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    bench = Bench(args)
    info = machine_info(bench.device, PACKAGES)
    info["torch_threads"] = torch.get_num_threads()
    info["loadavg_1_5_15_at_start"] = list(os.getloadavg())
    bench.result.update({
        "benchmark": "curation_models",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": info,
        "config": {"size": args.size, "device": str(bench.device), "dtype": args.dtype,
                   "depthcrafter_dtype": args.depthcrafter_dtype, "repeats": args.repeats,
                   "clip": f"{args.frames}x{args.height}x{args.width}", "groups": args.group_list,
                   "sam2_grids": args.grids, "sam2_entities": args.entities, "total_entities": args.total_entities,
                   "max_new_tokens": args.max_new_tokens, "cpu_steps": args.cpu_steps, "budget_s": args.budget_s,
                   "argv": sys.argv[1:] if argv is None else argv},
        "notes": [
            "RANDOM WEIGHTS at the published sizes (--size full) or tiny configs of the same classes (--size tiny): "
            "the cost is the architecture's, the outputs mean nothing; synthetic panning-texture clip",
            "SAM2 propagation tracks K objects given as first_frame_ids (K equal blocks) because random weights "
            "find an arbitrary number of grid entities; Video-LLaVA decodes exactly max_new_tokens tokens",
            "per-clip total = cpu:total + entities_m2f_384 + sam2_propagate_k<total K> + depthcrafter + recaption "
            "(steps one after another for one clip; batching clips or overlapping CPU and GPU work is not modelled)",
        ],
    })
    logger.info("device %s, dtype %s, size %s, clip %dx%dx%d, groups %s", bench.device, args.dtype, args.size,
                args.frames, args.height, args.width, args.group_list)
    plan, totals = planned_steps(args), total_steps(args)
    for group in args.group_list:
        if bench.elapsed() > args.budget_s:
            for step in plan[group]:
                bench.record({"step": step, "group": group, "in_total": step in totals, "status": "skipped",
                              "reason": f"--budget-s {args.budget_s:.0f} s spent"})
            continue
        logger.info("== %s (t=%.0f s)", group, bench.elapsed())
        try:
            RUNNERS[group](bench)
        except Exception as exc:  # noqa: BLE001 - a model that cannot be built fails its rows, not the run
            logger.error("%s failed: %s", group, traceback.format_exc())
            for step in plan[group]:
                if not bench.done(step):
                    bench.record({"step": step, "group": group, "in_total": step in totals, "status": "failed",
                                  "error": f"{type(exc).__name__}: {exc}"[:500]})
        # the group's models were locals of its runner: collect them and hand the memory back before the next
        bench.free()
        if bench.cuda:
            bench.result.setdefault("allocated_gib_after_group", {})[group] = bench.allocated_gib()
    bench.result["machine"]["loadavg_1_5_15_at_end"] = list(os.getloadavg())
    bench.save()
    print(render_markdown(bench.result))
    if args.out:
        print(f"wrote {args.out} and {args.out.with_suffix('.md')} ({bench.elapsed():.0f} s)")
    failed = [x["step"] for x in bench.result["rows"] if x.get("status") == "failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
