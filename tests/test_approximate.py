"""``acceleration.approximate`` on the CPU: the opt-in modes that change the output (float8 linears,
diffusers' step caches). Each cache really skips attention work and changes the sample by a bounded
amount; off, the sample is bitwise what it was; cache state never leaks from one sample to the
next; float8 (linears or attention) is refused where it cannot run; training refuses (or, for the params.yaml section,
ignores) them. float8 itself runs in tests/test_gpu.py."""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0
from pydantic import ValidationError

from udpdiff.acceleration import AccelerationError, accelerate, accelerate_pipeline, compiled_blocks
from udpdiff.config import AccelerationParams, ApproximateParams, load_params, recording_reads

STEPS = 8
CALL = dict(num_frames=9, height=32, width=32, num_inference_steps=STEPS, guidance_scale=2.0, max_sequence_length=16)
# knobs that make each cache skip within 8 steps of the tiny random model
CACHES = {"first-block": {"type": "first-block", "threshold": 0.5},
          "faster": {"type": "faster"},
          "pab": {"type": "pab"}}


# compiled blocks through aot_eager: the same graph capture, no code generation (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("graph_capture_only")


def _settings(cache: dict | None = None, float8: str = "none", float8_attention: bool = False,
              **kw) -> AccelerationParams:
    return AccelerationParams.model_validate(
        {**kw, "approximate": {"float8": float8, "float8_attention": float8_attention, "cache": cache}})


class _CountingProcessor(CogVideoXAttnProcessor2_0):
    """diffusers' processor, counting the batch rows it attends over (the attention work done)."""

    rows = 0

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
        _CountingProcessor.rows += hidden_states.shape[0]
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)


def _pipe(tiny_pipeline, settings: AccelerationParams | None, count: bool = True):
    pipe = tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    torch.nn.init.normal_(pipe.transformer.task_embedding.weight)
    if count:  # eager blocks only: the count is Python state a compiled block would guard on
        pipe.transformer.set_attn_processor(_CountingProcessor())
    if settings is not None:
        accelerate_pipeline(pipe, settings)
    return pipe


def _sample(pipe, prompt: str = "a red sphere", seed: int = 0, **kw):
    _CountingProcessor.rows = 0
    out = pipe(prompt, task="depth", generator=torch.Generator().manual_seed(seed), **CALL, **kw)
    return out, _CountingProcessor.rows


# -- the params.yaml section --------------------------------------------------------------------------
@pytest.mark.parametrize("profile", ["tiny", "cogvideox-2b", "cogvideox-5b"])
def test_every_profile_has_the_approximations_off(profile):
    from tests.conftest import REPO

    approx = load_params(REPO / "params.yaml", profile=profile).active.acceleration.approximate
    assert approx.model_dump() == {"float8": "none", "float8_attention": False, "cache": None} and not approx.active


@pytest.mark.parametrize(("raw", "message"), [
    ({"float8": "e5m2"}, r"float8\n.*'none', 'rowwise' or 'tensorwise'"),
    ({"float8": "PerTensor"}, r"float8\n.*'none', 'rowwise' or 'tensorwise'"),
    ({"float8_attention": "rowwise"}, r"float8_attention\n.*valid boolean"),
    ({"cache": {"type": "teacache"}}, r"cache\n.*does not match any of the expected tags"),
    ({"cache": {"type": "pab", "threshold": 0.1}}, r"cache\.pab\.threshold\n.*Extra inputs are not permitted"),
    ({"cache": {"type": "first-block", "threshold": 0}}, r"cache\.first-block\.threshold\n.*greater than 0"),
    ({"cache": {"type": "pab", "attention_skip_range": 1}}, r"attention_skip_range\n.*greater than or equal to 2"),
    ({"cache": {"type": "pab", "timesteps": [800, 100]}}, r"timesteps\n.*low < high"),
    ({"cache": {"threshold": 0.1}}, r"cache\n.*Unable to extract tag using discriminator 'type'"),
])
def test_bad_approximate_settings_fail_with_the_key_and_the_reason(raw, message):
    with pytest.raises(ValidationError, match=message):
        ApproximateParams.model_validate(raw)


@pytest.mark.parametrize("float8", ["rowwise", "tensorwise"])
def test_each_float8_setting_is_accepted_and_active(float8):
    approx = ApproximateParams.model_validate({"float8": float8})
    assert approx.float8 == float8 and approx.active


def test_a_bad_approximate_setting_in_params_yaml_names_its_key(tmp_path):
    import yaml

    from tests.conftest import REPO
    from udpdiff.config import ParamsError

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["profiles"]["cogvideox-5b"]["acceleration"]["approximate"]["cache"] = {"type": "pab", "timesteps": [1, 2000]}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ParamsError, match=r"profiles\.cogvideox-5b\.acceleration\.approximate\.cache\.pab\.timesteps"):
        load_params(tmp_path / "params.yaml")


# -- the caches ---------------------------------------------------------------------------------------
def test_off_the_sample_is_bitwise_what_it_was(tiny_pipeline):
    before, work = _sample(_pipe(tiny_pipeline, None))
    after, work_off = _sample(_pipe(tiny_pipeline, _settings()))
    assert work == work_off > 0
    for key in ("videos", "colormaps", "dense"):
        assert np.array_equal(getattr(before, key), getattr(after, key)), key


@pytest.mark.parametrize("cache", list(CACHES))
def test_each_cache_skips_attention_work_and_changes_the_sample_a_bounded_amount(tiny_pipeline, cache):
    lossless, full = _sample(_pipe(tiny_pipeline, _settings()))
    pipe = _pipe(tiny_pipeline, _settings(CACHES[cache]))
    assert pipe.transformer.is_cache_enabled
    cached, work = _sample(pipe)
    # lossless: 2 blocks x 8 steps x CFG batch 2 = 32 rows of attention
    assert full == 2 * STEPS * 2 and work < 0.85 * full, (cache, work, full)
    d = np.abs(cached.videos.astype(int) - lossless.videos.astype(int))
    c = np.abs(cached.colormaps.astype(int) - lossless.colormaps.astype(int))
    assert d.max() > 0 or c.max() > 0  # it is an approximation
    assert d.mean() < 5 and c.mean() < 5, (cache, d.mean(), c.mean())  # measured 0.4-2.2 levels


@pytest.mark.parametrize("cache", list(CACHES))
def test_cache_state_does_not_leak_between_samples(tiny_pipeline, cache):
    """A, B, A: the third sample is the first, bit for bit; and a sample interrupted half way
    (diffusers' loop never reaches its own reset) leaves nothing behind for the next."""
    pipe = _pipe(tiny_pipeline, _settings(CACHES[cache]))
    a, _ = _sample(pipe, "a red sphere", seed=0)
    b, _ = _sample(pipe, "a blue cube", seed=1)
    again, _ = _sample(pipe, "a red sphere", seed=0)
    assert np.array_equal(a.videos, again.videos) and np.array_equal(a.colormaps, again.colormaps)

    def stop(pipe, i, t, tensors):
        if i == STEPS // 2:
            raise KeyboardInterrupt
        return {}

    with pytest.raises(KeyboardInterrupt):
        _sample(pipe, "a red sphere", seed=0, callback_on_step_end=stop)
    b_again, _ = _sample(pipe, "a blue cube", seed=1)
    assert np.array_equal(b.videos, b_again.videos) and np.array_equal(b.colormaps, b_again.colormaps)


def test_first_block_cache_runs_beneath_compiled_blocks(tiny_pipeline, monkeypatch):
    """The blocks compile beneath the hooks (their forward, one fullgraph graph; aot_eager here),
    whose skip decisions run eagerly: the same decisions and sample as the eager cached one."""
    from diffusers.hooks.first_block_cache import FBCHeadBlockHook

    decide = FBCHeadBlockHook._should_compute_remaining_blocks
    decisions: list[bool] = []
    monkeypatch.setattr(FBCHeadBlockHook, "_should_compute_remaining_blocks",
                        lambda self, residual: decisions.append(decide(self, residual)) or decisions[-1])
    samples = {}
    for compile_blocks in (False, True):
        pipe = _pipe(tiny_pipeline, _settings(CACHES["first-block"], compile_blocks=compile_blocks), count=False)
        assert compiled_blocks(pipe.transformer) == compile_blocks
        samples[compile_blocks], _ = _sample(pipe)
    eager, fast = decisions[:STEPS], decisions[STEPS:]
    assert eager == fast and not all(eager)  # some steps skipped the other blocks
    assert np.abs(samples[True].videos.astype(int) - samples[False].videos.astype(int)).max() <= 1


@pytest.mark.parametrize("cache", ["faster", "pab"])
def test_attention_caches_keep_the_blocks_eager_or_refuse_compiled_ones(cache):
    from udpdiff.models.transformer import UDPDiffTransformer3DModel

    model = UDPDiffTransformer3DModel(num_attention_heads=2, attention_head_dim=16, time_embed_dim=32,
                                      text_embed_dim=32, num_layers=2, sample_width=8, sample_height=8,
                                      sample_frames=9, patch_size=2, max_text_seq_length=16)
    settings = _settings(CACHES[cache])
    done = accelerate(model, settings, "cuda", cache=settings.approximate.cache)  # auto, as on a GPU
    assert not done.compiled_blocks and cache in done.reason
    with pytest.raises(AccelerationError, match=f"cache: {cache} .*compile_blocks: auto or false"):
        accelerate(model, _settings(CACHES[cache], compile_blocks=True), "cpu", cache=settings.approximate.cache)
    assert not compiled_blocks(model)


def test_faster_cache_needs_cfg(tiny_pipeline):
    pipe = _pipe(tiny_pipeline, _settings(CACHES["faster"]))
    with pytest.raises(ValueError, match="guidance_scale > 1"):
        pipe("a cube", task="depth", **{**CALL, "guidance_scale": 1.0})


# -- float8 and training ------------------------------------------------------------------------------
@pytest.mark.parametrize("float8", ["rowwise", "tensorwise"])
def test_float8_is_refused_on_the_cpu_with_what_it_needs(tiny_pipeline, float8):
    pipe = _pipe(tiny_pipeline, None)
    with pytest.raises(AccelerationError, match=rf"approximate\.float8: {float8} needs a CUDA GPU of compute "
                                                r"capability 8\.9 or newer .* on cpu; use float8: none"):
        accelerate_pipeline(pipe, _settings(float8=float8))


def test_float8_attention_is_refused_on_the_cpu_with_what_it_needs(tiny_pipeline):
    pipe = _pipe(tiny_pipeline, None)
    with pytest.raises(AccelerationError, match=r"approximate\.float8_attention runs FlashAttention-3's float8 "
                                                r"kernel: it needs .*fa3-fwd.*; use float8_attention: false"):
        accelerate_pipeline(pipe, _settings(float8_attention=True))


@pytest.mark.parametrize(("float8", "granularity"), [("rowwise", "PerRow"), ("tensorwise", "PerTensor")])
def test_use_float8_asks_torchao_for_the_setting_s_scales(monkeypatch, float8, granularity):
    """rowwise / tensorwise: torchao's PerRow / PerTensor (activations and weights alike), on the
    blocks' token-wise linears, Inductor's settings left alone. float8 kernels need sm89+, so
    ``quantize_`` is captured, not run; torchao's own classes where it is installed, else a
    stand-in with its 0.18 names (``torchao.quantization``)."""
    import dataclasses
    import importlib.util
    import sys
    import types

    from udpdiff import acceleration
    from udpdiff.models.transformer import UDPDiffTransformer3DModel

    if importlib.util.find_spec("torchao") is None:
        @dataclasses.dataclass(frozen=True)
        class PerTensor:
            pass

        @dataclasses.dataclass(frozen=True)
        class PerRow:
            dim: int = -1

        def config(granularity, **kw):  # torchao normalises one granularity to [activation, weight]
            return types.SimpleNamespace(granularity=[granularity, granularity], **kw)

        stand_in = types.ModuleType("torchao.quantization")
        stand_in.__dict__.update(PerRow=PerRow, PerTensor=PerTensor, Float8DynamicActivationFloat8WeightConfig=config)
        monkeypatch.setitem(sys.modules, "torchao", types.ModuleType("torchao"))
        monkeypatch.setitem(sys.modules, "torchao.quantization", stand_in)
    import torchao.quantization as tq

    calls = []
    monkeypatch.setattr(tq, "quantize_", lambda model, config, filter_fn: calls.append((model, config, filter_fn)),
                        raising=False)  # the stand-in has none
    monkeypatch.setattr(acceleration, "float8_unavailable", lambda transformer: None)
    model = UDPDiffTransformer3DModel(num_layers=2, num_attention_heads=2, attention_head_dim=8, time_embed_dim=8,
                                      text_embed_dim=8)
    acceleration.use_float8(model, float8)
    [(quantised, config, filter_fn)] = calls
    assert quantised is model and filter_fn is acceleration._is_block_linear
    scales = getattr(tq, granularity)()
    assert list(config.granularity) == [scales, scales] and config.set_inductor_config is False
    acceleration.use_float8(model, "none")
    assert len(calls) == 1


def test_generate_cli_takes_the_float8_choices(tmp_path, tiny_pipeline, capsys):
    from udpdiff import cli

    tiny_pipeline().save_pretrained(tmp_path / "pipeline")
    common = ["generate", "--prompt", "a cube", "--pipeline", str(tmp_path / "pipeline"), "--steps", "2",
              "--height", "32", "--width", "32", "--num-frames", "9", "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit):
        cli.main(common + ["--float8", "e5m2"])
    assert re.search(r"--float8: invalid choice: 'e5m2' \(choose from .*none.*rowwise.*tensorwise",
                     capsys.readouterr().err)
    with pytest.raises(AccelerationError, match=r"float8: tensorwise needs a CUDA GPU .* on cpu"):
        cli.main(common + ["--float8", "tensorwise"])
    with pytest.raises(AccelerationError, match=r"float8_attention runs FlashAttention-3's float8 kernel"):
        cli.main(common + ["--float8-attention"])


@pytest.mark.parametrize("raw", [{"float8": "rowwise"}, {"float8": "tensorwise"}, {"float8_attention": True},
                                 {"cache": {"type": "pab"}}])
def test_training_refuses_the_approximations(tiny_pipeline, raw):
    pipe = tiny_pipeline()
    pipe.transformer.train()
    with pytest.raises(AccelerationError, match="sampling only; this transformer is in training mode"):
        accelerate_pipeline(pipe, AccelerationParams.model_validate({"approximate": raw}))
    assert not pipe.transformer.is_cache_enabled


def test_the_train_stage_ignores_the_section_and_says_so(caplog):
    """The params.yaml section is shared with sampling and is no train-stage input (dvc.yaml):
    training reads it unrecorded, only to warn that it is ignored."""
    from tests.conftest import REPO
    from udpdiff.train import _ignore_approximate

    p = load_params(REPO / "params.yaml", profile="tiny").with_overrides(
        {"acceleration.approximate": {"float8": "none", "cache": {"type": "first-block"}}})
    with recording_reads() as reads, caplog.at_level(logging.WARNING, logger="udpdiff.train"):
        _ignore_approximate(p, rank=0)
    assert not reads
    assert "for sampling only: training ignores it" in caplog.text


def test_float8_targets_the_blocks_token_wise_linears_only():
    """Attention projections and feed-forward of every block; not the AdaLN modulation linears
    (one timestep embedding per sample) and nothing outside the blocks."""
    from udpdiff.acceleration import _block_linears
    from udpdiff.models.transformer import UDPDiffTransformer3DModel

    model = UDPDiffTransformer3DModel(num_layers=2, num_attention_heads=2, attention_head_dim=8, time_embed_dim=8,
                                      text_embed_dim=8)
    names = {n for n, m in model.named_modules() if any(m is b for b in _block_linears(model))}
    per_block = {n.split(".", 2)[2] for n in names}
    assert {"attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.2"} <= per_block
    assert not any("norm" in n for n in per_block) and len(names) == 2 * len(per_block)
