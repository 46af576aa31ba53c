"""Can the captioned ground colour and sky be read from the `small` profile's text-encoder states by a
reader that has no positions? (issue 12: text-to-video follows the sky, not the ground)

CogVideoX rotates only the video tokens, so its joint attention reads the text states as a set: a
colour word bound to "ground" must say so in its own state. A small position-free reader (two
self-attention layers without position, mean-pooled, two linear heads) is trained on most captions
and scored on the rest, for three sets of states:

* ``word embeddings``: the encoder's input embeddings, no context at all (a bag of words);
* ``random T5``: the `small` profile's random encoder, as the latents stage builds it;
* ``T5 after N masked-word steps``: the same after ``pretrain_masked_lm`` (``--mlm-steps``).

A reader that gets the ground from the states only as well as from the bare words shows that the
encoder gives no binding. The captions are the synthetic generator's (``render_clip``), long form.

    python benchmarks/probe_text_binding.py --clips 1500 --mlm-steps 1000 \
        --out benchmarks/results/text-pretraining-probe-64wide-vm.json

``--encoder-config '{"d_model": 256, "d_ff": 512, "d_kv": 64}'`` reads the 256-wide encoder `small` had until
attempt 27 (``text-pretraining-probe-vm.json``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine_info  # noqa: E402

logger = logging.getLogger("probe_text_binding")


class PositionFreeReader(nn.Module):
    """Two self-attention layers without positions over the token states, mean-pooled: the ground (7)
    and sky (4) as two classifications."""

    def __init__(self, d_in: int, width: int = 128):
        super().__init__()
        self.inp = nn.Linear(d_in, width)
        layer = nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.0, batch_first=True)
        self.layers = nn.TransformerEncoder(layer, 2)
        self.ground, self.sky = nn.Linear(width, 7), nn.Linear(width, 4)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.layers(self.inp(x), src_key_padding_mask=~mask)
        h = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return self.ground(h), self.sky(h)


def read_scene(states: torch.Tensor, mask: torch.Tensor, ground: torch.Tensor, sky: torch.Tensor, n_train: int,
               epochs: int, seed: int = 0) -> dict[str, float]:
    """Train a reader on the first ``n_train`` captions' states; its accuracy on the others."""
    torch.manual_seed(seed)
    reader = PositionFreeReader(states.shape[-1])
    opt = torch.optim.AdamW(reader.parameters(), 1e-3)
    states = states / states[:n_train][mask[:n_train]].std()
    for _ in range(epochs):
        for batch in torch.randperm(n_train).split(64):
            g, s = reader(states[batch], mask[batch])
            loss = nn.functional.cross_entropy(g, ground[batch]) + nn.functional.cross_entropy(s, sky[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        g, s = reader(states[n_train:], mask[n_train:])
    return {"ground": (g.argmax(1) == ground[n_train:]).float().mean().item(),
            "sky": (s.argmax(1) == sky[n_train:]).float().mean().item()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=1500, help="synthetic captions (15 %% held out)")
    ap.add_argument("--frames", type=int, default=17)
    ap.add_argument("--size", type=int, default=128, help="clip height and width (the small profile's)")
    ap.add_argument("--epochs", type=int, default=60, help="reader epochs")
    ap.add_argument("--mlm-steps", type=int, default=0, help="also read the encoder after this many masked-word steps")
    ap.add_argument("--mlm-batch", type=int, default=None, help="default: the small profile's text_encoder.pretrain")
    ap.add_argument("--mlm-lr", type=float, default=None, help="default: the small profile's text_encoder.pretrain")
    ap.add_argument("--encoder-config", type=json.loads, default={},
                    help='JSON overrides of the small profile\'s text_encoder.config, e.g. \'{"d_model": 64}\'')
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)

    from udpdiff.config import load_params
    from udpdiff.data.synthetic import SKIES, clip_seed, render_clip
    from udpdiff.evaluation.scene_following import GROUND_COLOURS, caption_scene
    from udpdiff.models.text import build_text_encoder, pretrain_masked_lm

    p = load_params(ROOT / "params.yaml", profile="small")
    spec = p.active.text_encoder.model_dump()
    args.mlm_batch = args.mlm_batch or spec["pretrain"]["batch_size"]
    args.mlm_lr = args.mlm_lr or spec["pretrain"]["lr"]
    spec.update(config={**spec["config"], **args.encoder_config}, pretrain={"steps": args.mlm_steps})
    t0 = time.perf_counter()
    clips = [render_clip(clip_seed(p.seed, i), args.frames, args.size, args.size) for i in range(args.clips)]
    longs, shorts = [c.caption_long for c in clips], [c.caption_short for c in clips]
    n_train = int(0.85 * len(clips))
    tokenizer, encoder = build_text_encoder(spec, p.seed, captions=longs[:n_train] + shorts[:n_train])
    scenes = [caption_scene(text) for text in longs]
    ground = torch.tensor([GROUND_COLOURS.index(s[0]) for s in scenes])
    sky = torch.tensor([list(SKIES).index(s[1]) for s in scenes])
    tokens = tokenizer(longs, padding="max_length", max_length=p.active.text_encoder.max_length, truncation=True,
                       return_tensors="pt")
    mask = tokens.attention_mask.bool()

    def states() -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([encoder(ids)[0] for ids in tokens.input_ids.split(100)])

    results = {}
    with torch.no_grad():
        bare = encoder.shared(tokens.input_ids)
    results["word embeddings (no context)"] = read_scene(bare, mask, ground, sky, n_train, args.epochs)
    results["random T5 (the small profile's)"] = read_scene(states(), mask, ground, sky, n_train, args.epochs)
    for name, r in results.items():
        logger.info("%s: %s", name, r)
    mlm = None
    if args.mlm_steps:
        losses = pretrain_masked_lm(tokenizer, encoder, longs[:n_train] + shorts[:n_train], steps=args.mlm_steps,
                                    batch_size=args.mlm_batch, lr=args.mlm_lr, mask_probability=0.15,
                                    max_length=p.active.text_encoder.max_length, seed=p.seed)
        tenth = max(1, len(losses) // 10)
        mlm = {"steps": args.mlm_steps, "batch_size": args.mlm_batch, "lr": args.mlm_lr,
               "loss_by_tenth": [sum(losses[i:i + tenth]) / tenth for i in range(0, len(losses) - tenth + 1, tenth)]}
        key = f"T5 after {args.mlm_steps} masked-word steps"
        results[key] = read_scene(states(), mask, ground, sky, n_train, args.epochs)
        logger.info("%s: %s", key, results[key])
    out = {"benchmark": "text_binding", "machine": machine_info(torch.device("cpu"), ["transformers", "tokenizers"]),
           "encoder_config": spec["config"], "clips": args.clips, "held_out": args.clips - n_train,
           "chance": {"ground": 1 / 7, "sky": 1 / 4}, "reader_epochs": args.epochs, "accuracy": results,
           "masked_word_pretraining": mlm, "seconds": time.perf_counter() - t0}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
