"""The 3D VAE that maps RGB videos *and* Pixelplanes colormaps to 16-channel latents.

Large profiles load CogVideoX's ``AutoencoderKLCogVideoX`` unchanged (paper §4.4: dense maps are
"decoded using the same video 3D VAE"). The ``tiny`` profile trains a small instance of the same
class on the synthetic clips and their colormaps, so reconstructions are real, not assumed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import torch
from diffusers import AutoencoderKLCogVideoX
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)


def build_vae(spec: dict, seed: int) -> AutoencoderKLCogVideoX:
    """params.yaml ``vae``: ``pretrained`` (dir/id, ``subfolder``) or a ``config`` to train."""
    if spec.get("pretrained"):
        return AutoencoderKLCogVideoX.from_pretrained(spec["pretrained"], subfolder=spec.get("subfolder", "vae"))
    torch.manual_seed(seed)
    config = dict(spec.get("config", {}))
    n = len(config.get("block_out_channels", (128, 256, 256, 512)))
    config.setdefault("down_block_types", ("CogVideoXDownBlock3D",) * n)
    config.setdefault("up_block_types", ("CogVideoXUpBlock3D",) * n)
    return AutoencoderKLCogVideoX(**config)


def to_model_input(videos: np.ndarray | Sequence[np.ndarray], device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 (B,T,H,W,3) -> float (B,3,T,H,W) in [-1, 1] on ``device`` (moved as uint8: a quarter of
    the bytes, and the conversion runs there)."""
    x = torch.from_numpy(np.ascontiguousarray(np.stack(list(videos)) if not isinstance(videos, np.ndarray) else videos))
    return x.to(device).permute(0, 4, 1, 2, 3).float().div(127.5).sub(1.0)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float (B,3,T,H,W) in [-1, 1] -> uint8 (B,T,H,W,3)."""
    x = x.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 4, 1).cpu().numpy()


class VaeTrainStep:
    """One optimisation step of the VAE on a float ``(B, 3, T, H, W)`` batch in [-1, 1]: L1 + MSE + a
    tiny KL, bf16 autocast on a GPU (the weights, optimizer and loss stay float32), gradient norm
    clipped to 1, AdamW with a cosine schedule over ``steps``. :func:`train_vae` loops it; the VAE
    benchmark (``benchmarks/bench_vae_train.py``) times it."""

    def __init__(self, vae: AutoencoderKLCogVideoX, steps: int, lr: float, kl_weight: float):
        self.vae, self.kl_weight = vae, kl_weight
        self.autocast = torch.autocast(vae.device.type, dtype=torch.bfloat16, enabled=vae.device.type == "cuda")
        self.opt = torch.optim.AdamW(vae.parameters(), lr=lr)
        self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=max(steps, 1), eta_min=lr * 0.05)

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        with self.autocast:
            posterior = self.vae.encode(x).latent_dist
            rec = self.vae.decode(posterior.sample()).sample.float()
        l1 = (rec - x).abs().mean()
        mse = (rec - x).pow(2).mean()
        kl = posterior.kl().mean() / x[0].numel()
        loss = l1 + mse + self.kl_weight * kl
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.vae.parameters(), 1.0)
        self.opt.step()
        self.sched.step()
        return {"vae_loss": loss.detach(), "vae_l1": l1.detach(), "vae_kl": kl.detach()}


def train_vae(
    vae: AutoencoderKLCogVideoX,
    videos: Sequence[np.ndarray],
    steps: int,
    batch_size: int,
    lr: float,
    kl_weight: float,
    seed: int,
    log_fn: Callable[[dict[str, float], int], None] | None = None,
    crop: tuple[int, int, int] | None = None,
) -> list[dict[str, float]]:
    """Fit the VAE to uint8 videos (RGB clips and their colormaps alike) with :class:`VaeTrainStep`,
    on the VAE's device, ``batch_size`` videos drawn without replacement per step; with ``crop``
    (frames, height, width) each a random crop of itself (a convolutional VAE learns from parts of
    clips at a fraction of a whole clip's cost, and is used on whole ones).

    Returns the per-step history; ``log_fn(metrics, step)`` is called every 10 steps.
    """
    if not videos:
        raise ValueError("train_vae needs at least one video")
    data = np.stack(videos)  # uint8, a quarter of float32's memory; each batch is converted on its own
    if crop is not None and any(c > n for c, n in zip(crop, data.shape[1:4], strict=True)):
        raise ValueError(f"crop {list(crop)} is larger than the videos {list(data.shape[1:4])}")
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    train_step = VaeTrainStep(vae, steps, lr, kl_weight)
    vae.train()
    history: list[dict[str, float]] = []
    for step in tqdm(range(1, steps + 1), desc="vae", leave=False):
        idx = rng.choice(len(data), size=min(batch_size, len(data)), replace=False)
        batch = data[idx] if crop is None else random_crops(data[idx], crop, rng)
        row = {k: v.item() for k, v in train_step(to_model_input(batch, vae.device)).items()}
        if not np.isfinite(row["vae_loss"]):
            raise FloatingPointError(f"VAE loss is {row['vae_loss']} at step {step}")
        history.append(row)
        if log_fn is not None and (step % 10 == 0 or step == steps):
            log_fn(row, step)
    vae.eval()
    return history


def random_crops(videos: np.ndarray, crop: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    """(B,T,H,W,C) videos -> (B,*crop,C): each video's own uniformly placed crop (frames, height, width)."""
    t, h, w = crop
    starts = [rng.integers(0, n - c + 1, size=len(videos)) for n, c in zip(videos.shape[1:4], crop, strict=True)]
    return np.stack([v[a:a + t, b:b + h, c:c + w] for v, a, b, c in zip(videos, *starts, strict=True)])


@torch.no_grad()
def calibrate_scaling_factor(vae: AutoencoderKLCogVideoX, videos: Sequence[np.ndarray]) -> float:
    """Set ``scaling_factor`` so scaled latents have unit variance (as Stable Diffusion did)."""
    latents = torch.cat([vae.encode(to_model_input(v[None], vae.device)).latent_dist.mode() for v in videos])
    factor = float(1.0 / latents.std().clamp_min(1e-6))
    vae.register_to_config(scaling_factor=factor)
    return factor


@torch.no_grad()
def reconstruct(vae: AutoencoderKLCogVideoX, video: np.ndarray) -> np.ndarray:
    """One uint8 ``(T, H, W, 3)`` video encoded (posterior mode) and decoded by ``vae``."""
    x = to_model_input(video[None], vae.device)
    return to_uint8(vae.decode(vae.encode(x).latent_dist.mode()).sample)[0]


def psnr(reconstruction: np.ndarray, reference: np.ndarray) -> float:
    """PSNR (dB) of a uint8 reconstruction against its uint8 reference."""
    mse = np.mean((reconstruction.astype(np.float64) - reference.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-10)))
