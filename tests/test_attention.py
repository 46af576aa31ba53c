"""FlashAttention-3 routing (udpdiff.attention) on the CPU: the FA3 kernel itself needs a Hopper GPU
(benchmarks/bench_attention.py measures it there), so a stand-in with FA3's calling convention
((B, N, H, D) in and out) checks that exactly the supported SDPA calls reach it, in the layout it
expects, and that everything else still goes to SDPA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from udpdiff.acceleration import AccelerationError, use_attention
from udpdiff.attention import E4M3_MAX, FlashAttention3CogVideoXProcessor, SdpaToFlashAttention3, to_e4m3_per_head
from udpdiff.config import AccelerationParams
from udpdiff.models.transformer import UDPDiffTransformer3DModel

TINY = dict(num_attention_heads=2, attention_head_dim=16, time_embed_dim=32, text_embed_dim=32, num_layers=2,
            sample_width=8, sample_height=8, sample_frames=9, patch_size=2, max_text_seq_length=16,
            use_rotary_positional_embeddings=True)


class FakeFlash:
    """FA3's convention: (B, N, H, D) tensors; computes SDPA on the (B, H, N, D) view."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, q, k, v, q_descale=None, k_descale=None, v_descale=None):
        assert q.ndim == 4 and q.stride(-1) == 1  # FA3 needs the head dim contiguous
        self.calls += 1
        self.dtypes = {q.dtype, k.dtype, v.dtype}
        if q.dtype == torch.float8_e4m3fn:  # FA3's float8 kernel: (B, H) descales, bf16 out
            assert q_descale.shape == k_descale.shape == v_descale.shape == (q.shape[0], q.shape[2])
            q, k, v = (x.float() * d[:, None, :, None] for x, d in ((q, q_descale), (k, k_descale), (v, v_descale)))
            q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
        else:
            assert q_descale is None
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def _model_and_inputs():
    from udpdiff.train import rotary_embeddings

    torch.manual_seed(0)
    model = UDPDiffTransformer3DModel(**TINY, num_tasks=2).eval().to(torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(2, 3, 32, 8, 8, generator=g).to(torch.bfloat16),
                  encoder_hidden_states=torch.randn(2, 16, 32, generator=g).to(torch.bfloat16),
                  timestep=torch.tensor([999, 10]), task_id=torch.tensor([0, 1]),
                  image_rotary_emb=rotary_embeddings(model, 4, 32, 32, 3, torch.device("cpu")))
    return model, inputs


def test_the_processor_sends_every_attention_call_to_the_kernel_and_matches_sdpa():
    model, inputs = _model_and_inputs()
    with torch.no_grad():
        expected = model(**inputs, return_dict=False)[0]
        fake = FakeFlash()
        model.set_attn_processor(FlashAttention3CogVideoXProcessor(SdpaToFlashAttention3(fake, ("cpu",))))
        got = model(**inputs, return_dict=False)[0]
    assert fake.calls == TINY["num_layers"]  # one joint text+video attention per block
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=2e-2)  # bf16; the rotary tables reached it


@pytest.mark.parametrize("case", ["grad", "mask", "fp32", "fp16", "causal", "other device"])
def test_calls_the_kernel_cannot_serve_go_to_sdpa(case):
    fake = FakeFlash()
    mode = SdpaToFlashAttention3(fake, ("cpu",) if case != "other device" else ("cuda",))
    dtype = {"fp32": torch.float32, "fp16": torch.float16}.get(case, torch.bfloat16)
    q = torch.randn(1, 2, 8, 16, dtype=dtype, requires_grad=case == "grad")
    kwargs = {"attn_mask": torch.ones(8, 8, dtype=torch.bool)} if case == "mask" else {}
    kwargs |= {"is_causal": True} if case == "causal" else {}
    with torch.set_grad_enabled(case == "grad"), mode:
        out = F.scaled_dot_product_attention(q, q, q, **kwargs)
    assert fake.calls == 0
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, q, q, **kwargs))


def test_use_attention_picks_sdpa_without_fa3_and_refuses_an_explicit_fa3():
    model, _ = _model_and_inputs()
    assert use_attention(model, AccelerationParams(attention="auto")) == "sdpa"  # no Hopper GPU here
    assert use_attention(model, AccelerationParams(attention="sdpa")) == "sdpa"
    with pytest.raises(AccelerationError, match="fa3-fwd"):
        use_attention(model, AccelerationParams(attention="fa3"))


def test_e4m3_per_head_maps_each_heads_largest_value_to_e4m3s_largest_and_round_trips_within_its_precision():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 50, 16, generator=g) * torch.tensor([0.01, 1.0, 300.0])[None, :, None, None]
    x = x.bfloat16()
    x8, descale = to_e4m3_per_head(x)
    assert x8.dtype == torch.float8_e4m3fn and descale.shape == (2, 3) and descale.dtype == torch.float32
    assert torch.equal(x8.float().abs().amax(dim=(2, 3)), torch.full((2, 3), E4M3_MAX))
    back = x8.float() * descale[:, :, None, None]
    # e4m3 keeps 3 mantissa bits: a relative rounding error of at most 2^-4 for normal numbers,
    # whatever the head's magnitude (the per-head scale puts each head in range)
    big = x.float().abs() > descale[:, :, None, None] * 2.0**-6  # e4m3's smallest normal, scaled
    assert big.float().mean() > 0.95
    rel = ((back - x.float()).abs() / x.float().abs())[big]
    assert float(rel.max()) <= 2.0**-4 + 1e-6


def test_float8_attention_sends_e4m3_inputs_with_their_scales_and_stays_close_to_bf16():
    model, inputs = _model_and_inputs()
    with torch.no_grad():
        expected = model(**inputs, return_dict=False)[0]
        fake = FakeFlash()
        model.set_attn_processor(FlashAttention3CogVideoXProcessor(SdpaToFlashAttention3(fake, ("cpu",), fp8=True)))
        got = model(**inputs, return_dict=False)[0]
    assert fake.calls == TINY["num_layers"] and fake.dtypes == {torch.float8_e4m3fn}
    rel = float((got.float() - expected.float()).norm() / expected.float().norm())
    assert 0 < rel < 0.02, rel  # an approximation: not equal, but close (0.003 here)


def test_float8_attention_is_refused_where_fa3_cannot_run():
    model, _ = _model_and_inputs()
    for attention in ("auto", "sdpa", "fa3"):
        settings = AccelerationParams.model_validate({"attention": attention,
                                                      "approximate": {"float8_attention": True}})
        assert settings.approximate.active
        with pytest.raises(AccelerationError, match="float8_attention.*fa3-fwd"):
            use_attention(model, settings)
