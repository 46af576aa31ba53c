"""The fast path on the CPU: compiled blocks equal eager (task embedding, gradient checkpointing,
DeepSpeed training and resume included), ``auto`` keeps the CPU path eager, and the batched VAE
decode equals two decodes.

Compiled-block tests use torch.compile's ``aot_eager`` backend: the same graph capture as
Inductor (fullgraph, so any graph break fails; AOTAutograd for the backward) without its C++ code
generation, which would cost CI ~20 s per test on two cores. Inductor itself is checked on CUDA
(tests/test_gpu.py) and by the GPU benchmark.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from udpdiff import acceleration
from udpdiff.acceleration import AccelerationError, accelerate, accelerate_pipeline, compiled_blocks
from udpdiff.config import AccelerationParams
from udpdiff.models.transformer import UDPDiffTransformer3DModel

TINY = dict(num_attention_heads=2, attention_head_dim=16, time_embed_dim=32, text_embed_dim=32, num_layers=2,
            sample_width=8, sample_height=8, sample_frames=9, patch_size=2, max_text_seq_length=16)
ON = AccelerationParams(compile_blocks=True)


# compiled blocks through aot_eager: the same graph capture, no code generation (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("graph_capture_only")


def _model(rotary: bool = False) -> UDPDiffTransformer3DModel:
    torch.manual_seed(0)
    model = UDPDiffTransformer3DModel(**TINY, use_rotary_positional_embeddings=rotary, num_tasks=2)
    torch.nn.init.normal_(model.task_embedding.weight)  # zero at init: make the task matter
    return model


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, 32, 8, 8, generator=g), torch.randn(2, 16, 32, generator=g), torch.tensor([999, 10])


def _rotary(rotary: bool) -> dict:
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    return {"image_rotary_emb": get_3d_rotary_pos_embed(16, ((0, 0), (4, 4)), (4, 4), 3)} if rotary else {}


@pytest.mark.parametrize("rotary", [False, True])
def test_compiled_blocks_equal_eager_and_keep_the_task_embedding(rotary):
    model = _model(rotary).eval()
    x, text, t = _inputs()
    kw = _rotary(rotary)
    with torch.no_grad():
        ref = {tid: model(x, text, t, task_id=tid, **kw).sample for tid in (0, 1)}
    keys = list(model.state_dict())
    done = accelerate(model, ON, "cpu")
    assert done.compiled_blocks and compiled_blocks(model)
    assert list(model.state_dict()) == keys  # checkpoints and exports keep their keys
    with torch.no_grad():
        for tid in (0, 1):
            torch.testing.assert_close(model(x, text, t, task_id=tid, **kw).sample, ref[tid])
        with model.task_context(1):  # the pipeline's way: the hook on time_embedding, outside the blocks
            torch.testing.assert_close(model(x, text, t, **kw).sample, ref[1])
        # per-sample task ids (training batches), CFG-doubled batches
        mixed = model(x, text, t, task_id=torch.tensor([0, 1]), **kw).sample
    torch.testing.assert_close(mixed[0], ref[0][0])
    torch.testing.assert_close(mixed[1], ref[1][1])
    with pytest.raises(ValueError, match="task"):
        model(x, text, t, **kw)
    assert accelerate(model, ON, "cpu").reason == "already compiled"


def test_compiled_blocks_take_more_batch_shapes_than_torchs_default_limit():
    """One process trains, validates and samples at CFG batch 2 and at guidance 1 (batch 1): each a
    static graph of the one shared block code object. At torch's default limit of 8 graphs a
    fullgraph block raised "recompile limit exceeded" mid-sampling (small attempt 8); accelerate
    lifts the limit. Here the limit starts at 2 so that four shapes would pass it."""
    import torch._dynamo

    torch._dynamo.reset()
    model = _model().eval()
    x, text, t = _inputs()
    batches = [tuple(v[:n] if n <= 2 else v[torch.arange(n) % 2] for v in (x, text, t)) for n in (1, 2, 3, 4)]
    with torch._dynamo.config.patch(recompile_limit=2), torch.no_grad():
        ref = [model(*b, task_id=1).sample for b in batches]
        accelerate(model, ON, "cpu")
        for b, r in zip(batches, ref, strict=True):
            torch.testing.assert_close(model(*b, task_id=1).sample, r)
        assert torch._dynamo.config.recompile_limit >= acceleration.STATIC_GRAPHS_PER_BLOCK


def test_compiled_blocks_under_gradient_checkpointing_give_eager_gradients():
    """diffusers' ``_gradient_checkpointing_func(block, ...)`` calls ``block.__call__``: the compiled
    block, recomputed in the backward pass."""
    eager = _model(rotary=True).train()
    eager.enable_gradient_checkpointing()
    fast = copy.deepcopy(eager)
    accelerate(fast, ON, "cpu")
    x, text, t = _inputs()
    kw = _rotary(True)
    losses = {}
    for name, model in (("eager", eager), ("fast", fast)):
        losses[name] = model(x, text, t, task_id=torch.tensor([0, 1]), **kw).sample.pow(2).mean()
        losses[name].backward()
    torch.testing.assert_close(losses["fast"], losses["eager"])
    grads = {n: p.grad for n, p in fast.named_parameters()}
    for name, p in eager.named_parameters():
        assert grads[name] is not None, name
        torch.testing.assert_close(grads[name], p.grad, msg=name)


class _OpCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the aten ops run inside it (here: during the backward pass)."""

    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def _backward_ops(model) -> tuple[dict[str, int], dict[str, torch.Tensor]]:
    x, text, t = _inputs()
    loss = model(x, text, t, task_id=torch.tensor([0, 1]), **_rotary(True)).sample.pow(2).mean()
    with _OpCounter() as ops:
        loss.backward()
    return ops.counts, {n: p.grad for n, p in model.named_parameters()}


def test_selective_checkpointing_recomputes_pointwise_work_not_matmuls():
    """full re-runs every matmul of the blocks in the backward; selective re-runs none of them but
    does recompute the pointwise work (GELU); all three give the same gradients."""
    base = _model(rotary=True).train()
    runs = {}
    for mode in (False, "full", "selective"):
        model = copy.deepcopy(base)
        assert acceleration.checkpoint_activations(model, mode) == {False: "off"}.get(mode, mode)
        runs[mode] = _backward_ops(model)
    off, full, selective = (runs[m][0] for m in (False, "full", "selective"))
    linears_in_blocks = sum(isinstance(m, torch.nn.Linear) for b in base.transformer_blocks for m in b.modules())
    assert full["mm"] + full.get("addmm", 0) == off["mm"] + off.get("addmm", 0) + linears_in_blocks
    assert selective["mm"] + selective.get("addmm", 0) == off["mm"] + off.get("addmm", 0)
    assert off.get("gelu", 0) == 0 and selective["gelu"] == full["gelu"] == len(base.transformer_blocks)
    for mode in ("full", "selective"):
        for name, grad in runs[False][1].items():
            torch.testing.assert_close(runs[mode][1][name], grad,
                                       msg=lambda m, mode=mode, name=name: f"{mode}: {name}: {m}")
    with pytest.raises(AccelerationError, match="selective"):
        acceleration.checkpoint_activations(base, "some")


def test_zero3_linear_breaks_selective_checkpointing(monkeypatch):
    """Why train() refuses selective checkpointing under ZeRO-3: with DeepSpeed's ZeRO-3 linear in
    place of F.linear (as a ZeRO-3 engine leaves it), selective recomputation gives other gradients
    than none while full recomputation agrees. If this fails, DeepSpeed fixed it: lift the refusal."""
    from deepspeed.runtime.zero.linear import zero3_linear_wrap

    monkeypatch.setattr(torch.nn.functional, "linear", zero3_linear_wrap)
    base = _model(rotary=True).train()
    grads = {}
    for mode in (False, "full", "selective"):
        model = copy.deepcopy(base)
        acceleration.checkpoint_activations(model, mode)
        grads[mode] = _backward_ops(model)[1]
    assert all(torch.allclose(grads["full"][k], g, atol=1e-5) for k, g in grads[False].items())
    assert not all(torch.allclose(grads["selective"][k], g, atol=1e-5) for k, g in grads[False].items())


def test_compiled_blocks_under_selective_checkpointing_give_eager_gradients():
    eager = _model(rotary=True).train()
    fast = copy.deepcopy(eager)
    acceleration.checkpoint_activations(fast, "selective")
    accelerate(fast, ON, "cpu")
    _, ref = _backward_ops(eager)
    _, got = _backward_ops(fast)
    for name, grad in ref.items():
        torch.testing.assert_close(got[name], grad, msg=name)


def test_adamw_is_fused_on_cuda_only():
    p = [torch.nn.Parameter(torch.ones(3))]
    assert not acceleration.adamw(p, "cpu", lr=1e-3).defaults["fused"]
    if torch.cuda.is_available():
        assert acceleration.adamw([torch.nn.Parameter(torch.ones(3, device="cuda"))], "cuda").defaults["fused"]


def test_auto_is_eager_on_the_cpu_and_zero3_is_never_compiled():
    model = _model()
    assert not accelerate(model, AccelerationParams(), "cpu").compiled_blocks
    assert not accelerate(model, AccelerationParams(compile_blocks=False), "cuda").compiled_blocks
    assert acceleration.wants_compile("auto", "cuda") and not acceleration.wants_compile("auto", "cpu")
    off = accelerate(model, AccelerationParams(), "cuda", sharded_parameters=True)
    assert not off.compiled_blocks and "ZeRO-3" in off.reason
    with pytest.raises(AccelerationError, match="ZeRO-3"):
        accelerate(model, ON, "cuda", sharded_parameters=True)
    assert not compiled_blocks(model)


def test_acceleration_settings_do_not_change_the_checkpoint_fingerprint(tmp_path):
    """A run resumes across a change of acceleration: its checkpoints hold the same weights."""
    from tests.conftest import tiny_train_params
    from udpdiff.train import run_fingerprint

    p = tiny_train_params(tmp_path)
    q = p.with_overrides({"acceleration.compile_blocks": True, "acceleration.vae_decode": "sequential"})
    assert q.active.acceleration.compile_blocks is True
    assert run_fingerprint(p) == run_fingerprint(q)


# -- the batched VAE decode ----------------------------------------------------------------------------
def test_batched_decode_equals_two_decodes(tiny_pipeline):
    """One VAE call for both halves. The VAE treats samples independently, but the CPU's
    convolution kernels round differently per batch size: equal to float tolerance (measured
    2.4e-6), so uint8 frames differ by at most one level; VAE slicing (``sequential``) is the old
    two decodes exactly."""

    pipe = tiny_pipeline()
    latents = torch.randn(1, 3, 32, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        separate = [pipe._decode(latents[:, :, :16]), pipe._decode(latents[:, :, 16:])]
        float_separate = torch.cat([pipe.decode_latents(latents[:, :, :16]), pipe.decode_latents(latents[:, :, 16:])])
        float_batched = pipe.decode_latents(torch.cat([latents[:, :, :16], latents[:, :, 16:]]))
        batched = pipe._decode_halves(latents)
        accelerate_pipeline(pipe, AccelerationParams(vae_decode="sequential"))
        assert pipe.vae.use_slicing
        sequential = pipe._decode_halves(latents)
    torch.testing.assert_close(float_batched, float_separate, atol=1e-5, rtol=1e-5)
    for got, want in zip(batched, separate, strict=True):
        assert got.shape == want.shape == (1, 9, 32, 32, 3)
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
    for got, want in zip(sequential, separate, strict=True):
        assert np.array_equal(got, want)


def test_vae_tiling_and_slicing_follow_the_settings(tiny_pipeline):
    pipe = tiny_pipeline()
    pipe.vae.enable_tiling()  # as a pipeline saved by someone else might come
    accelerate_pipeline(pipe, AccelerationParams())
    assert not pipe.vae.use_tiling and not pipe.vae.use_slicing
    accelerate_pipeline(pipe, AccelerationParams(vae_tiling=True, vae_decode="sequential"))
    assert pipe.vae.use_tiling and pipe.vae.use_slicing


def test_pipeline_with_the_fast_path_equals_eager(tiny_pipeline):
    """A whole sample: compiled blocks + batched decode against eager + sequential decodes."""

    kw = dict(num_frames=9, height=32, width=32, num_inference_steps=3, guidance_scale=2.0, max_sequence_length=16)
    outs = {}
    for name, settings in (("eager", AccelerationParams(compile_blocks=False, vae_decode="sequential")),
                           ("fast", AccelerationParams(compile_blocks=True, vae_decode="batched"))):
        pipe = tiny_pipeline()
        pipe.set_progress_bar_config(disable=True)
        torch.nn.init.normal_(pipe.transformer.task_embedding.weight)
        assert accelerate_pipeline(pipe, settings).compiled_blocks == (name == "fast")
        outs[name] = pipe("a red sphere", task="depth", generator=torch.Generator().manual_seed(0), **kw)
    for key in ("videos", "colormaps"):
        a, b = getattr(outs["fast"], key).astype(int), getattr(outs["eager"], key).astype(int)
        assert np.abs(a - b).max() <= 1, key
    np.testing.assert_allclose(outs["fast"].dense, outs["eager"].dense, atol=0.02)


@pytest.mark.slow
def test_training_with_compiled_blocks_matches_eager_and_resumes_exactly(tmp_path):
    """DeepSpeed ZeRO-2 (CPU, gloo): compiled blocks with selective checkpointing train the same model
    as eager ones with full checkpointing, and a run interrupted and resumed on the fast path replays
    its losses."""
    from tests.conftest import random_latent_cache, tiny_train_params, train_tiny
    from udpdiff.train import latest_checkpoint, run_fingerprint

    eager = tiny_train_params(tmp_path, gradient_checkpointing=True)
    fast = eager.with_overrides({"acceleration.compile_blocks": True, "train.gradient_checkpointing": "selective"})
    latents = random_latent_cache(tmp_path)
    _, ref = train_tiny(eager, latents, tmp_path / "eager")
    model, full = train_tiny(fast, latents, tmp_path / "fast")
    assert compiled_blocks(model)
    losses = [h["loss"] for h in full.history]
    assert losses == pytest.approx([h["loss"] for h in ref.history], rel=1e-5, abs=1e-7)
    train_tiny(fast, latents, tmp_path / "split", max_steps_this_run=3)
    assert latest_checkpoint(tmp_path / "split" / run_fingerprint(fast))[1] == 2
    _, resumed = train_tiny(fast, latents, tmp_path / "split")
    assert resumed.resumed_from == 2
    assert [h["loss"] for h in resumed.history] == pytest.approx(losses, rel=1e-5, abs=1e-7)


def test_generate_cli_takes_the_acceleration_switches(tmp_path, monkeypatch, tiny_pipeline):
    from udpdiff import cli

    tiny_pipeline().save_pretrained(tmp_path / "pipeline")
    seen = []
    real = acceleration.accelerate

    def spy(transformer, settings, device, **kw):
        seen.append((settings.compile_blocks, settings.vae_decode))
        return real(transformer, settings, device, **kw)

    monkeypatch.setattr(acceleration, "accelerate", spy)
    common = ["generate", "--prompt", "a cube", "--pipeline", str(tmp_path / "pipeline"), "--steps", "2",
              "--height", "32", "--width", "32", "--num-frames", "9", "--out", str(tmp_path / "out")]
    assert cli.main(common + ["--compile-blocks", "true", "--vae-decode", "sequential"]) == 0
    assert cli.main(common + ["--seed", "1"]) == 0
    assert seen == [(True, "sequential"), ("auto", "batched")]
    assert (tmp_path / "out" / "depth-seed0.npz").exists() and (tmp_path / "out" / "depth-seed1.mp4").exists()


def test_8bit_adamw_stochastic_rounding_keeps_updates_bf16_cannot_hold():
    """``adamw8bit(bf16_stochastic_round=True)`` on bf16 weights: 100 updates of 1e-4 (each under a
    fortieth of bf16's spacing at 1.0) move the weights by 1e-2 on average, as fp32 weights would;
    torch's AdamW rounds every one of them away (why master_weights: bf16 needs adamw8bit)."""
    pytest.importorskip("torchao")
    weights = {}
    for name in ("8bit-sr", "torch-adamw"):
        w = torch.ones(64, 128, dtype=torch.bfloat16, requires_grad=True)  # 8,192 elements: 8-bit states
        opt = acceleration.adamw8bit([w], "cpu", lr=1e-4, weight_decay=0.0, bf16_stochastic_round=True) \
            if name == "8bit-sr" else acceleration.adamw([w], "cpu", lr=1e-4, weight_decay=0.0)
        torch.manual_seed(0)
        for _ in range(100):
            w.grad = torch.ones_like(w)  # a constant gradient: Adam moves each weight by lr per update
            opt.step()
        weights[name] = w.detach().float()
    assert weights["8bit-sr"].mean().item() == pytest.approx(1 - 100 * 1e-4, abs=3e-4)
    assert len(weights["8bit-sr"].unique()) > 1  # each weight rounded up or down on its own
    assert torch.equal(weights["torch-adamw"], torch.ones(64, 128))
