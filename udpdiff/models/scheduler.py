"""Noise schedulers: CogVideoX's DDIM (2B) and DPM++ (5B) variants, swappable by name."""

from __future__ import annotations

from diffusers import CogVideoXDDIMScheduler, CogVideoXDPMScheduler, SchedulerMixin

SCHEDULERS: dict[str, type[SchedulerMixin]] = {"ddim": CogVideoXDDIMScheduler, "dpm": CogVideoXDPMScheduler}

# CogVideoX's training schedule: v-prediction, zero-terminal-SNR scaled-linear betas.
COGVIDEOX_DEFAULTS = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="v_prediction",
    rescale_betas_zero_snr=True,
    clip_sample=False,
    set_alpha_to_one=True,
    timestep_spacing="trailing",
    snr_shift_scale=3.0,
)


def build_scheduler(spec: dict, pretrained: str | None = None) -> SchedulerMixin:
    """params.yaml ``scheduler``: ``type`` (ddim|dpm) and ``config`` overrides. With a pretrained
    CogVideoX directory and no overrides, its own ``scheduler/`` config is used."""
    kind = spec.get("type", "ddim")
    try:
        cls = SCHEDULERS[kind]
    except KeyError:
        raise ValueError(f"unknown scheduler {kind!r}; choose one of {sorted(SCHEDULERS)}") from None
    if pretrained and not spec.get("config"):
        return cls.from_pretrained(pretrained, subfolder="scheduler")
    return cls(**{**COGVIDEOX_DEFAULTS, **spec.get("config", {})})
