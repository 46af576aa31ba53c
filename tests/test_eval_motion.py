"""Motion smoothness (VBench MS): the shared score, VBench's AMT-S path, and the weight-free flow prior.

AMT-S weights are not available offline: the AMT path is exercised with a randomly initialised AMT-S
(VBench's own network code) saved as a VBench-style checkpoint and loaded back through the real
loading path, and checked against a transcription of VBench's per-pair loop. On a CUDA machine with
the full vbench installed, it is also checked against ``vbench.motion_smoothness`` itself.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys

import cv2
import numpy as np
import pytest
import torch
import yaml

from udpdiff.evaluation.consistency import MetricModelUnavailable
from udpdiff.evaluation.motion import (
    AMT_MIN_SIDE,
    AMTInterpolator,
    FlowInterpolator,
    FrameInterpolator,
    import_vbench_amt,
    motion_smoothness,
    motion_smoothness_flow,
    vbench_amt_scale,
)

# --------------------------------------------------------------------------------------------
# fixtures and references
# --------------------------------------------------------------------------------------------


def amt_config_path() -> str:
    import_vbench_amt("utils.utils")  # locates the vbench package without running its __init__
    return str(next(iter(sys.modules["vbench"].__path__)) + "/third_party/amt/cfgs/AMT-S.yaml")


@pytest.fixture(scope="module")
def amt(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, str]:
    """A random AMT-S (VBench's network, params from VBench's AMT-S.yaml) and its saved checkpoint."""
    network = import_vbench_amt("networks.AMT-S")
    with open(amt_config_path()) as f:
        params = yaml.safe_load(f)["network"]["params"]
    torch.manual_seed(0)
    model = network.Model(**params).eval()
    path = tmp_path_factory.mktemp("amt") / "amt-s.pth"
    torch.save({"state_dict": model.state_dict()}, path)
    return model, str(path)


def vbench_motion_score(model: torch.nn.Module, frames: np.ndarray, scale: float = 1.0) -> float:
    """VBench's ``MotionSmoothness.motion_score`` (v0.1.5) transcribed for in-memory frames, one pair
    per forward, with vbench's own img2tensor / InputPadder / tensor2img; ``scale`` is the factor
    after VBench's VRAM rule."""
    u = import_vbench_amt("utils.utils")
    inputs = [u.img2tensor(f) for f in frames[0::2]]
    padder = u.InputPadder(inputs[0].shape, int(16 / scale))
    inputs = padder.pad(*inputs)
    embt = torch.tensor(1 / 2).float().view(1, 1, 1, 1)
    outputs = [inputs[0]]
    for in_0, in_1 in zip(inputs[:-1], inputs[1:], strict=True):
        with torch.no_grad():
            pred = model(in_0, in_1, embt, scale_factor=scale, eval=True)["imgt_pred"]
        outputs += [pred, in_1]
    outputs = [u.tensor2img(o) for o in padder.unpad(*outputs)]
    ori, interpolated = frames[1::2], outputs[1::2]
    diffs = [np.mean(cv2.absdiff(ori[i], interpolated[i])) for i in range(len(interpolated))]
    return float((255.0 - np.mean(np.array(diffs))) / 255.0)


class OracleInterpolator:
    """Returns the real odd frames of one video: a perfect interpolator."""

    name = "oracle"

    def __init__(self, video: np.ndarray) -> None:
        self.video = video

    def __call__(self, frames: np.ndarray) -> torch.Tensor:
        k = frames.shape[1]
        return torch.from_numpy(np.ascontiguousarray(self.video[None, 1 : 2 * k - 1 : 2]))


class BlackInterpolator:
    """Predicts black frames: the MAE is then the mean of the odd frames it is compared with."""

    name = "black"

    def __call__(self, frames: np.ndarray) -> torch.Tensor:
        b, k, h, w, c = frames.shape
        return torch.zeros((b, k - 1, h, w, c), dtype=torch.uint8)


# --------------------------------------------------------------------------------------------
# the shared VBench score
# --------------------------------------------------------------------------------------------


def test_oracle_interpolator_scores_exactly_one(moving_video) -> None:
    for t in (3, 6, 7):
        v = moving_video(t=t)
        assert motion_smoothness(v, OracleInterpolator(v)) == 1.0


def test_score_compares_middles_with_the_real_odd_frames(moving_video) -> None:
    v = moving_video(t=6)  # even T: frames 0, 2, 4 interpolate 1 and 3; frame 5 is unused (VBench)
    expect = (255.0 - np.mean([v[1].mean(), v[3].mean()])) / 255.0
    assert motion_smoothness(v, BlackInterpolator()) == pytest.approx(expect, abs=1e-12)
    per = motion_smoothness(np.stack([v, 255 - v]), BlackInterpolator(), reduction="none")
    assert per[0] == pytest.approx(expect, abs=1e-12)
    assert per[1] == pytest.approx((255.0 - np.mean([(255 - v[1]).mean(), (255 - v[3]).mean()])) / 255.0, abs=1e-12)
    with pytest.raises(ValueError, match="reduction"):
        motion_smoothness(v, BlackInterpolator(), reduction="sum")
    with pytest.raises(ValueError, match="at least 3 frames"):
        motion_smoothness(v[:2], BlackInterpolator())
    with pytest.raises(TypeError, match="uint8"):
        motion_smoothness(v.astype(np.float32), BlackInterpolator())


# --------------------------------------------------------------------------------------------
# AMT-S (VBench's interpolator)
# --------------------------------------------------------------------------------------------


def test_amt_batched_equals_vbench_loop(amt: tuple[torch.nn.Module, str], moving_video) -> None:
    model, path = amt
    # 120x128 is padded to 128x128 (exercises VBench's replicate padding and unpadding); 6 frames:
    # frames 0, 2, 4 predict 1 and 3, frame 5 is unused, as in VBench
    v = moving_video(t=6, h=120, w=128, speed=3.0)
    batch = np.stack([v, v[[0, 4, 1, 5, 2, 3]]])
    # batch_size=3 over 2 videos x 2 pairs: the first chunk spans both videos
    interp = AMTInterpolator(path, device="cpu", batch_size=3)
    assert interp.name == "amt-s" and isinstance(interp, FrameInterpolator)
    ours = motion_smoothness(batch, interp, reduction="none")
    refs = [vbench_motion_score(model, batch[0]), vbench_motion_score(model, batch[1])]
    assert ours == pytest.approx(refs, abs=1e-6)
    assert 0.0 < min(refs) and max(refs) < 1.0  # a random AMT-S is far from the oracle


def test_amt_scale_below_one_follows_vbench(amt: tuple[torch.nn.Module, str], moving_video) -> None:
    model, _ = amt
    scale = 1 / 22 * 16  # a factor VBench's VRAM rule produces: frames padded to a multiple of 22
    v = moving_video(t=3, h=170, w=176, speed=4.0)  # padded to 176x176, the network runs at 128x128
    interp = AMTInterpolator(model=model, device="cpu", scale=scale)
    assert motion_smoothness(v, interp) == pytest.approx(vbench_motion_score(model, v, scale=scale), abs=1e-6)


def test_vbench_amt_scale_rule() -> None:
    def vbench(h: int, w: int, vram: int) -> float:  # VBench's initialization() + motion_score() maths
        scale = 1024 * 512 / (h * w) * np.sqrt((vram - 2500 * 1024**2) / (1500 * 1024**2))
        scale = 1 if scale > 1 else scale
        return float(1 / np.floor(1 / np.sqrt(scale) * 16) * 16)

    assert vbench_amt_scale(480, 720, None) == 1.0  # CPU: never rescaled
    assert vbench_amt_scale(480, 720, 80 * 1024**3) == 1.0  # H100 / H200
    small = vbench_amt_scale(1080, 1920, 4 * 1024**3)
    assert small == vbench(1080, 1920, 4 * 1024**3) and small == pytest.approx(16 / 31)


def test_amt_rejects_too_small_frames(amt: tuple[torch.nn.Module, str], moving_video) -> None:
    interp = AMTInterpolator(model=amt[0], device="cpu")
    # 112 px pads to 112: the coarsest correlation level would be 1 px and AMT-S would return NaN
    for h, w in ((64, 64), (112, 144)):
        with pytest.raises(ValueError, match=f"at least {AMT_MIN_SIDE}x{AMT_MIN_SIDE}"):
            motion_smoothness(moving_video(t=5, h=h, w=w), interp)


def test_amt_missing_checkpoint_raises_clear_error(tmp_path) -> None:
    missing = tmp_path / "amt-s.pth"
    with pytest.raises(MetricModelUnavailable) as info:
        AMTInterpolator(missing)
    msg = str(info.value)
    assert info.value.metric_name.startswith("motion_smoothness")
    assert "motion_smoothness" in msg and "amt-s.pth" in msg and "AMTInterpolator('/" in msg
    assert "lalala125/AMT" in msg and "evaluate.amt" in msg
    assert info.value.path_or_id == str(missing)
    with pytest.raises(MetricModelUnavailable, match="motion_smoothness"):
        AMTInterpolator(None)


def test_amt_wrong_checkpoint_raises_clear_error(tmp_path) -> None:
    bad = tmp_path / "amt-s.pth"
    torch.save({"state_dict": {"conv.weight": torch.zeros(1)}}, bad)
    with pytest.raises(MetricModelUnavailable, match="RuntimeError: .*amt-s.pth"):
        AMTInterpolator(bad)


def test_missing_vbench_raises_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "vbench", raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args, **kwargs: None)
    with pytest.raises(MetricModelUnavailable, match=r"pip install --no-deps vbench==0\.1\.5"):
        import_vbench_amt("networks.AMT-S")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_amt_matches_vbench_motion_smoothness_on_cuda(tmp_path, amt: tuple[torch.nn.Module, str], moving_video) -> None:
    pytest.importorskip("torchvision")
    try:
        vbench_ms = importlib.import_module("vbench.motion_smoothness")
    except ImportError as exc:  # the full vbench needs decord, omegaconf, ... as well
        pytest.skip(f"vbench.motion_smoothness not importable: {exc}")
    _, path = amt
    v = moving_video(t=9, h=136, w=200, speed=3.0)
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, frame in enumerate(v):
        cv2.imwrite(str(folder / f"{i:05d}.png"), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    reference = vbench_ms.MotionSmoothness(amt_config_path(), path, "cuda").motion_score(str(folder))
    ours = motion_smoothness(v, AMTInterpolator(path, device="cuda", batch_size=3, scale="auto"))
    assert math.isfinite(ours) and ours == pytest.approx(float(reference), abs=1e-4)


# --------------------------------------------------------------------------------------------
# weight-free flow prior
# --------------------------------------------------------------------------------------------


def test_motion_smoothness_flow(moving_video, frame_shuffle) -> None:
    v = moving_video()
    assert motion_smoothness_flow(np.repeat(v[:1], 7, axis=0)) == 1.0
    smooth = motion_smoothness_flow(v)
    shuffled = motion_smoothness_flow(v[frame_shuffle])
    assert 0.0 < shuffled < smooth <= 1.0
    assert smooth > 0.99  # near-linear motion is interpolated almost exactly
    per = motion_smoothness_flow(np.stack([v, v[frame_shuffle]]), reduction="none")
    assert per == pytest.approx([smooth, shuffled])
    with pytest.raises(ValueError):
        motion_smoothness_flow(v[:2])


def test_flow_prior_numbers_unchanged_by_the_move(moving_video, frame_shuffle) -> None:
    # Scores of the implementation that lived in consistency.py (its float32 MAE), before the move.
    v = moving_video()
    assert motion_smoothness_flow(v) == pytest.approx(0.9980174899101257, abs=1e-6)
    assert motion_smoothness_flow(v[frame_shuffle]) == pytest.approx(0.9466077089309692, abs=1e-6)
    assert motion_smoothness_flow(v[:6]) == pytest.approx(0.9981547594070435, abs=1e-6)
    v2 = moving_video(t=9, h=40, w=56, speed=3.0)
    assert motion_smoothness_flow(v2) == pytest.approx(0.9946918487548828, abs=1e-6)
    assert motion_smoothness_flow(v2, winsize=9, levels=2) == pytest.approx(0.9943283200263977, abs=1e-6)


def test_flow_interpolator_is_a_frame_interpolator(moving_video, frame_shuffle) -> None:
    v = moving_video()
    batch = np.stack([v, v[frame_shuffle], v[::-1]])
    interp = FlowInterpolator()
    assert interp.name == "opencv-farneback" and isinstance(interp, FrameInterpolator)
    per = motion_smoothness(batch, interp, reduction="none")
    assert per == motion_smoothness_flow(batch, reduction="none")
    # chunking the warps changes nothing; torch input equals numpy input
    assert motion_smoothness(batch, FlowInterpolator(batch_size=1), reduction="none") == per
    assert motion_smoothness(torch.from_numpy(batch), interp, reduction="none") == per
    mids = interp(v[0::2])
    assert mids.dtype == torch.uint8 and tuple(mids.shape) == (5, *v.shape[1:])

