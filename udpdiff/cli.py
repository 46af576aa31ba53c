"""``udpdiff`` command line (library level: no Prefect, no MLflow).

    udpdiff generate --prompt "a red sphere rolls left" --task depth --pipeline models/tiny/pipeline

Under a launcher (``torchrun --nproc_per_node 2 -m udpdiff.cli generate ...``) the ranks share
one sample: each runs its slice of the classifier-free-guidance batch (``udpdiff.parallel``) and
rank 0 writes the files.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def _generate(args: argparse.Namespace) -> int:
    from udpdiff.distributed import inference_ranks

    with inference_ranks() as ranks:
        return _generate_on(args, ranks)


def _generate_on(args: argparse.Namespace, ranks) -> int:
    import numpy as np
    import torch

    from udpdiff import viz
    from udpdiff.acceleration import accelerate_pipeline
    from udpdiff.config import AccelerationParams
    from udpdiff.devices import default_device
    from udpdiff.models.text import unknown_words
    from udpdiff.parallel import split_cfg_batch
    from udpdiff.pipeline import UDPDiffPipeline
    from udpdiff.stages.common import dense_picture

    if not (Path(args.pipeline) / "model_index.json").exists():
        print(f"error: {args.pipeline}: not a saved UDPDiff pipeline (no model_index.json); "
              "run `dvc repro` or pass --pipeline", file=sys.stderr)
        return 2
    pipe = UDPDiffPipeline.from_pretrained(args.pipeline)
    if not pipe.dense and args.task is not None:
        print(f"error: {args.pipeline}: an RGB-only pipeline (16-channel baseline) has no {args.task!r} output; "
              "leave out --task", file=sys.stderr)
        return 2
    task = (args.task or "depth") if pipe.dense else None
    unknown = unknown_words(pipe.tokenizer, args.prompt) if pipe.tokenizer is not None else []
    if unknown:  # a words tokenizer (small profile) knows only its training captions' words
        logging.getLogger(__name__).warning("%s: the text encoder never saw %s in training; encoded as %s",
                                            args.pipeline, ", ".join(repr(w) for w in unknown),
                                            pipe.tokenizer.unk_token)
    pipe.to(default_device())
    compile_blocks = {"true": True, "false": False}.get(args.compile_blocks, args.compile_blocks)
    approximate = {"float8": args.float8, "float8_attention": args.float8_attention,
                   "cache": None if args.cache == "none" else {"type": args.cache}}
    accelerate_pipeline(pipe, AccelerationParams.model_validate(
        {"compile_blocks": compile_blocks, "vae_decode": args.vae_decode, "vae_tiling": args.vae_tiling,
         "approximate": approximate}))
    split = split_cfg_batch(pipe, ranks)
    generator = torch.Generator().manual_seed(args.seed)
    num_frames = args.num_frames or pipe.transformer.config.sample_frames
    out = pipe(args.prompt, task=task, num_frames=num_frames, height=args.height, width=args.width,
               num_inference_steps=args.steps, guidance_scale=args.guidance_scale, generator=generator,
               max_sequence_length=pipe.transformer.config.max_text_seq_length)
    if split is not None and not split.splits:
        logging.getLogger(__name__).warning("%d ranks computed the same sample whole: nothing to split "
                                            "(guidance scale %s)", ranks.world, args.guidance_scale)
    if not ranks.is_main:
        return 0
    out_dir = Path(args.out)
    stem = out_dir / f"{task or 'rgb'}-seed{args.seed}"
    from udpdiff.io.atomic import atomic_path

    if task is None:
        viz.write_side_by_side(f"{stem}.mp4", [out.videos[0]], labels=["video (RGB only)"], fps=args.fps)
        arrays = {"video": out.videos[0]}
    else:
        viz.write_side_by_side(f"{stem}.mp4", [out.videos[0], out.colormaps[0], dense_picture(task, out.dense[0])],
                               labels=["video", f"{task} colormap", "decoded"], fps=args.fps)
        arrays = {"video": out.videos[0], "colormap": out.colormaps[0], "dense": out.dense[0]}
    with atomic_path(f"{stem}.npz") as tmp:
        np.savez_compressed(tmp, **arrays)
    print(f"wrote {stem}.mp4 and {stem}.npz")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="udpdiff", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="text -> video + dense prediction (mp4 side by side + npz)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--task", choices=["depth", "segmentation"], default=None,
                   help="default: depth (leave out for an RGB-only baseline pipeline)")
    g.add_argument("--pipeline", default="models/tiny/pipeline", help="a saved UDPDiffPipeline folder")
    g.add_argument("--out", default="outputs/generate")
    g.add_argument("--num-frames", type=int, default=None, help="default: the transformer's sample_frames")
    g.add_argument("--height", type=int, default=None)
    g.add_argument("--width", type=int, default=None)
    g.add_argument("--steps", type=int, default=50)
    g.add_argument("--guidance-scale", type=float, default=6.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--fps", type=float, default=8)
    g.add_argument("--compile-blocks", choices=["auto", "true", "false"], default="auto",
                   help="torch.compile each transformer block (auto: on CUDA; the first sample pays the compile)")
    g.add_argument("--vae-tiling", action="store_true",
                   help="decode in blended spatial tiles (less memory for large frames, slower)")
    g.add_argument("--vae-decode", choices=["batched", "sequential"], default="batched",
                   help="video and colormap in one VAE call, or one at a time (less memory)")
    g.add_argument("--float8", choices=["none", "rowwise", "tensorwise"], default="none",
                   help="APPROXIMATE (changes the output): float8 linears in the blocks, one scale per row or per "
                        "tensor (tensorwise: usually faster, a larger quality cost; torchao; CUDA sm89+)")
    g.add_argument("--float8-attention", action="store_true",
                   help="APPROXIMATE (changes the output): attention in float8, FlashAttention-3's e4m3 kernel "
                        "(fa3-fwd wheel, Hopper GPU)")
    g.add_argument("--cache", choices=["none", "first-block", "faster", "pab"], default="none",
                   help="APPROXIMATE (changes the output): a diffusers step cache, default knobs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "generate":
        return _generate(args)
    return 1


if __name__ == "__main__":
    sys.exit(main())
