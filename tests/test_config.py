"""params.yaml: every profile loads; bad values fail early with the key path and the reason."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from udpdiff.config import ParamsError, load_params

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("profile", ["tiny", "cogvideox-2b", "cogvideox-5b"])
def test_shipped_profiles_load(profile):
    p = load_params(REPO / "params.yaml", profile=profile)
    assert p.profile == profile
    assert p.active.train.tasks == ["segmentation", "depth"]


def test_large_profiles_carry_the_paper_settings():
    for name, scheduler in (("cogvideox-2b", "ddim"), ("cogvideox-5b", "dpm")):
        a = load_params(REPO / "params.yaml", profile=name).active
        assert (a.data.num_frames, a.data.height, a.data.width) == (49, 480, 720)
        assert a.train.lr == 1e-5 and a.train.micro_batch_size == 1 and a.train.steps == 40000
        assert a.train.long_caption_prob == 0.8 and a.sample.num_inference_steps == 50
        assert a.scheduler.type == scheduler and a.transformer.channel_expansion == "duplicate"
        # §3.1: SAM2 propagates a first-frame entity model's map (Mask2Former standing in for EntitySeg)
        seg = a.data.panda70m.segmentation_annotator
        assert seg.type == "sam2" and seg.entities is not None and seg.entities.type == "mask2former"
        assert seg.entities.path == "facebook/mask2former-swin-large-coco-panoptic"


@pytest.mark.parametrize("profile", ["tiny", "cogvideox-2b", "cogvideox-5b"])
def test_every_profile_takes_the_fast_path_where_it_pays(profile):
    """``auto`` compiles the blocks on CUDA and leaves the CPU (the tiny profile, CI) eager; the
    video and colormap are decoded in one VAE call. YAML's true/false are the other choices."""
    acc = load_params(REPO / "params.yaml", profile=profile).active.acceleration
    assert (acc.compile_blocks, acc.compile_mode, acc.vae_decode) == ("auto", "default", "batched")
    from udpdiff.config import AccelerationParams

    assert AccelerationParams.model_validate(yaml.safe_load("compile_blocks: false")).compile_blocks is False
    assert AccelerationParams.model_validate(yaml.safe_load("compile_blocks: true")).compile_blocks is True


def _write(tmp_path: Path, mutate) -> Path:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    mutate(raw)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda r: r["profiles"]["tiny"]["train"].update(lr=-1), r"profiles\.tiny\.train\.lr"),
        (lambda r: r["profiles"]["tiny"]["data"].update(num_frames=10), "4k\\+1"),
        (lambda r: r["profiles"]["tiny"]["train"].update(task_ratio=[0.9, 0.2]), "sum to 1"),
        (lambda r: r["profiles"]["tiny"]["train"].update(tasks=["segmentation", "normals"]), "unknown task"),
        (lambda r: r.update(profile="nope"), "profile 'nope' is not defined"),
        (lambda r: r["profiles"]["tiny"]["train"].update(lrr=1), r"lrr.*Extra inputs"),
        (lambda r: r["profiles"]["tiny"]["train"].update(task_conditioning="none"), "single-task"),
        (lambda r: r["profiles"]["cogvideox-2b"]["evaluate"]["depth_annotator"].update(
            entities={"type": "mask2former", "path": "m"}),
         r"profiles\.cogvideox-2b\.evaluate\.depth_annotator: .*entities .* the type must be sam2"),
        (lambda r: r["profiles"]["cogvideox-5b"]["data"]["panda70m"]["segmentation_annotator"].update(
            options={"points_per_side": 12}), r"\['points_per_side'\] shape SAM2's point-grid prompts"),
        (lambda r: r["profiles"]["cogvideox-5b"]["data"]["panda70m"]["segmentation_annotator"]["entities"].update(
            type="cropformer"), r"segmentation_annotator\.entities\.type"),
        (lambda r: r["profiles"]["cogvideox-5b"]["acceleration"].update(compile_blocks="sometimes"),
         r"profiles\.cogvideox-5b\.acceleration\.compile_blocks"),
        (lambda r: r["profiles"]["tiny"]["acceleration"].update(compile_mode="reduce-overhead"),
         r"profiles\.tiny\.acceleration\.compile_mode"),
        (lambda r: r.update(inference_launcher="torchrun --nproc_per_node 8"),
         r"inference_launcher: .*run-a-module flag"),
        (lambda r: r.update(train_launcher="deepspeed --module 'unclosed"), r"train_launcher: .*not a command line"),
        (lambda r: r["profiles"]["tiny"]["sample"].update(reconstruction_guidance=-1), r"reconstruction_guidance"),
        (lambda r: (r["profiles"]["tiny"]["sample"].update(reconstruction_guidance=2.0),
                    r["profiles"]["tiny"]["train"].update(rgb_given_prob=0.5)),
         r"profiles\.tiny: .*set one of them to 0"),
        (lambda r: r["profiles"]["tiny"]["sample"].update(dense_guidance_scale=0.5), r"dense_guidance_scale"),
        (lambda r: (r["profiles"]["tiny"]["sample"].update(dense_guidance_scale=1.0),
                    r["profiles"]["tiny"]["acceleration"]["approximate"].update(cache={"type": "faster"})),
         r"profiles\.tiny: .*needs sample\.dense_guidance_scale > 1, got 1\.0"),
        (lambda r: r["profiles"]["tiny"]["train"].update(validation_videos=3),
         r"profiles\.tiny\.train: .*validation_videos \(3\) .* at most validation_clips \(2\)"),
        (lambda r: r["profiles"]["small"]["text_encoder"]["config"].update(d_model=128),
         r"profiles\.small: .*transformer\.config\.text_embed_dim 64 must equal .*d_model 128"),
    ],
)
def test_bad_params_name_the_key_and_the_problem(tmp_path, mutate, message):
    path = _write(tmp_path, mutate)
    with pytest.raises(ParamsError, match=message) as err:
        load_params(path)
    assert str(path) in str(err.value)


def test_real_clips_are_guided_by_dense_guidance_scale_or_else_guidance_scale():
    s = load_params(REPO / "params.yaml", profile="tiny").active.sample
    assert s.dense_guidance_scale is None and s.guidance_for_real_clips() == s.guidance_scale == 3.0
    s = load_params(REPO / "params.yaml", profile="small").active.sample
    assert (s.guidance_scale, s.guidance_for_real_clips()) == (6.0, 1.0)
    assert s.model_copy(update={"dense_guidance_scale": 2.5}).guidance_for_real_clips() == 2.5


def test_missing_or_broken_file(tmp_path):
    with pytest.raises(ParamsError, match="file not found"):
        load_params(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("profile: [unclosed")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)


def test_the_small_profile_builds_the_sizes_its_comment_states():
    """`small` (one GPU, minutes): a 100-300M CogVideoX-architecture transformer (issue 12's range),
    and a VAE that turns 17x128x128 clips into the 5x32x32 latents the transformer is sized for."""
    from udpdiff.models.transformer import load_transformer
    from udpdiff.models.vae import build_vae

    p = load_params(REPO / "params.yaml", profile="small")
    a = p.active
    with torch.device("meta"):
        transformer = load_transformer(a.transformer.model_dump(), num_tasks=2, seed=0)
    assert 100e6 < sum(x.numel() for x in transformer.parameters()) < 300e6
    vae = build_vae(a.vae.model_dump(), seed=0)
    with torch.no_grad():
        z = vae.encode(torch.zeros(1, 3, a.data.num_frames, a.data.height, a.data.width)).latent_dist.mode()
    cfg = a.transformer.config
    assert tuple(z.shape[2:]) == ((cfg["sample_frames"] - 1) // 4 + 1, cfg["sample_height"], cfg["sample_width"])
    assert cfg["text_embed_dim"] == a.text_encoder.config["d_model"] and a.data.source == "synthetic"
    assert cfg["max_text_seq_length"] == a.text_encoder.max_length and a.text_encoder.tokenizer == "words"
