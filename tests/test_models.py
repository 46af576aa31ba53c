"""The 32-channel transformer, its task embedding and channel expansion, and the pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import CogVideoXTransformer3DModel
from diffusers.models.embeddings import get_3d_rotary_pos_embed

from udpdiff.models.transformer import UDPDiffTransformer3DModel, from_cogvideox, load_transformer
from udpdiff.pipeline import UDPDiffPipeline

TINY = dict(num_attention_heads=2, attention_head_dim=16, time_embed_dim=32, text_embed_dim=32, num_layers=2,
            sample_width=8, sample_height=8, sample_frames=9, patch_size=2, max_text_seq_length=16)


def _stock(rotary: bool) -> CogVideoXTransformer3DModel:
    torch.manual_seed(0)
    return CogVideoXTransformer3DModel(**TINY, use_rotary_positional_embeddings=rotary).eval()


def _inputs(channels: int = 16):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(2, 3, channels, 8, 8, generator=g), torch.randn(2, 16, 32, generator=g),
            torch.tensor([999, 10]))


@pytest.mark.parametrize("rotary", [False, True])
def test_duplicate_preserving_reproduces_stock_output_in_both_halves(rotary):
    stock = _stock(rotary)
    ours = from_cogvideox(stock, channel_expansion="duplicate-preserving").eval()
    x, text, t = _inputs()
    kw = {"image_rotary_emb": get_3d_rotary_pos_embed(16, ((0, 0), (4, 4)), (4, 4), 3)} if rotary else {}
    with torch.no_grad():
        ref = stock(x, text, t, **kw).sample
        out = ours(torch.cat([x, x], dim=2), text, t, task_id=torch.tensor([0, 1]), **kw).sample
    assert out.shape == (2, 3, 32, 8, 8)
    # zero-initialised task embedding: the expanded model starts exactly at the stock function
    torch.testing.assert_close(out[:, :, :16], ref, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(out[:, :, 16:], ref, atol=2e-5, rtol=1e-5)


def test_paper_duplicate_and_random_expansions_differ_from_preserving():
    stock = _stock(False)
    x, text, t = _inputs()
    xx = torch.cat([x, x], dim=2)
    outs = {}
    for mode in ("duplicate", "random", "duplicate-preserving"):
        model = from_cogvideox(stock, channel_expansion=mode, seed=3).eval()
        w = model.patch_embed.proj.weight
        assert w.shape[1] == 32
        if mode == "duplicate":  # the paper: both halves are copies of the stock weights
            torch.testing.assert_close(w[:, :16], stock.patch_embed.proj.weight)
            torch.testing.assert_close(w[:, 16:], stock.patch_embed.proj.weight)
        if mode == "random":  # first half kept, second half fresh
            torch.testing.assert_close(w[:, :16], stock.patch_embed.proj.weight)
            assert not torch.allclose(w[:, 16:], stock.patch_embed.proj.weight)
        with torch.no_grad():
            outs[mode] = model(xx, text, t, task_id=0).sample
    assert not torch.allclose(outs["duplicate"], outs["duplicate-preserving"], atol=1e-4)
    assert not torch.allclose(outs["random"], outs["duplicate-preserving"], atol=1e-4)


def test_task_embedding_changes_output_and_is_required():
    model = UDPDiffTransformer3DModel(**TINY, num_tasks=2).eval()
    torch.nn.init.normal_(model.task_embedding.weight)
    x, text, t = _inputs(32)
    with torch.no_grad():
        seg = model(x, text, t, task_id=0).sample
        depth = model(x, text, t, task_id=1).sample
        with model.task_context(1):
            depth_ctx = model(x, text, t).sample
    assert not torch.allclose(seg, depth)
    torch.testing.assert_close(depth, depth_ctx)
    with pytest.raises(ValueError, match="task"):
        model(x, text, t)
    with pytest.raises(ValueError, match="out of range"):
        model(x, text, t, task_id=5)


def test_task_embedding_receives_gradients():
    model = UDPDiffTransformer3DModel(**TINY, num_tasks=2)
    x, text, t = _inputs(32)
    model(x, text, t, task_id=torch.tensor([0, 1])).sample.pow(2).mean().backward()
    grad = model.task_embedding.weight.grad
    assert grad is not None and bool((grad.abs().sum(dim=1) > 0).all())


def test_single_task_model_has_no_task_embedding():
    model = UDPDiffTransformer3DModel(**TINY, num_tasks=0).eval()
    x, text, t = _inputs(32)
    assert model.task_embedding is None
    assert model(x, text, t).sample.shape == x.shape
    with pytest.raises(ValueError, match="no task embedding"):
        model(x, text, t, task_id=0)


def test_save_and_load_round_trip_exactly(tmp_path):
    model = load_transformer({"config": TINY}, num_tasks=2, seed=5).eval()
    torch.nn.init.normal_(model.task_embedding.weight)
    model.save_pretrained(tmp_path)
    loaded = UDPDiffTransformer3DModel.from_pretrained(tmp_path).eval()
    assert loaded.config.num_tasks == 2 and loaded.config.in_channels == 32
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    x, text, t = _inputs(32)
    with torch.no_grad():
        torch.testing.assert_close(model(x, text, t, task_id=1).sample, loaded(x, text, t, task_id=1).sample,
                                   atol=0, rtol=0)


def test_rejects_non_16_channel_stock():
    with pytest.raises(ValueError, match="16-channel"):
        from_cogvideox(CogVideoXTransformer3DModel(**{**TINY, "in_channels": 8, "out_channels": 8}))


@pytest.mark.parametrize("task", ["depth", "segmentation"])
def test_pipeline_returns_video_colormap_and_decoded_dense(task, tiny_pipeline):
    pipe = tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a red sphere", task=task, num_frames=9, height=32, width=32, num_inference_steps=2,
               guidance_scale=2.0, generator=torch.Generator().manual_seed(0), max_sequence_length=16)
    assert out.videos.shape == (1, 9, 32, 32, 3) and out.videos.dtype == np.uint8
    assert out.colormaps.shape == out.videos.shape
    assert out.dense.shape == (1, 9, 32, 32)
    if task == "depth":
        assert out.dense.dtype == np.float32 and 0 <= out.dense.min() and out.dense.max() <= 1
    else:
        assert np.issubdtype(out.dense.dtype, np.integer)


def test_a_transformer_at_patch_1_has_a_token_per_latent_pixel_and_samples(tiny_pipeline):
    """The token-size ablation (params.yaml ``token-size``): patch 1 gives 4x the tokens, with rotary
    tables to match, and the pipeline samples the same shapes as at patch 2."""
    from udpdiff.train import rotary_embeddings

    outputs = {}
    for patch in (2, 1):
        pipe = tiny_pipeline(patch_size=patch, rotary=True)
        pipe.set_progress_bar_config(disable=True)
        cos, _ = rotary_embeddings(pipe.transformer, pipe.vae_scale_factor_spatial, 32, 32, 3, torch.device("cpu"))
        assert cos.shape[0] == 3 * (8 // patch) ** 2  # latent frames x tokens per latent frame
        out = pipe("a red sphere", task="depth", num_frames=9, height=32, width=32, num_inference_steps=2,
                   generator=torch.Generator().manual_seed(0), max_sequence_length=16)
        assert out.videos.shape == (1, 9, 32, 32, 3) and out.dense.shape == (1, 9, 32, 32)
        outputs[patch] = out.videos
    assert not np.array_equal(outputs[1], outputs[2])


def test_pipeline_is_deterministic_and_task_dependent(tiny_pipeline):
    pipe = tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    torch.nn.init.normal_(pipe.transformer.task_embedding.weight, std=5.0)
    kw = dict(num_frames=9, height=32, width=32, num_inference_steps=2, guidance_scale=1.0, max_sequence_length=16)
    a = pipe("a cube", task="depth", generator=torch.Generator().manual_seed(0), **kw)
    b = pipe("a cube", task="depth", generator=torch.Generator().manual_seed(0), **kw)
    c = pipe("a cube", task="segmentation", generator=torch.Generator().manual_seed(0), **kw)
    assert np.array_equal(a.colormaps, b.colormaps)
    assert not np.array_equal(a.colormaps, c.colormaps)


def test_pipeline_video_conditioning_keeps_the_given_video(tmp_path, tiny_pipeline):
    pipe = tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    video = np.random.default_rng(0).integers(0, 255, (9, 32, 32, 3), dtype=np.uint8)
    out = pipe("a cube", task="depth", video=video, num_inference_steps=3, guidance_scale=1.0,
               generator=torch.Generator().manual_seed(0), max_sequence_length=16)
    # the RGB half ends as the video's own latent: the output is the VAE reconstruction of it
    from udpdiff.models.vae import to_model_input, to_uint8

    with torch.no_grad():
        rec = to_uint8(pipe.vae.decode(pipe.vae.encode(to_model_input(video[None])).latent_dist.mode()).sample)[0]
    assert np.abs(out.videos[0].astype(int) - rec.astype(int)).max() <= 1


def test_pipeline_predicts_a_batch_of_videos_one_per_prompt(tiny_pipeline):
    """video= with (B,T,H,W,3): each prompt's RGB half ends as *its* video's latent, and a count
    that matches neither one nor the prompts is refused."""
    from udpdiff.models.vae import to_model_input, to_uint8

    pipe = tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    videos = np.random.default_rng(1).integers(0, 255, (2, 9, 32, 32, 3), dtype=np.uint8)
    videos[1] = 255 - videos[1]
    kw = dict(task="segmentation", num_inference_steps=2, guidance_scale=2.0, max_sequence_length=16)
    out = pipe(["a cube", "a sphere"], video=videos, generator=torch.Generator().manual_seed(0), **kw)
    with torch.no_grad():
        rec = to_uint8(pipe.vae.decode(pipe.vae.encode(to_model_input(videos)).latent_dist.mode()).sample)
    assert out.videos.shape == out.colormaps.shape == videos.shape and out.dense.shape == videos.shape[:4]
    for i in range(2):
        assert np.abs(out.videos[i].astype(int) - rec[i].astype(int)).max() <= 1
    assert np.abs(out.videos[0].astype(int) - rec[1].astype(int)).max() > 1  # not one video for both
    with pytest.raises(ValueError, match="one per prompt"):
        pipe(["a", "b", "c"], video=videos, generator=torch.Generator().manual_seed(0), **kw)


@pytest.mark.parametrize("given_rgb", ["noised", "clean"])
def test_pipeline_given_rgb_is_what_the_transformer_sees(tmp_path, tiny_pipeline, given_rgb):
    """video= with given_rgb="clean" (a model trained with train.rgb_given_prob): every step's RGB
    half is the video's clean latent, the first step's too; "noised" gives it noised to each step's
    level, never clean before the end. The setting is saved with the pipeline."""
    from udpdiff.models.transformer import LATENT_CHANNELS as C
    from udpdiff.models.vae import to_model_input

    pipe = tiny_pipeline(given_rgb=given_rgb)
    pipe.save_pretrained(tmp_path)
    pipe = UDPDiffPipeline.from_pretrained(tmp_path)
    assert pipe.config.given_rgb == given_rgb
    pipe.set_progress_bar_config(disable=True)
    video = np.random.default_rng(0).integers(0, 255, (9, 32, 32, 3), dtype=np.uint8)
    with torch.no_grad():
        clean = pipe.vae.encode(to_model_input(video[None])).latent_dist.mode() * pipe.vae_scaling_factor_image
    clean = clean.permute(0, 2, 1, 3, 4)
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["hidden_states"][:, :, :C].clone()), with_kwargs=True)
    pipe("a cube", task="depth", video=video, num_inference_steps=3, guidance_scale=2.0,
         generator=torch.Generator().manual_seed(0), max_sequence_length=16)
    hook.remove()
    assert len(seen) == 3
    for rgb in seen:  # (2, F, C, h, w): the CFG pair, both with the same RGB half
        matches = torch.allclose(rgb, clean.expand_as(rgb), atol=1e-5)
        assert matches == (given_rgb == "clean")
    with pytest.raises(ValueError, match="given_rgb must be one of"):
        tiny_pipeline(given_rgb="sometimes")


@pytest.mark.parametrize("conditioning, tokenizer", [("text-prompt", "byt5"), ("embedding", "words")])
def test_pipeline_save_and_load_round_trip(tmp_path, tiny_pipeline, conditioning, tokenizer):
    pipe = tiny_pipeline(conditioning, tokenizer=tokenizer)
    pipe.save_pretrained(tmp_path)
    loaded = UDPDiffPipeline.from_pretrained(tmp_path)
    assert loaded.config.task_conditioning == conditioning
    assert loaded.tokenizer.get_vocab() == pipe.tokenizer.get_vocab()
    kw = dict(num_frames=9, height=32, width=32, num_inference_steps=2, guidance_scale=1.5, max_sequence_length=16)
    for p in (pipe, loaded):
        p.set_progress_bar_config(disable=True)
    a = pipe("a red cube slides", task="depth", generator=torch.Generator().manual_seed(0), **kw)
    b = loaded("a red cube slides", task="depth", generator=torch.Generator().manual_seed(0), **kw)
    assert np.array_equal(a.videos, b.videos) and np.array_equal(a.colormaps, b.colormaps)


# -- the RGB-only baseline (the paper's fine-tuned "CogVideoX" rows) -----------------------------------
def test_rgb_only_baseline_is_the_stock_model():
    from udpdiff.models.transformer import rgb_only

    stock = _stock(rotary=False)
    ours = rgb_only(stock).eval()
    assert ours.config.in_channels == ours.config.out_channels == 16 and ours.task_embedding is None
    x, text, t = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(ours(x, text, t).sample, stock(x, text, t).sample, atol=0, rtol=0)
    fresh = load_transformer({"config": TINY}, num_tasks=2, seed=0, dense=False)
    assert fresh.config.in_channels == 16 and fresh.config.num_tasks == 0


def _rgb_only_pipeline(tiny_pipeline) -> UDPDiffPipeline:
    dense = tiny_pipeline("none")
    torch.manual_seed(0)
    transformer = UDPDiffTransformer3DModel(**TINY, in_channels=16, out_channels=16, num_tasks=0).eval()
    return UDPDiffPipeline(tokenizer=dense.tokenizer, text_encoder=dense.text_encoder, vae=dense.vae,
                           transformer=transformer, scheduler=dense.scheduler, task_conditioning="none")


def test_rgb_only_pipeline_generates_what_stock_cogvideox_generates(tiny_pipeline):
    from diffusers import CogVideoXPipeline

    pipe = _rgb_only_pipeline(tiny_pipeline)
    pipe.set_progress_bar_config(disable=True)
    call = dict(num_frames=9, height=32, width=32, num_inference_steps=3, guidance_scale=2.0, max_sequence_length=16)
    out = pipe("a red sphere", task=None, generator=torch.Generator().manual_seed(0), **call)
    assert out.videos.shape == (1, 9, 32, 32, 3) and out.colormaps is None and out.dense is None
    stock = CogVideoXPipeline(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=pipe.vae,
                              transformer=pipe.transformer, scheduler=pipe.scheduler)
    stock.set_progress_bar_config(disable=True)
    ref = stock("a red sphere", generator=torch.Generator().manual_seed(0), output_type="np", **call).frames[0]
    assert np.abs(out.videos[0].astype(int) - np.round(ref * 255).astype(int)).max() <= 1


def test_rgb_only_and_dense_pipelines_reject_the_wrong_task(tiny_pipeline):
    with pytest.raises(ValueError, match="RGB-only"):
        _rgb_only_pipeline(tiny_pipeline)("a red sphere", task="depth", num_frames=9, height=32, width=32,
                                          num_inference_steps=1)
    with pytest.raises(ValueError, match="task is required"):
        tiny_pipeline()("a red sphere", task=None, num_frames=9, height=32, width=32, num_inference_steps=1)
    with pytest.raises(ValueError, match="task_conditioning='none'"):
        UDPDiffPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=None, task_conditioning="embedding",
                        transformer=UDPDiffTransformer3DModel(**TINY, in_channels=16, out_channels=16, num_tasks=0))


class _Scale(torch.nn.Module):
    def __init__(self, k):
        super().__init__()
        self.k = k

    def forward(self, x):
        return self.k * x


class _LinearX0Transformer(torch.nn.Module):
    """A stand-in transformer whose x0 estimate is known in closed form: RGB x0 = k · z_dense, dense
    x0 = 0, returned in the scheduler's parameterisation, so the guidance gradient is analytic."""

    def __init__(self, alphas, prediction_type, k=0.7):
        super().__init__()
        self.alphas, self.prediction_type, self.k = alphas, prediction_type, k
        self.block = _Scale(k)  # compiled on its own in the test, as acceleration.compile_blocks compiles blocks

    def forward(self, hidden_states, timestep, encoder_hidden_states=None, return_dict=False):
        from udpdiff.models.transformer import LATENT_CHANNELS as C

        a = self.alphas[timestep.long()].view(-1, 1, 1, 1, 1)
        x0 = torch.cat([self.block(hidden_states[:, :, C:]), torch.zeros_like(hidden_states[:, :, C:])], dim=2)
        if self.prediction_type == "v_prediction":
            return ((a.sqrt() * hidden_states - x0) / (1 - a).sqrt(),)
        return ((hidden_states - a.sqrt() * x0) / (1 - a).sqrt(),)


@pytest.mark.parametrize("prediction_type", ["v_prediction", "epsilon"])
def test_reconstruction_guidance_moves_dense_x0_by_ho_et_al_formula(prediction_type):
    """Ho et al. 2022 eq. (7): x̃_dense = x̂_dense − (w α_t / 2) ∇_{z_dense} ||x_rgb − x̂_rgb||². With
    x̂_rgb = k z_dense the gradient is 2k(k z_dense − x_rgb); the RGB half of the output is untouched."""
    from diffusers.hooks import HookRegistry

    from udpdiff.models.transformer import LATENT_CHANNELS as C
    from udpdiff.pipeline import ReconstructionGuidanceHook

    g = torch.Generator().manual_seed(0)
    alphas = torch.linspace(0.99, 0.01, 1000, dtype=torch.float64).float()
    model = _LinearX0Transformer(alphas, prediction_type)
    z = torch.randn(4, 3, 2 * C, 2, 2, generator=g)  # a CFG pair of 2 prompts
    clean = torch.randn(2, 3, C, 2, 2, generator=g)
    t = torch.tensor([400, 400, 650, 650])
    model.block.compile(backend="eager", fullgraph=True)
    (plain,) = model(hidden_states=z, timestep=t)
    w = 1.5
    HookRegistry.check_if_exists_or_initialize(model).register_hook(
        ReconstructionGuidanceHook(clean, w, alphas, prediction_type), "guidance")
    with torch._dynamo.config.patch(error_on_recompile=True):  # the guided pass runs eager: no new graph
        (guided,) = model(hidden_states=z, timestep=t)

    a = alphas[t].view(-1, 1, 1, 1, 1)
    if prediction_type == "v_prediction":
        x0 = a.sqrt() * z - (1 - a).sqrt() * guided
    else:
        x0 = (z - (1 - a).sqrt() * guided) / a.sqrt()
    k, clean2 = model.k, clean.repeat(2, 1, 1, 1, 1)
    expected_dense = -w * a.sqrt() / 2 * 2 * k * (k * z[:, :, C:] - clean2)
    torch.testing.assert_close(x0[:, :, C:], expected_dense, rtol=1e-4, atol=1e-5)
    assert torch.equal(guided[:, :, :C], plain[:, :, :C])
    assert not torch.allclose(guided[:, :, C:], plain[:, :, C:])


def test_pipeline_reconstruction_guidance_changes_only_the_dense_half(tiny_pipeline):
    """Guided dense prediction keeps the given video, changes the prediction, leaves nothing hooked
    behind (the next unguided call equals the first) and refuses settings it cannot serve."""
    pipe = tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    video = np.random.default_rng(0).integers(0, 255, (9, 32, 32, 3), dtype=np.uint8)
    kw = dict(task="depth", num_inference_steps=3, guidance_scale=2.0, max_sequence_length=16)

    def run(**extra):
        return pipe("a cube", video=video, generator=torch.Generator().manual_seed(0), **kw, **extra)

    plain = run()
    guided = run(reconstruction_guidance=50.0)
    again = run()
    assert np.array_equal(plain.colormaps, again.colormaps)
    assert np.abs(guided.videos.astype(int) - plain.videos.astype(int)).max() <= 1  # the given video either way
    assert not np.array_equal(guided.colormaps, plain.colormaps)
    with pytest.raises(ValueError, match="pass video="):
        pipe("a cube", reconstruction_guidance=1.0, generator=torch.Generator().manual_seed(0), **kw)
    with pytest.raises(ValueError, match=">= 0"):
        run(reconstruction_guidance=-1.0)
    clean_given = tiny_pipeline(given_rgb="clean")
    with pytest.raises(ValueError, match="given_rgb='noised'"):
        clean_given("a cube", video=video, reconstruction_guidance=1.0, **kw)
    assert clean_given._rgb_start is None  # refused before the given video was set up for the next call


def test_ensemble_depth_video_aligns_members_and_cancels_their_noise():
    """Members that are one map in other scales and shifts fuse to that map, without uncertainty, at the
    members' own level; members with independent errors fuse to a map nearer the truth than any one of
    them (scored as the evaluation scores: after one least-squares scale and shift per video), at their
    shared scale and shift, not stretched to [0, 1] as Marigold's relative depth is."""
    from udpdiff.pipeline import ensemble_depth_video

    rng = np.random.default_rng(0)
    truth = np.clip(np.cumsum(rng.normal(size=(5, 16, 16)), axis=1) / 8 + 0.5, 0, 1).astype(np.float32)
    truth = (truth - truth.min()) / (truth.max() - truth.min())
    affine = np.stack([truth * s + t for s, t in [(1.0, 0.0), (0.5, 0.2), (0.8, 0.1), (0.3, 0.6)]])
    fused, spread = ensemble_depth_video(affine)
    assert fused.shape == spread.shape == truth.shape and 0 <= fused.min() and fused.max() <= 1
    level = np.median(affine, axis=0)
    assert np.corrcoef(fused.ravel(), truth.ravel())[0, 1] > 0.9999 and spread.max() < 0.02
    # the median of differently scaled members is only nearly affine in the map: its least-squares image
    assert abs(fused.mean() - level.mean()) < 0.03 and abs(fused.std() / level.std() - 1) < 0.05
    assert fused.max() - fused.min() < 0.85  # not stretched to [0, 1]: the members span 0.15..0.9
    same = ensemble_depth_video(np.stack([truth * 0.5 + 0.3] * 3))[0]
    assert np.abs(same - (truth * 0.5 + 0.3)).max() < 1e-3  # members that agree are their ensemble

    def fit_error(pred: np.ndarray) -> float:
        a = np.stack([pred.ravel(), np.ones(pred.size)], axis=1)
        coef, *_ = np.linalg.lstsq(a, truth.ravel(), rcond=None)
        return float(np.sqrt(np.mean((a @ coef - truth.ravel()) ** 2)))

    noisy = np.clip(truth + rng.normal(0, 0.1, (7, *truth.shape)), 0, 1).astype(np.float32) * 0.6 + 0.2
    fused, spread = ensemble_depth_video(noisy)
    assert fit_error(fused) < 0.6 * min(fit_error(m) for m in noisy)
    assert 0.02 < float(np.median(spread)) < 0.1  # the members' disagreement (noise 0.1 * 0.6), in their units
    assert np.abs(fused - (truth * 0.6 + 0.2)).mean() < 0.03  # at the members' scale and shift


def test_ensemble_segmentation_video_matches_the_members_entities_and_votes():
    """Members that name the same entities differently fuse to those entities; members each wrong on their
    own pixels fuse to the truth, even when the first member (the reference) has a wrong layout; the
    disagreement is the share of members outvoted at each pixel."""
    from udpdiff.evaluation.segmentation import hungarian_miou
    from udpdiff.pipeline import ensemble_segmentation_video

    rng = np.random.default_rng(0)
    truth = np.zeros((4, 24, 24), np.int32)
    truth[:, 2:10, 2:10], truth[:, 12:22, 4:12], truth[:, 6:18, 14:22] = 1, 2, 3

    def renamed(ids: np.ndarray, names: list[int]) -> np.ndarray:
        return np.asarray([0, *names], np.int32)[ids]

    fused, disagreement = ensemble_segmentation_video(np.stack([renamed(truth, [5, 9, 2]), renamed(truth, [1, 2, 3]),
                                                                renamed(truth, [7, 4, 8])]))
    assert hungarian_miou(fused, truth)["miou"] == 1.0 and sorted(np.unique(fused)) == [0, 1, 2, 3]
    assert disagreement.max() == 0

    members = []
    for _ in range(5):
        member = renamed(truth, list(rng.permutation([3, 6, 11])))
        wrong = rng.random(truth.shape) < 0.2  # each member wrong on its own fifth of the pixels
        member[wrong] = rng.integers(0, 12, wrong.sum())
        members.append(member)
    members[0][:, :, :12] = 0  # the first member misses half the scene
    fused, disagreement = ensemble_segmentation_video(np.stack(members))
    assert hungarian_miou(fused, truth)["miou"] > 0.95 > max(hungarian_miou(m, truth)["miou"] for m in members)
    assert 0.1 < float(disagreement.mean()) < 0.4 and disagreement.dtype == np.float32
    single, none = ensemble_segmentation_video(members[1][None])
    assert hungarian_miou(single, members[1])["miou"] == 1.0 and none.max() == 0  # one member is itself


def _generators(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_a_videos_replacement_noise_comes_from_its_own_generator(tiny_pipeline):
    """With the RGB half given noised (the replacement sampler), each video's noise at every step comes
    from its own generator: a video predicted in a batch, or as an ensemble's first member, is the
    prediction a call of its own with that generator makes (the validation during training batches
    its clips; the evaluation's one sample is an ensemble's first member)."""
    pipe = tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    videos = np.random.default_rng(4).integers(0, 255, (2, 9, 32, 32, 3), dtype=np.uint8)
    kw = dict(task="depth", num_inference_steps=4, guidance_scale=1.0, max_sequence_length=16)

    alone = pipe("a sphere", video=videos[1], generator=_generators(1)[0], **kw).colormaps[0].astype(int)
    batched = pipe(["a cube", "a sphere"], video=videos, generator=_generators(0, 1), **kw).colormaps[1]
    first = pipe("a sphere", video=videos[1], ensemble_size=2, generator=_generators(1, 5), **kw).member_colormaps[0, 0]
    assert np.abs(batched.astype(int) - alone).mean() < 0.5
    assert np.abs(first.astype(int) - alone).mean() < 0.5


def test_pipeline_ensembles_dense_predictions_of_a_given_video(tiny_pipeline):
    """ensemble_size=N: N members per video from N generators, the first one the prediction a single call
    with that generator makes; their ensemble and its uncertainty, for depth and segmentation; refused where
    it means nothing."""
    from udpdiff import pixelplanes
    from udpdiff.pipeline import ensemble_depth_video, ensemble_segmentation_video

    pipe = tiny_pipeline(given_rgb="clean")
    pipe.set_progress_bar_config(disable=True)
    videos = np.random.default_rng(2).integers(0, 255, (2, 9, 32, 32, 3), dtype=np.uint8)
    kw = dict(task="depth", num_inference_steps=2, guidance_scale=1.0, max_sequence_length=16)

    out = pipe(["a cube", "a sphere"], video=videos, ensemble_size=3, generator=_generators(0, 1, 2, 3, 4, 5), **kw)
    assert out.members.shape == (2, 3, 9, 32, 32) and out.dense.shape == out.uncertainty.shape == (2, 9, 32, 32)
    assert out.videos.shape == out.colormaps.shape == videos.shape
    single = pipe("a sphere", video=videos[1], generator=_generators(3)[0], **kw)
    assert np.abs(out.members[1, 0] - single.dense[0]).mean() < 0.01  # member 0 of video 1: generator 3
    # the model's own colormap of each member (what a decode tolerance acts on), not the re-encoded fusion
    assert out.member_colormaps.shape == (2, 3, *videos.shape[1:])
    assert np.abs(out.member_colormaps[1, 0].astype(int) - single.colormaps[0]).mean() < 1
    assert np.array_equal(pixelplanes.decode_depth(out.member_colormaps[0, 2]), out.members[0, 2])
    assert np.abs(out.members[1, 0] - out.members[1, 1]).mean() > 0.01  # the seeds differ
    fused, spread = ensemble_depth_video(out.members[1])
    assert np.allclose(out.dense[1], fused) and np.allclose(out.uncertainty[1], spread)
    assert np.array_equal(out.colormaps, pixelplanes.encode_depth(out.dense))  # the picture shows the ensemble
    with pytest.raises(ValueError, match="needs a dense task and video="):
        pipe("a cube", ensemble_size=2, num_frames=9, height=32, width=32, **kw)
    # segmentation: the members' entities voted, the picture the ensemble's
    seg = pipe(["a cube", "a sphere"], video=videos, ensemble_size=3, generator=_generators(0, 1, 2, 3, 4, 5),
               **{**kw, "task": "segmentation"})
    assert seg.members.shape == (2, 3, 9, 32, 32) and seg.dense.shape == seg.uncertainty.shape == (2, 9, 32, 32)
    fused, disagreement = ensemble_segmentation_video(seg.members[0])
    assert np.array_equal(seg.dense[0], fused) and np.array_equal(seg.uncertainty[0], disagreement)
    for colormap, ids in zip(seg.colormaps, seg.dense, strict=True):
        assert np.array_equal(colormap, pixelplanes.encode_segmentation(ids)[0])
    with pytest.raises(ValueError, match="takes 6 generators"):
        pipe(["a cube", "a sphere"], video=videos, ensemble_size=3, generator=_generators(0, 1), **kw)
