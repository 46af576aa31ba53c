"""Loading the trained or pretrained VAE and text encoder, and one clip's model inputs."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from udpdiff.stages.common import (
    load_colormap,
    read_clip,
)

if TYPE_CHECKING:
    from udpdiff.config import Params
    from udpdiff.paths import ProjectPaths

logger = logging.getLogger(__name__)


def load_vae(p: Params, paths: ProjectPaths):
    from diffusers import AutoencoderKLCogVideoX

    from udpdiff.models.vae import build_vae

    spec = p.active.vae
    if spec.pretrained:  # only `pretrained` and `subfolder` matter to a pretrained VAE
        return build_vae({"pretrained": spec.pretrained, "subfolder": spec.subfolder}, p.seed).eval()
    _ = spec.subfolder  # read either way: the stage's params are the same whichever VAE it loads
    vae = AutoencoderKLCogVideoX.from_pretrained(paths.vae).eval()  # the autoencoder stage's output
    # diffusers records where it loaded from and save_pretrained writes it back: keep that
    # repo-relative, so a pipeline saved in another checkout (a DVC experiment's) has equal bytes
    vae.register_to_config(_name_or_path=str(paths.vae.relative_to(paths.root)))
    return vae


def load_text_encoder(p: Params, paths: ProjectPaths):
    from transformers import AutoTokenizer, T5EncoderModel

    from udpdiff.models.text import build_text_encoder

    pretrained = p.active.text_encoder.pretrained
    if pretrained:  # the weights say everything; the latents stage saved nothing else
        return build_text_encoder({"pretrained": pretrained}, p.seed)
    return (AutoTokenizer.from_pretrained(paths.text_encoder),
            T5EncoderModel.from_pretrained(paths.text_encoder).eval().requires_grad_(False))


def clip_inputs(p: Params, paths: ProjectPaths, row):
    """One manifest row's video, colormaps (per trained task) and captions, read from disk."""
    from udpdiff.latents import ClipInputs

    t = p.active.data.num_frames
    return ClipInputs(clip_id=row.clip_id, rgb=read_clip(p, paths, row.video_path),
                      dense={task: load_colormap(paths, task, row.clip_id)[:t] for task in p.active.train.tasks},
                      caption_long=row.caption_long, caption_short=row.caption_short)


