"""``UDPDiffPipeline``: text -> RGB video + its dense prediction, in one denoising pass.

A thin layer over diffusers' ``CogVideoXPipeline``: its denoising loop (CFG, DDIM/DPM++,
rotary embeddings, callbacks) runs unchanged on 32-channel latents; we only (1) tell the
transformer which task to produce, (2) split the final latent into its RGB and dense halves and
decode both with the same VAE (paper §4.4) in one batched call, and (3) decode the colormap back
to depth or entity ids with Pixelplanes.
"""

import contextlib
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from diffusers import CogVideoXPipeline
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from udpdiff import pixelplanes
from udpdiff.models.transformer import LATENT_CHANNELS
from udpdiff.models.vae import to_uint8
from udpdiff.tasks import task_id, task_prompt

TASK_CONDITIONINGS = ("embedding", "text-prompt", "none")
# how a given video's RGB half enters each step of dense prediction (``video=``): noised to the
# step's level, as joint training sees it, or clean, as training with ``train.rgb_given_prob`` does
GIVEN_RGB = ("noised", "clean")
RECONSTRUCTION_GUIDANCE_HOOK = "udpdiff_reconstruction_guidance"


@dataclass
class UDPDiffPipelineOutput(BaseOutput):
    """``videos`` and ``colormaps`` are uint8 (B,T,H,W,3); ``dense`` is depth float32 (B,T,H,W)
    in [0,1] (1 = near) for ``task="depth"`` or int32 entity ids for ``"segmentation"``. An
    RGB-only pipeline (the 16-channel baseline) returns ``videos`` alone (the rest ``None``).
    An ensembled prediction (``ensemble_size`` > 1) also returns its ``members`` (B,N,T,H,W), the
    colormaps the model made for them (``member_colormaps``, B,N,T,H,W,3: ``colormaps`` is the fused map
    encoded again) and their ``uncertainty`` (B,T,H,W): for depth the median absolute deviation of the
    aligned members, in units of ``dense``; for segmentation the share of members whose entity differs
    from the ensemble's."""

    videos: np.ndarray
    colormaps: np.ndarray | None
    dense: np.ndarray | None
    task: str | None
    members: np.ndarray | None = None
    member_colormaps: np.ndarray | None = None
    uncertainty: np.ndarray | None = None


def ensemble_depth_video(members: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Depth predictions (N,T,H,W) of one video (normalised disparity, affine-ambiguous) -> their ensemble
    and its uncertainty, both (T,H,W). Marigold's test-time ensembling (diffusers'
    ``MarigoldDepthPipeline.ensemble_depth``: each member aligned in scale and shift, pixel-wise median),
    with one scale and shift per member for the whole video, as the evaluation fits them.

    Marigold stretches its ensemble to [0, 1], right for a model of relative depth; ours are trained on
    their targets' own scale (scene-wide for the synthetic clips), which every member shares. So the
    ensemble is brought back to it: one least-squares scale and shift onto the members' pixel-wise median."""
    from diffusers import MarigoldDepthPipeline

    from udpdiff.evaluation.depth import align_scale_shift

    n, t, h, w = members.shape
    as_image = torch.from_numpy(np.ascontiguousarray(members, dtype=np.float32)).reshape(n, 1, t * h, w)
    fused, spread = MarigoldDepthPipeline.ensemble_depth(as_image, scale_invariant=True, shift_invariant=True,
                                                         output_uncertainty=True, reduction="median")
    fused, spread = fused.reshape(t, h, w), spread.reshape(t, h, w)
    back = align_scale_shift(fused, as_image.median(dim=0).values.reshape(t, h, w))
    if float(back.scale) > 0:  # not for a degenerate (constant) ensemble: it keeps Marigold's [0, 1]
        fused, spread = back.aligned, spread * float(back.scale)
    return fused.clamp(0, 1).numpy(), spread.numpy()


def ensemble_segmentation_video(members: np.ndarray, rounds: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Entity-id predictions (N,T,H,W) of one video -> their ensemble and its disagreement, both (T,H,W):
    the share of members whose entity at a pixel is not the ensemble's.

    Two samples name their entities arbitrarily, so each member's entities are first matched to a
    reference's (Hungarian on whole-video IoU, as the evaluation matches them to the ground truth; an
    entity without a partner keeps a name of its own). Then each pixel takes the entity most members
    give it, ties going to the first member (the sample's own). The reference is the member that agrees
    best with the others (the highest mean matched IoU), then the previous round's vote: one member with a
    wrong layout does not name the rest."""
    from udpdiff.evaluation.segmentation import hungarian_miou

    members = np.asarray(members)
    n = len(members)
    agreement = np.zeros((n, n))
    for i in range(n):
        for j in range(i + 1, n):
            agreement[i, j] = agreement[j, i] = hungarian_miou(members[i], members[j])["miou"]
    fused, votes = members[int(np.argmax(np.nan_to_num(agreement).sum(1)))], np.full(members.shape[1:], n)
    for _ in range(rounds if n > 1 else 0):
        named, fresh = [], int(fused.max()) + 1
        for member in members:
            renamed, fresh = _named_as(member, fused, fresh)
            named.append(renamed)
        fused, votes = _pixel_vote(np.stack(named))
    labels = np.unique(fused)  # the ensemble's names, 1.. in order, 0 (background) kept
    entities = labels[labels != 0]
    compact = np.zeros_like(fused)
    compact[fused != 0] = np.searchsorted(entities, fused[fused != 0]) + 1
    return compact.astype(members.dtype), (1 - votes / n).astype(np.float32)


def _named_as(member: np.ndarray, reference: np.ndarray, fresh: int) -> tuple[np.ndarray, int]:
    """``member``'s entities renamed as their Hungarian partners in ``reference``; background stays 0, an
    entity without a partner gets a new name from ``fresh`` on. Returns it and the next new name."""
    from udpdiff.evaluation.segmentation import hungarian_miou

    labels, index = np.unique(member, return_inverse=True)
    partner = {int(a): int(b) for a, b, _ in hungarian_miou(member, reference)["matches"]}
    target = np.empty(len(labels), np.int64)
    for i, label in enumerate(labels.tolist()):
        if label == 0 or label in partner:
            target[i] = partner.get(label, 0)
        else:
            target[i], fresh = fresh, fresh + 1
    return target[index.reshape(member.shape)], fresh


def _pixel_vote(named: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel of (N,...) commonly named members: the name most members give it (ties: the first
    member's) and how many give it."""
    best, votes = named[0], np.zeros(named.shape[1:], np.int64)
    for label in np.unique(named):
        count = (named == label).sum(0)
        wins = (count > votes) | ((count == votes) & (named[0] == label))
        best, votes = np.where(wins, label, best), np.where(wins, count, votes)
    return best, votes


class UDPDiffPipeline(CogVideoXPipeline):
    # a plain ``str`` annotation: diffusers reads __init__'s annotations to save/load the config
    def __init__(self, tokenizer, text_encoder, vae, transformer, scheduler, task_conditioning: str = "embedding",
                 given_rgb: str = "noised"):
        if task_conditioning not in TASK_CONDITIONINGS:
            raise ValueError(f"task_conditioning must be one of {TASK_CONDITIONINGS}, got {task_conditioning!r}")
        if given_rgb not in GIVEN_RGB:
            raise ValueError(f"given_rgb must be one of {GIVEN_RGB}, got {given_rgb!r}")
        super().__init__(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                         scheduler=scheduler)
        channels = transformer.config.in_channels
        if channels not in (LATENT_CHANNELS, 2 * LATENT_CHANNELS):
            raise ValueError(f"UDPDiffPipeline needs a {2 * LATENT_CHANNELS}-channel transformer (or {LATENT_CHANNELS} "
                             f"for the RGB-only baseline), got in_channels={channels}")
        if channels == LATENT_CHANNELS and task_conditioning != "none":
            raise ValueError("an RGB-only (16-channel) transformer has no task: use task_conditioning='none'")
        if task_conditioning == "embedding" and getattr(transformer, "task_embedding", None) is None:
            raise ValueError("task_conditioning='embedding' needs a transformer with num_tasks > 0")
        self.register_to_config(task_conditioning=task_conditioning, given_rgb=given_rgb)
        self._rgb_start: torch.Tensor | None = None

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None,
        task: str | None = "depth",
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_frames: int = 49,
        num_inference_steps: int = 50,
        guidance_scale: float = 6.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        max_sequence_length: int = 226,
        segmentation_tolerance: float = 40.0,
        depth_decode: Literal["nearest", "continuous"] = "continuous",
        video: np.ndarray | None = None,
        reconstruction_guidance: float = 0.0,
        ensemble_size: int = 1,
        **kwargs,
    ) -> UDPDiffPipelineOutput:
        """Generate ``num_frames`` of RGB video and the ``task`` prediction for ``prompt``.

        ``video`` (uint8 (T,H,W,3), optional) turns generation into dense prediction *of that
        video*: after every step the RGB half of the latent is replaced by the video's latent
        noised to the next step's level (the replacement method for conditional sampling from a
        joint diffusion model), so only the dense half is generated; with ``given_rgb="clean"`` (a
        model trained with ``train.rgb_given_prob``) the RGB half is the video's clean latent from the
        first step to the last. The evaluation uses this to
        score predictions against exact ground truth. (B,T,H,W,3) gives one video per prompt: B
        clips predicted in one batched pass (the validation during training does this).

        ``reconstruction_guidance`` (``w_r`` > 0, with ``video=`` and ``given_rgb="noised"``) adds
        Ho et al.'s reconstruction guidance (Video Diffusion Models, 2022, §3.1) to the replacement:
        each step's dense x0 estimate moves against the gradient of how badly the model's RGB x0
        estimate reconstructs the given video, so the generated half agrees with the given one.
        It costs a backward pass through the transformer per step.

        ``ensemble_size`` (N > 1; dense prediction of a given ``video`` only) predicts each video N times
        in one batch, member k from the k-th of N generators per video (a list of B*N, video-major) or
        from one generator, and returns the members' ensemble (``ensemble_depth_video``,
        ``ensemble_segmentation_video``): errors that differ from seed to seed cancel; the output's
        ``uncertainty`` says where the members disagree.
        """
        if ensemble_size != 1:
            return self._ensemble(ensemble_size, prompt=prompt, task=task, negative_prompt=negative_prompt,
                                  generator=generator, video=video, num_inference_steps=num_inference_steps,
                                  guidance_scale=guidance_scale, max_sequence_length=max_sequence_length,
                                  segmentation_tolerance=segmentation_tolerance, depth_decode=depth_decode,
                                  reconstruction_guidance=reconstruction_guidance, **kwargs)
        if not self.dense and task is not None:
            raise ValueError(f"this pipeline is RGB-only (16-channel transformer): it has no {task!r} output; "
                             "pass task=None")
        if self.dense and task is None:
            raise ValueError("task is required: 'depth' or 'segmentation'")
        if not self.dense and video is not None:
            raise ValueError("video= predicts dense maps; this pipeline is RGB-only")
        self._check_reconstruction_guidance(reconstruction_guidance, video)
        tid = task_id(task) if self.dense else None
        self._fresh_cache(guidance_scale)
        conditioning = self.config.task_conditioning
        if prompt is None:  # precomputed ``prompt_embeds`` (the task already in them for text-prompt)
            if kwargs.get("prompt_embeds") is None:
                raise ValueError("give a prompt or prompt_embeds")
            prompts = None
            batch = kwargs["prompt_embeds"].shape[0]
        else:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            batch = len(prompts)
            if conditioning == "text-prompt":
                prompts = [task_prompt(task, p) for p in prompts]
        ctx = self.transformer.task_context(tid) if conditioning == "embedding" else contextlib.nullcontext()
        if video is not None:
            if kwargs.get("callback_on_step_end") is not None:
                raise ValueError("video= and callback_on_step_end cannot be combined")
            kwargs["callback_on_step_end"], clean = self._rgb_replacement(video, batch, generator)
            kwargs["callback_on_step_end_tensor_inputs"] = ["latents"]
            num_frames, height, width = video.shape[-4:-1]
            if self.config.given_rgb == "clean":
                self._rgb_start = clean  # the first step's RGB half too (prepare_latents)
        guided = self._reconstruction_guidance(reconstruction_guidance, clean) if reconstruction_guidance else \
            contextlib.nullcontext()
        with ctx, self._clear_rgb_start(), guided:
            (latents,) = super().__call__(
                prompt=prompts,
                negative_prompt=negative_prompt,
                height=height,
                width=width,
                num_frames=num_frames,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                generator=generator,
                max_sequence_length=max_sequence_length,
                output_type="latent",
                return_dict=False,
                **kwargs,
            )
        if not self.dense:
            videos = self._decode(latents)
            self.maybe_free_model_hooks()
            return UDPDiffPipelineOutput(videos=videos, colormaps=None, dense=None, task=None)
        videos, colormaps = self._decode_halves(latents)
        # Pixelplanes decodes where the latents live: its torch path gives numpy's exact result,
        # ~100x faster on a GPU than on the host (benchmarks/results/pixelplanes-h100.json)
        maps = torch.from_numpy(colormaps).to(latents.device) if latents.device.type == "cuda" else colormaps
        if task == "depth":
            decoded = [pixelplanes.decode_depth(c, method=depth_decode) for c in maps]
        else:
            decoded = [pixelplanes.decode_segmentation(c, tolerance=segmentation_tolerance) for c in maps]
        dense = np.stack([d.cpu().numpy() if isinstance(d, torch.Tensor) else d for d in decoded])
        self.maybe_free_model_hooks()
        return UDPDiffPipelineOutput(videos=videos, colormaps=colormaps, dense=dense, task=task)

    def _ensemble(self, n: int, prompt, task: str | None, negative_prompt, generator, video: np.ndarray | None,
                  **call) -> UDPDiffPipelineOutput:
        """``ensemble_size=n`` (``__call__``): the batch repeated n times per video, then fused per video."""
        if n < 1:
            raise ValueError(f"ensemble_size must be >= 1, got {n}")
        if task not in ("depth", "segmentation") or video is None:
            raise ValueError(f"ensemble_size={n} ensembles dense predictions of a given video: it needs a dense task "
                             f"and video=, got task={task!r}{'' if video is not None else ' and no video'}")
        if call.get("prompt_embeds") is not None:
            raise ValueError("ensemble_size > 1 takes a prompt, not prompt_embeds")
        videos = video if video.ndim == 5 else video[None]
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if len(prompts) != len(videos):
            raise ValueError(f"{len(prompts)} prompts for {len(videos)} videos")
        if isinstance(generator, list) and len(generator) != n * len(videos):
            raise ValueError(f"ensemble_size={n} of {len(videos)} videos takes {n * len(videos)} generators "
                             f"(or one), got {len(generator)}")
        if isinstance(negative_prompt, list):
            negative_prompt = [q for q in negative_prompt for _ in range(n)]
        out = self(prompt=[q for q in prompts for _ in range(n)], task=task, negative_prompt=negative_prompt,
                   generator=generator, video=np.repeat(videos, n, axis=0), **call)
        members = out.dense.reshape(len(videos), n, *out.dense.shape[1:])
        ensemble = ensemble_depth_video if task == "depth" else ensemble_segmentation_video
        fused, spread = zip(*(ensemble(m) for m in members), strict=True)
        dense = np.stack(fused)
        colormaps = (pixelplanes.encode_depth(dense) if task == "depth"
                     else np.stack([pixelplanes.encode_segmentation(ids)[0] for ids in dense]))
        member_colormaps = out.colormaps.reshape(members.shape[:2] + out.colormaps.shape[1:])
        return UDPDiffPipelineOutput(videos=out.videos[::n], colormaps=colormaps, dense=dense, task=task,
                                     members=members, member_colormaps=member_colormaps, uncertainty=np.stack(spread))

    def _fresh_cache(self, guidance_scale: float) -> None:
        """A diffusers step cache (``acceleration.approximate.cache``) starts every sample empty:
        diffusers' loop resets it when it ends, this also covers a sample interrupted half way."""
        transformer = self.transformer
        if not getattr(transformer, "is_cache_enabled", False):
            return
        from diffusers.hooks import FasterCacheConfig

        if isinstance(transformer._cache_config, FasterCacheConfig) and guidance_scale <= 1:
            raise ValueError("the faster cache approximates the unconditional CFG half: it needs guidance_scale > 1")
        transformer._reset_stateful_cache()

    @property
    def dense(self) -> bool:
        """False for the RGB-only baseline: video only, no dense half."""
        return self.transformer.config.in_channels == 2 * LATENT_CHANNELS

    @contextlib.contextmanager
    def _clear_rgb_start(self):
        try:
            yield
        finally:
            self._rgb_start = None

    def prepare_latents(self, *args, **kwargs) -> torch.Tensor:
        """diffusers' initial noise, with a given clean RGB half in place (``given_rgb="clean"``)."""
        latents = super().prepare_latents(*args, **kwargs)
        if self._rgb_start is None:
            return latents
        return torch.cat([self._rgb_start.to(latents), latents[:, :, LATENT_CHANNELS:]], dim=2)

    def _check_reconstruction_guidance(self, weight: float, video: np.ndarray | None) -> None:
        """Refuse what reconstruction guidance cannot serve, before anything is encoded or set."""
        if weight == 0:
            return
        if weight < 0:
            raise ValueError(f"reconstruction_guidance must be >= 0, got {weight}")
        if video is None:
            raise ValueError("reconstruction_guidance guides dense prediction of a given video: pass video=")
        if self.config.given_rgb != "noised":
            raise ValueError("reconstruction_guidance needs given_rgb='noised': with a clean RGB half (a model trained "
                             "with train.rgb_given_prob) there is no RGB estimate to reconstruct")
        if self.batch_split is not None or getattr(self.transformer, "is_cache_enabled", False):
            raise ValueError("reconstruction_guidance differentiates the whole transformer batch each step: it cannot "
                             "run with CFG-parallel or a step cache (acceleration.approximate.cache)")
        if self.scheduler.config.prediction_type not in ("v_prediction", "epsilon"):
            raise ValueError(f"reconstruction_guidance supports v_prediction and epsilon schedulers, "
                             f"not {self.scheduler.config.prediction_type!r}")

    @contextlib.contextmanager
    def _reconstruction_guidance(self, weight: float, clean: torch.Tensor):
        """:class:`ReconstructionGuidanceHook` on the transformer for the duration of one call."""
        hook = ReconstructionGuidanceHook(clean, weight, self.scheduler.alphas_cumprod,
                                          self.scheduler.config.prediction_type)
        registry = HookRegistry.check_if_exists_or_initialize(self.transformer)
        registry.register_hook(hook, RECONSTRUCTION_GUIDANCE_HOOK)
        try:
            yield
        finally:
            registry.remove_hook(RECONSTRUCTION_GUIDANCE_HOOK)

    def _rgb_replacement(self, video: np.ndarray, batch: int, generator):
        from udpdiff.models.vae import to_model_input

        videos = video if video.ndim == 5 else video[None]
        if len(videos) not in (1, batch):
            raise ValueError(f"video= holds {len(videos)} videos for {batch} prompts: give one, or one per prompt")
        x = to_model_input(videos, self.vae.device).to(self.vae.dtype)
        clean = self.vae.encode(x).latent_dist.mode() * self.vae_scaling_factor_image  # (1|B,C,F,h,w)
        clean = clean.permute(0, 2, 1, 3, 4).expand(batch, -1, -1, -1, -1)  # (B,F,C,h,w)
        alphas = self.scheduler.alphas_cumprod

        clean_given = self.config.given_rgb == "clean"

        def callback(pipe, i: int, t, tensors: dict) -> dict:
            latents = tensors["latents"]
            timesteps = pipe.scheduler.timesteps
            if i + 1 < len(timesteps) and not clean_given:
                a = alphas[timesteps[i + 1]].to(latents)
                # each video's noise from its own generator (a list): a video's prediction does not depend
                # on the batch it is in, so an ensemble's first member is the one sample of its generator
                noise = randn_tensor(clean.shape, generator=generator, device=latents.device).to(latents)
                rgb = a.sqrt() * clean.to(latents) + (1 - a).sqrt() * noise
            else:
                rgb = clean.to(latents)
            return {"latents": torch.cat([rgb, latents[:, :, LATENT_CHANNELS:]], dim=2)}

        return callback, clean

    def _decode_halves(self, latents: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """The RGB half and the dense half of (B,F,32,h,w) latents as uint8 videos, decoded in one
        VAE call: the halves are stacked on the batch axis, so the colormap costs no second
        sequential decode. The VAE treats batch elements independently (group norms and causal
        convolutions are per sample), so this equals two separate decodes up to kernel choice; with
        the VAE's slicing on (``acceleration.vae_decode: sequential``) diffusers decodes the stack
        one video at a time, which is exactly the two decodes, at their memory."""
        batch = latents.shape[0]
        frames = self._decode(torch.cat([latents[:, :, :LATENT_CHANNELS], latents[:, :, LATENT_CHANNELS:]]))
        return frames[:batch], frames[batch:]

    # set by udpdiff.parallel.split_cfg_batch: this rank decodes its slice of each VAE batch
    batch_split = None

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        if self.batch_split is None:
            return super().decode_latents(latents)
        return self.batch_split(super().decode_latents, latents)

    def _decode(self, latents: torch.Tensor) -> np.ndarray:
        # (B,F,C,h,w) latents -> uint8 frames, trimming any frames the 1.5 patching padded on
        return to_uint8(self.decode_latents(latents.to(self.vae.dtype)))


class ReconstructionGuidanceHook(ModelHook):
    """Reconstruction guidance (Ho et al., Video Diffusion Models, 2022, §3.1) on the transformer
    of a replacement sampler: with ``x̂`` the model's x0 estimate from the noisy latent ``z_t``, the
    dense half's estimate becomes ``x̂_dense - (w α_t / 2) ∇_{z_dense} ||x_rgb - x̂_rgb||²``
    (``α_t = sqrt(alphas_cumprod[t])``, ``x_rgb`` the given video's clean latent), re-expressed in
    the scheduler's parameterisation so diffusers' loop and scheduler run unchanged. Each CFG half
    gets the gradient of its own forward, so guidance combines with CFG as the outputs do."""

    def __init__(self, clean_rgb: torch.Tensor, weight: float, alphas_cumprod: torch.Tensor, prediction_type: str):
        super().__init__()
        # on the latents' device and in float32 once, not on every step (a host-to-device copy syncs)
        self.clean_rgb, self.weight = clean_rgb.float(), weight
        self.alphas_cumprod, self.prediction_type = alphas_cumprod.to(clean_rgb.device, torch.float32), prediction_type

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        if args:
            raise TypeError("reconstruction guidance expects the transformer called with keyword arguments, as "
                            "diffusers' CogVideoX loop calls it")
        hidden, timestep = kwargs.pop("hidden_states"), kwargs["timestep"]
        # eager, not the compiled blocks (acceleration.compile_blocks): graphs compiled for inference
        # recompile for a pass with gradients, block by block, and on an H200 that hit dynamo's
        # recompile limit, which fullgraph=True makes an error
        with torch.enable_grad(), torch.compiler.set_stance("force_eager"):
            z = hidden.detach().requires_grad_(True)
            output = self.fn_ref.original_forward(hidden_states=z, **kwargs)
            sample = output[0] if isinstance(output, tuple) else output.sample
            a = self.alphas_cumprod[timestep.long()].view(-1, 1, 1, 1, 1)
            x0 = self._x0(z.float(), sample.float(), a)
            clean = self.clean_rgb.to(x0).repeat(x0.shape[0] // self.clean_rgb.shape[0], 1, 1, 1, 1)  # CFG halves
            error = (x0[:, :, :LATENT_CHANNELS] - clean).square().sum()
            (grad,) = torch.autograd.grad(error, z)
        dense = slice(LATENT_CHANNELS, None)
        x0_dense = x0.detach()[:, :, dense] - self.weight * a.sqrt() / 2 * grad[:, :, dense].float()
        guided = sample.detach().clone()
        guided[:, :, dense] = self._prediction(z.detach()[:, :, dense].float(), x0_dense, a).to(guided.dtype)
        if isinstance(output, tuple):
            return (guided, *output[1:])
        output.sample = guided
        return output

    def _x0(self, z: torch.Tensor, pred: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "v_prediction":
            return a.sqrt() * z - (1 - a).sqrt() * pred
        return (z - (1 - a).sqrt() * pred) / a.sqrt()

    def _prediction(self, z: torch.Tensor, x0: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "v_prediction":
            return (a.sqrt() * z - x0) / (1 - a).sqrt()
        return (z - a.sqrt() * x0) / (1 - a).sqrt()
