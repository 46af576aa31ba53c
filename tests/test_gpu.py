"""GPU-only checks (marker `gpu`; skipped without CUDA): the same code paths as on the CPU, on a
CUDA device — bf16 channel expansion against stock diffusers, the pipeline, DeepSpeed
training with NCCL including exact resume, and the fast path (blocks compiled by Inductor, the
batched VAE decode) against eager."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_duplicate_preserving_matches_stock_in_bf16_on_gpu():
    from diffusers import CogVideoXTransformer3DModel

    from udpdiff.models.transformer import from_cogvideox

    cfg = dict(num_attention_heads=4, attention_head_dim=32, time_embed_dim=64, text_embed_dim=64, num_layers=2,
               sample_width=16, sample_height=16, sample_frames=9, patch_size=2, max_text_seq_length=16)
    torch.manual_seed(0)
    stock = CogVideoXTransformer3DModel(**cfg).eval()
    ours = from_cogvideox(stock, channel_expansion="duplicate-preserving").eval()
    stock, ours = stock.to("cuda", torch.bfloat16), ours.to("cuda", torch.bfloat16)
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(2, 3, 16, 16, 16, generator=g, device="cuda", dtype=torch.bfloat16)
    text = torch.randn(2, 16, 64, generator=g, device="cuda", dtype=torch.bfloat16)
    t = torch.tensor([999, 10], device="cuda")
    with torch.no_grad():
        ref = stock(x, text, t).sample.float()
        out = ours(torch.cat([x, x], 2), text, t, task_id=torch.tensor([0, 1], device="cuda")).sample.float()
    rel = lambda a: float((a - ref).norm() / ref.norm())  # noqa: E731
    # halving the duplicated input weights rounds differently in bf16: allow bf16-level error
    assert rel(out[:, :, :16]) < 2e-2 and rel(out[:, :, 16:]) < 2e-2


def test_pipeline_runs_on_gpu(tiny_pipeline):

    pipe = tiny_pipeline().to("cuda")
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a red sphere", task="segmentation", num_frames=9, height=32, width=32, num_inference_steps=2,
               guidance_scale=2.0, generator=torch.Generator(device="cuda").manual_seed(0), max_sequence_length=16)
    assert out.videos.shape == (1, 9, 32, 32, 3) and out.dense.shape == (1, 9, 32, 32)


@pytest.mark.parametrize("config", ["zero2.json", "zero3.json", "zero2-offload.json"])
def test_deepspeed_training_resumes_exactly_on_gpu(tmp_path, config):
    from tests.conftest import DEEPSPEED_DIR, TRAIN_CLIPS, random_latent_cache, tiny_train_params, train_tiny
    from udpdiff.train import latest_checkpoint, load_deepspeed_config, run_fingerprint

    p = tiny_train_params(tmp_path)
    ds = load_deepspeed_config(DEEPSPEED_DIR / config, p)
    latents = random_latent_cache(tmp_path)
    _, full = train_tiny(p, latents, tmp_path / "full", ds_config=ds)
    _, part = train_tiny(p, latents, tmp_path / "split", max_steps_this_run=3, ds_config=ds)
    assert latest_checkpoint(tmp_path / "split" / run_fingerprint(p, ds))[1] == 2
    model, resumed = train_tiny(p, latents, tmp_path / "split", ds_config=ds)
    assert next(model.parameters()).is_cuda and len(TRAIN_CLIPS) == 6
    assert resumed.resumed_from == 2
    # same batches; GPU kernels may differ in the last bits between runs
    assert [h["loss"] for h in resumed.history] == pytest.approx([h["loss"] for h in full.history], rel=1e-4)


def test_a_batch_reaches_the_gpu_without_a_host_synchronisation_and_as_on_the_cpu(tmp_path):
    """make_batch on CUDA (in the prefetch worker, beside training): no copy or op that waits for the
    GPU, which would drain the training's kernel queue (~200 times a `small` step before), and the
    numbers the CPU computes from the same draws."""
    from tests.conftest import TRAIN_CLIPS, random_latent_cache, tiny_train_params
    from udpdiff.latents import LatentDataset
    from udpdiff.models.scheduler import build_scheduler
    from udpdiff.train import make_batch

    p = tiny_train_params(tmp_path, micro_batch_size=6, rgb_given_prob=0.5)
    data = LatentDataset(random_latent_cache(tmp_path), TRAIN_CLIPS)
    alphas = build_scheduler({}).alphas_cumprod
    make_batch(data, p, 0, 0, 0.7, alphas, device="cuda")  # CUDA context and pinned pool set up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        on_gpu = make_batch(data, p, 1, 0, 0.7, alphas, device="cuda")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    on_cpu = make_batch(data, p, 1, 0, 0.7, alphas)
    assert on_gpu.keys() == on_cpu.keys() and on_gpu["loss_weight"].min() == 0
    for k, v in on_cpu.items():
        assert on_gpu[k].dtype == v.dtype, k
        torch.testing.assert_close(on_gpu[k].cpu(), v, rtol=1e-6, atol=1e-6, msg=k)


def test_batches_built_ahead_train_as_batches_built_in_turn_on_gpu(tmp_path):
    """On CUDA each batch is built in a worker thread while the previous one trains (the default):
    the same batches, so the same losses as building them in turn."""
    from tests.conftest import random_latent_cache, tiny_train_params, train_tiny

    p = tiny_train_params(tmp_path, gradient_accumulation_steps=2, rgb_given_prob=0.5)
    latents = random_latent_cache(tmp_path)
    _, in_turn = train_tiny(p, latents, tmp_path / "a", prefetch=False)
    _, ahead = train_tiny(p, latents, tmp_path / "b")
    assert [h["loss"] for h in ahead.history] == pytest.approx([h["loss"] for h in in_turn.history], rel=1e-4)


@pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="needs torchao (the lowbit extra)")
def test_8bit_states_on_bf16_weights_train_and_resume_on_gpu(tmp_path):
    """train.optimizer: adamw8bit, master_weights: bf16 on CUDA, where torchao compiles its update and
    the stochastic rounding draws from the CUDA generator: 8-bit moments on the GPU, and a killed run
    resumes with the same losses and weights (the rounding is seeded per update)."""
    from tests.conftest import DEEPSPEED_DIR, random_latent_cache, tiny_train_params, train_tiny

    p = tiny_train_params(tmp_path, optimizer="adamw8bit", master_weights="bf16", precision="bf16",
                          deepspeed_config=str(DEEPSPEED_DIR / "zero0.json"))
    latents = random_latent_cache(tmp_path)
    model, full = train_tiny(p, latents, tmp_path / "full")
    assert next(model.parameters()).is_cuda and {q.dtype for q in model.parameters()} == {torch.bfloat16}
    saved = torch.load(next((full.run_dir / "step-00000006").glob("*model_states.pt")), weights_only=False)
    codes = [s["exp_avg"]["tensors"]["codes"] for s in saved["optimizer"]["state"].values()
             if isinstance(s["exp_avg"], dict)]
    assert codes and all(c.dtype == torch.uint8 and c.is_cuda for c in codes)
    train_tiny(p, latents, tmp_path / "split", max_steps_this_run=3)
    resumed_model, resumed = train_tiny(p, latents, tmp_path / "split")
    assert resumed.resumed_from == 2
    assert [h["loss"] for h in resumed.history] == pytest.approx([h["loss"] for h in full.history], rel=1e-4)
    differing = [n for (n, a), b in zip(model.state_dict().items(), resumed_model.state_dict().values(), strict=True)
                 if not torch.equal(a, b)]
    assert not differing, differing


# -- the fast path (udpdiff.acceleration) against eager ---------------------------------------------
def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _step_model_and_inputs(rotary: bool):
    """A 3-block model with CogVideoX's head size (64) in bf16 on CUDA, and one CFG-batch-2 step's inputs."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    from udpdiff.models.transformer import UDPDiffTransformer3DModel

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = UDPDiffTransformer3DModel(num_attention_heads=4, attention_head_dim=64, time_embed_dim=64,
                                      text_embed_dim=64, num_layers=3, sample_width=16, sample_height=16,
                                      sample_frames=9, patch_size=2, max_text_seq_length=16,
                                      use_rotary_positional_embeddings=rotary, num_tasks=2)
    torch.nn.init.normal_(model.task_embedding.weight, std=0.5)
    model = model.to("cuda", torch.bfloat16).eval()
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(2, 3, 32, 16, 16, generator=g, device="cuda", dtype=torch.bfloat16)
    text = torch.randn(2, 16, 64, generator=g, device="cuda", dtype=torch.bfloat16)
    t = torch.tensor([999, 10], device="cuda")
    kw = {"image_rotary_emb": get_3d_rotary_pos_embed(64, ((0, 0), (8, 8)), (8, 8), 3, device="cuda")} if rotary \
        else {}
    return model, (x, text, t), kw


@pytest.mark.parametrize("rotary", [False, True])
def test_compiled_blocks_step_equals_eager_in_bf16_on_gpu(rotary):
    """One denoising step (CFG batch 2, real head size 64) with Inductor-compiled blocks against
    eager, same weights and inputs: equal within bf16 rounding."""
    from udpdiff.acceleration import accelerate, compiled_blocks
    from udpdiff.config import AccelerationParams

    model, (x, text, t), kw = _step_model_and_inputs(rotary)
    with torch.no_grad():
        ref = model(x, text, t, task_id=1, **kw).sample
        assert accelerate(model, AccelerationParams(), "cuda").compiled_blocks  # auto: on for CUDA
        assert compiled_blocks(model)
        out = model(x, text, t, task_id=1, **kw).sample
        again = model(x, text, t, task_id=1, **kw).sample
    assert torch.equal(out, again)  # the compiled step is deterministic
    assert _rel(out, ref) < 2e-2, _rel(out, ref)  # bf16 rounding, as the expansion test above allows


@pytest.mark.parametrize("compile_blocks", [False, True])
def test_flash_attention3_step_equals_sdpa_in_bf16_on_gpu(compile_blocks):
    """One rotary denoising step with FA3's forward kernel in every attention layer (udpdiff.attention)
    against SDPA, eager and with compiled blocks: equal within bf16 rounding, and FA3 really ran."""
    from udpdiff.acceleration import accelerate, use_attention
    from udpdiff.attention import FlashAttention3CogVideoXProcessor, flash_attention3_available
    from udpdiff.config import AccelerationParams

    if not flash_attention3_available():
        pytest.skip("needs the fa3-fwd wheel and a Hopper GPU")
    model, (x, text, t), kw = _step_model_and_inputs(rotary=True)
    with torch.no_grad():
        ref = model(x, text, t, task_id=1, **kw).sample
        assert use_attention(model, AccelerationParams(attention="auto")) == "fa3"
        assert all(isinstance(p, FlashAttention3CogVideoXProcessor) for p in model.attn_processors.values())
        if compile_blocks:
            assert accelerate(model, AccelerationParams(), "cuda").compiled_blocks
        calls = []
        mode = next(iter(model.attn_processors.values())).mode
        real = mode.flash_attn_func
        mode.flash_attn_func = lambda *a, **k: calls.append(1) or real(*a, **k)
        out = model(x, text, t, task_id=1, **kw).sample
    assert calls, "FA3 was not called"
    assert _rel(out, ref) < 2e-2, _rel(out, ref)


def test_float8_attention_step_stays_close_to_sdpa_on_gpu():
    """FA3's e4m3 kernel (acceleration.approximate.float8_attention) in every attention layer, compiled
    blocks: it really ran on float8 inputs, and one rotary step stays close to bf16 SDPA's."""
    from udpdiff.acceleration import accelerate, use_attention
    from udpdiff.attention import flash_attention3_available
    from udpdiff.config import AccelerationParams

    if not flash_attention3_available():
        pytest.skip("needs the fa3-fwd wheel and a Hopper GPU")
    model, (x, text, t), kw = _step_model_and_inputs(rotary=True)
    settings = AccelerationParams.model_validate({"approximate": {"float8_attention": True}})
    with torch.no_grad():
        ref = model(x, text, t, task_id=1, **kw).sample
        assert use_attention(model, settings) == "fa3-fp8"
        assert accelerate(model, settings, "cuda").compiled_blocks
        dtypes = []
        mode = next(iter(model.attn_processors.values())).mode
        real = mode.flash_attn_func
        mode.flash_attn_func = lambda q, *a, **k: dtypes.append(q.dtype) or real(q, *a, **k)
        out = model(x, text, t, task_id=1, **kw).sample
    assert dtypes and set(dtypes) == {torch.float8_e4m3fn}
    assert 0 < _rel(out, ref) < 5e-2, _rel(out, ref)


def test_fast_sample_equals_eager_on_gpu(tiny_pipeline):
    """A short bf16 sample: compiled blocks + one batched VAE decode against eager blocks + two
    sequential decodes, same seed: the final latents and the decoded frames agree within bf16
    rounding (carried through the denoising steps)."""
    from udpdiff.acceleration import accelerate_pipeline
    from udpdiff.config import AccelerationParams

    torch._dynamo.reset()
    outs, latents = {}, {}
    for name, settings in (("eager", AccelerationParams(compile_blocks=False, vae_decode="sequential")),
                           ("fast", AccelerationParams(compile_blocks="auto", vae_decode="batched"))):
        pipe = tiny_pipeline()
        torch.nn.init.normal_(pipe.transformer.task_embedding.weight, std=0.5)
        pipe = pipe.to("cuda", torch.bfloat16)
        pipe.set_progress_bar_config(disable=True)
        assert accelerate_pipeline(pipe, settings).compiled_blocks == (name == "fast")

        def keep(pipe, i, t, tensors, name=name):
            latents[name] = tensors["latents"].float().clone()
            return {}

        outs[name] = pipe("a red sphere", task="depth", num_frames=9, height=32, width=32, num_inference_steps=4,
                          guidance_scale=2.0, generator=torch.Generator(device="cuda").manual_seed(0),
                          max_sequence_length=16, callback_on_step_end=keep,
                          callback_on_step_end_tensor_inputs=["latents"])
    assert _rel(latents["fast"], latents["eager"]) < 3e-2, _rel(latents["fast"], latents["eager"])
    for key in ("videos", "colormaps"):
        diff = np.abs(getattr(outs["fast"], key).astype(int) - getattr(outs["eager"], key).astype(int))
        assert diff.mean() < 1.5, (key, diff.mean(), diff.max())
    assert np.abs(outs["fast"].dense - outs["eager"].dense).mean() < 0.02


def test_batched_decode_equals_two_decodes_on_gpu(tiny_pipeline):

    pipe = tiny_pipeline().to("cuda", torch.bfloat16)
    latents = torch.randn(1, 3, 32, 8, 8, generator=torch.Generator(device="cuda").manual_seed(3), device="cuda",
                          dtype=torch.bfloat16)
    with torch.no_grad():
        separate = [pipe._decode(latents[:, :, :16]), pipe._decode(latents[:, :, 16:])]
        batched = pipe._decode_halves(latents)
    for got, want in zip(batched, separate, strict=True):
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 2  # bf16 kernels may differ per batch size


def test_training_with_compiled_blocks_matches_eager_and_resumes_exactly_on_gpu(tmp_path):
    """DeepSpeed ZeRO-2 with gradient checkpointing, a few dozen steps: Inductor-compiled blocks
    give eager's losses within float rounding, and an interrupted compiled run resumes exactly."""
    from tests.conftest import DEEPSPEED_DIR, random_latent_cache, tiny_train_params, train_tiny
    from udpdiff.acceleration import compiled_blocks
    from udpdiff.train import latest_checkpoint, load_deepspeed_config, run_fingerprint

    torch._dynamo.reset()
    eager = tiny_train_params(tmp_path, gradient_checkpointing=True, steps=24, checkpoint_every=8)
    fast = eager.with_overrides({"acceleration.compile_blocks": True})
    ds = load_deepspeed_config(DEEPSPEED_DIR / "zero2.json", eager)
    latents = random_latent_cache(tmp_path)
    _, ref = train_tiny(eager, latents, tmp_path / "eager", ds_config=ds)
    model, full = train_tiny(fast, latents, tmp_path / "fast", ds_config=ds)
    assert compiled_blocks(model) and len(full.history) == 24
    losses = [h["loss"] for h in full.history]
    assert losses == pytest.approx([h["loss"] for h in ref.history], rel=1e-3)
    train_tiny(fast, latents, tmp_path / "split", max_steps_this_run=13, ds_config=ds)
    assert latest_checkpoint(tmp_path / "split" / run_fingerprint(fast, ds))[1] == 8
    _, resumed = train_tiny(fast, latents, tmp_path / "split", ds_config=ds)
    assert resumed.resumed_from == 8
    assert [h["loss"] for h in resumed.history] == pytest.approx(losses, rel=1e-4)


# -- the approximate modes (acceleration.approximate): float8 runs, within a stated tolerance ---------
def _float8_runs_here() -> bool:
    import importlib.util

    return importlib.util.find_spec("torchao") is not None and torch.cuda.get_device_capability() >= (8, 9)


needs_float8 = pytest.mark.skipif(not torch.cuda.is_available() or not _float8_runs_here(),
                                  reason="float8 needs torchao and a GPU of compute capability 8.9+")


@needs_float8
@pytest.mark.parametrize("float8", ["rowwise", "tensorwise"])
@pytest.mark.parametrize("compile_blocks", [False, True])
def test_float8_step_matches_bf16_within_tolerance_on_gpu(compile_blocks, float8):
    """One rotary CFG-2 step with the blocks' linears in float8 (torchao, rowwise or tensorwise
    dynamic activation + weight), eager and with Inductor-compiled blocks, against bf16: relative L2
    under 0.1 (e4m3 keeps 3 mantissa bits: a few % per linear layer, through 3 blocks), and only
    block linears are quantised."""
    from udpdiff.acceleration import accelerate, use_float8
    from udpdiff.config import AccelerationParams

    model, (x, text, t), kw = _step_model_and_inputs(rotary=True)
    with torch.no_grad():
        ref = model(x, text, t, task_id=1, **kw).sample
        use_float8(model, float8)
        assert accelerate(model, AccelerationParams(compile_blocks=compile_blocks), "cuda").compiled_blocks \
            == compile_blocks
        out = model(x, text, t, task_id=1, **kw).sample
    quantised = {n for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and "Float8" in type(m.weight).__name__}
    assert quantised and all(n.startswith("transformer_blocks.") and ".norm" not in n for n in quantised)
    assert "Float8" not in type(model.proj_out.weight).__name__
    assert torch.isfinite(out).all() and 0 < _rel(out, ref) < 0.1, _rel(out, ref)


@needs_float8
def test_float8_and_first_block_cache_sample_on_gpu(tiny_pipeline):
    """A bf16 tiny sample through accelerate_pipeline with float8 + compiled blocks, and with the
    first-block cache beneath compiled blocks: both run, and stay near the lossless sample (mean
    uint8 difference under 8 levels on random weights)."""
    from udpdiff.acceleration import accelerate_pipeline
    from udpdiff.config import AccelerationParams

    kw = dict(num_frames=9, height=32, width=32, num_inference_steps=8, guidance_scale=2.0, max_sequence_length=16)
    outs = {}
    for name, approximate in (("lossless", {}), ("float8", {"float8": "rowwise"}),
                              ("first-block", {"cache": {"type": "first-block", "threshold": 0.5}})):
        torch._dynamo.reset()
        pipe = tiny_pipeline().to("cuda", torch.bfloat16)
        pipe.set_progress_bar_config(disable=True)
        torch.nn.init.normal_(pipe.transformer.task_embedding.weight)
        done = accelerate_pipeline(pipe, AccelerationParams.model_validate(
            {"compile_blocks": True, "approximate": approximate}))
        assert done.compiled_blocks and (done.float8, done.cache) == (approximate.get("float8", "none"),
                                                                      (approximate.get("cache") or {}).get("type"))
        outs[name] = pipe("a red sphere", task="depth", generator=torch.Generator(device="cuda").manual_seed(0), **kw)
    for name in ("float8", "first-block"):
        d = np.abs(outs[name].videos.astype(int) - outs["lossless"].videos.astype(int))
        assert d.mean() < 8, (name, d.mean())
