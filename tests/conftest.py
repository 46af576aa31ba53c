"""Fixtures shared by test files (helpers live here, never imported from another test file)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = str(Path(sys.executable).parent)
# what a fresh clone would not have: outputs of earlier runs, caches, the venv
TOP_LEVEL_SKIP = {".git", ".venv", "data", "models", "outputs", "mlruns.db", "mlartifacts", ".prefect", ".whl",
                  ".gpu-carry", ".device-out", ".pytest_cache", ".ruff_cache", ".hypothesis"}
ANYWHERE_SKIP = shutil.ignore_patterns("__pycache__", "*.egg-info")


def _ignore(directory: str, names: list[str]) -> set[str]:
    skip = set(ANYWHERE_SKIP(directory, names))
    if Path(directory) == REPO:
        skip |= TOP_LEVEL_SKIP & set(names)
    if Path(directory) == REPO / ".dvc":
        skip |= {"cache", "tmp"} & set(names)
    return skip


def run_checked(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 1500) -> subprocess.CompletedProcess:
    """Run a command; on failure the assertion shows the tails of its output."""
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc


@dataclass
class Workspace:
    """A fresh copy of the repository (a git repo with one commit, as a clone is) and the
    environment a user's shell would give its commands."""

    path: Path
    env: dict[str, str]            # the venv *not* activated: what `make repro` sees
    first_repro: subprocess.CompletedProcess | None = None

    @property
    def activated_env(self) -> dict[str, str]:
        return {**self.env, "PATH": f"{VENV_BIN}{os.pathsep}{self.env['PATH']}"}

    def run(self, *cmd: str, timeout: int = 1500, activated: bool = True) -> subprocess.CompletedProcess:
        return run_checked(list(cmd), self.path, self.activated_env if activated else self.env, timeout)

    def copy(self, dest: Path) -> Workspace:
        """An independent copy (its DVC cache, MLflow store and git history included) to change freely."""
        shutil.copytree(self.path, dest, symlinks=True, ignore=shutil.ignore_patterns(".prefect"))
        env = {**self.env, "PREFECT_HOME": str(dest / ".prefect")}
        return Workspace(dest, env)


def new_workspace(dest: Path) -> Workspace:
    shutil.copytree(REPO, dest, ignore=_ignore)
    # what git tracks under the output folders comes with a clone (the uncached tables and metrics,
    # DVC's .gitignore files): copy exactly those, so the copy meets what a clone meets
    tracked = subprocess.run(["git", "ls-files", "-z", "--", "data", "models", "outputs"], cwd=REPO,
                             capture_output=True, text=True, timeout=60).stdout.split("\0")
    for rel in filter(None, tracked):
        if (REPO / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dest / rel)
    bare_path = os.pathsep.join(d for d in os.environ.get("PATH", "").split(os.pathsep) if d != VENV_BIN)
    env = {**os.environ, "PREFECT_HOME": str(dest / ".prefect"), "PYTHONUNBUFFERED": "1", "PATH": bare_path,
           "GIT_AUTHOR_NAME": "udpdiff-test", "GIT_AUTHOR_EMAIL": "test@udpdiff.invalid",
           "GIT_COMMITTER_NAME": "udpdiff-test", "GIT_COMMITTER_EMAIL": "test@udpdiff.invalid"}
    for var in ("PREFECT_API_URL", "UDPDIFF_MLFLOW_PARENT_RUN_ID", "UDPDIFF_MLFLOW_TRACKING_URI", "UDPDIFF_MLFLOW_TAGS",
                "UDPDIFF_MLFLOW_ARTIFACT_ROOT",
                "UDPDIFF_PREFECT_PARENT_FLOW_RUN_ID", "UDPDIFF_ROOT"):
        env.pop(var, None)
    ws = Workspace(dest, env)
    ws.run("git", "init", "-q", activated=False)
    ws.run("git", "add", "-A", activated=False)
    ws.run("git", "commit", "-q", "-m", "fresh clone", activated=False)
    return ws


@pytest.fixture(scope="session", autouse=True)
def _stop_prefect_temporary_servers():
    """A flow run in this process without PREFECT_API_URL starts Prefect's temporary server, which Prefect
    stops at interpreter exit: by then pytest has closed the stream Prefect logs that to ("--- Logging
    error ---" after the summary). Stopped here, while the session is still up."""
    yield
    if "prefect.server.api.server" in sys.modules:
        from prefect.server.api.server import SubprocessASGIServer

        for server in list(SubprocessASGIServer._instances.values()):
            server.stop()


@pytest.fixture(scope="session")
def repro_workspace(tmp_path_factory) -> Workspace:
    """The whole `tiny` pipeline run once, exactly as `make repro` runs it (venv not activated,
    one shared Prefect server). Read-only: tests that change anything use ``repro_workspace.copy``."""
    ws = new_workspace(tmp_path_factory.mktemp("e2e") / "udpdiff")
    ws.first_repro = ws.run(sys.executable, "-m", "flows", "repro", activated=False)
    return ws


@pytest.fixture(scope="session")
def tiny_mask2former_dir(tmp_path_factory) -> Path:
    """A randomly initialised tiny Mask2Former (tiny Swin backbone, 8 queries, 5 classes) and its image
    processor config, saved hub-shaped (config.json, weights, preprocessor_config.json) for
    ``from_pretrained(path, local_files_only=True)``. Inputs: shortest edge 64, longest 128, sides
    rounded up to multiples of 32."""
    import torch
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig
    from transformers.models.mask2former.image_processing_pil_mask2former import Mask2FormerImageProcessorPil

    swin = SwinConfig(image_size=64, patch_size=4, embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                      window_size=4, out_features=["stage1", "stage2", "stage3", "stage4"])
    # the pixel decoder's GroupNorm(32, ...) needs widths that are multiples of 32
    config = Mask2FormerConfig(backbone_config=swin, feature_size=32, mask_feature_size=32, hidden_dim=32,
                               encoder_feedforward_dim=32, encoder_layers=1, decoder_layers=2, num_attention_heads=2,
                               dim_feedforward=32, num_queries=8, num_labels=5)
    path = tmp_path_factory.mktemp("tiny-mask2former")
    torch.manual_seed(0)
    Mask2FormerForUniversalSegmentation(config).save_pretrained(path)
    Mask2FormerImageProcessorPil(size={"shortest_edge": 64, "longest_edge": 128}, size_divisor=32).save_pretrained(path)
    return path


# --------------------------------------------------------------------------------------------
# Tiny random models of the real classes, saved hub-shaped (config, weights, processor) so that
# from_pretrained(path, local_files_only=True) loads them as it would a downloaded checkpoint
# --------------------------------------------------------------------------------------------

SAM2_TINY_SIZE = 128  # model input size of the tiny SAM2


def _tiny_sam2_video_config():
    from transformers import (
        Sam2HieraDetConfig,
        Sam2VideoConfig,
        Sam2VideoMaskDecoderConfig,
        Sam2VideoPromptEncoderConfig,
        Sam2VisionConfig,
    )

    s = SAM2_TINY_SIZE
    # Constraints of transformers' SAM2 video code (5.x): the memory-attention cross-attention
    # expects 64 memory channels (kv_in_dim is hard-coded), the object-pointer split needs
    # fpn_hidden_size to be a multiple > 1 of those 64 channels, the mask downsampler must match
    # the memory encoder width, and a global-attention Hiera block cannot start a stage.
    backbone = Sam2HieraDetConfig(hidden_size=8, image_size=[s, s], blocks_per_stage=[1, 1, 2, 1],
                                  embed_dim_per_stage=[8, 16, 32, 64], num_attention_heads_per_stage=[1, 1, 1, 1],
                                  window_size_per_stage=[4, 4, 4, 4], global_attention_blocks=[3])
    vision = Sam2VisionConfig(backbone_config=backbone, backbone_channel_list=[64, 32, 16, 8],
                              backbone_feature_sizes=[[s // 4, s // 4], [s // 8, s // 8], [s // 16, s // 16]],
                              fpn_hidden_size=128)
    return Sam2VideoConfig(
        vision_config=vision,
        prompt_encoder_config=Sam2VideoPromptEncoderConfig(hidden_size=128, image_size=s, mask_input_channels=8),
        mask_decoder_config=Sam2VideoMaskDecoderConfig(hidden_size=128, mlp_dim=32, num_hidden_layers=1,
                                                       num_attention_heads=2, iou_head_hidden_dim=16),
        image_size=s, num_maskmem=3, memory_attention_hidden_size=128, memory_attention_num_layers=1,
        memory_attention_feed_forward_hidden_size=32, memory_attention_rope_feat_sizes=[s // 16, s // 16],
        memory_encoder_hidden_size=128, memory_encoder_output_channels=64, mask_downsampler_embed_dim=128,
        memory_fuser_embed_dim=128, memory_fuser_intermediate_dim=32, max_object_pointers_in_encoder=4,
    )


@pytest.fixture(scope="session")
def tiny_sam2_dir(tmp_path_factory) -> Path:
    """A tiny random ``Sam2VideoModel`` (input 128 px) in a folder."""
    import torch
    from transformers import Sam2VideoModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-sam2-video")
    Sam2VideoModel(_tiny_sam2_video_config()).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_depth_anything_dir(tmp_path_factory) -> Path:
    """A tiny random Depth Anything (DINOv2 backbone, 4 layers of 32) with DA-V2's processor settings at
    70 px instead of 518 px, in a folder."""
    import torch
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config, DPTImageProcessor

    from udpdiff.annotators.depth import DEPTH_ANYTHING_V2_PROCESSOR_SETTINGS

    torch.manual_seed(0)
    backbone = Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=37,
                            image_size=70, patch_size=14, out_features=["stage1", "stage2", "stage3", "stage4"],
                            reshape_hidden_states=False)
    config = DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=32, neck_hidden_sizes=[8, 16, 32, 32],
                                 fusion_hidden_size=16, head_hidden_size=8, patch_size=14)
    path = tmp_path_factory.mktemp("tiny-depth-anything")
    DepthAnythingForDepthEstimation(config).eval().save_pretrained(path)
    small = {**DEPTH_ANYTHING_V2_PROCESSOR_SETTINGS, "size": {"height": 70, "width": 70}}
    DPTImageProcessor(**small).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_video_llava_dir(tmp_path_factory) -> Path:
    """A tiny random ``VideoLlavaForConditionalGeneration`` with a character-level tokenizer and its image
    processor (28 px), in a folder, as the real -hf checkpoints are laid out."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        PreTrainedTokenizerFast,
        VideoLlavaConfig,
        VideoLlavaForConditionalGeneration,
        VideoLlavaImageProcessor,
    )

    special = ["<unk>", "<s>", "</s>", "<pad>", "<image>", "<video>"]
    words = special + [chr(c) for c in range(32, 127)]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")  # one token per character
    tok.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", additional_special_tokens=["<image>", "<video>"])
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=28, patch_size=14, projection_dim=32)
    text = LlamaConfig(vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=3,
                       bos_token_id=1, eos_token_id=2)
    config = VideoLlavaConfig(vision_config=vision, text_config=text, image_token_index=4, video_token_index=5,
                              vision_feature_layer=-1)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-video-llava")
    VideoLlavaForConditionalGeneration(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    VideoLlavaImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}).save_pretrained(folder)
    return folder


# --------------------------------------------------------------------------------------------
# Videos with content a real encoder and the curation filters can work on
# --------------------------------------------------------------------------------------------


def _texture(rng, h: int, w: int, tint: tuple[float, float, float]):
    """Procedural texture: smooth blobs plus fine detail, tinted; float (h, w, 3) in [0, 255]."""
    import cv2
    import numpy as np

    coarse = cv2.resize(rng.random((h // 16, w // 16), np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    fine = cv2.GaussianBlur(rng.random((h, w), np.float32), (0, 0), 1.0)
    base = np.clip(0.65 * coarse + 0.7 * (fine - 0.5) + 0.2, 0, 1)
    return np.clip(base[..., None] * np.asarray(tint, np.float32)[None, None] * 255, 0, 255)


def _panning_video(seed: int, n: int, h: int, w: int, dx: int = 2, tint=(1.0, 0.8, 0.6)):
    """A textured canvas panned ``dx`` pixels per frame: (n, h, w, 3) uint8."""
    import numpy as np

    canvas = _texture(np.random.default_rng(seed), h, w + dx * n, tint)
    return np.stack([canvas[:, i * dx : i * dx + w] for i in range(n)]).astype(np.uint8)


@pytest.fixture
def panning_video():
    """``panning_video(seed, n, h, w, dx=2, tint=...)``: a textured canvas panned ``dx`` px per frame."""
    return _panning_video


def _moving_video(t: int = 12, h: int = 48, w: int = 64, speed: float = 2.0):
    """A textured background drifting right plus a soft blob moving diagonally: smooth motion."""
    import numpy as np

    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    frames = []
    for i in range(t):
        cx, cy = 16 + speed * i, 20 + 0.5 * speed * i
        blob = np.clip(1.2 - np.hypot(xx - cx, yy - cy) / 10.0, 0.0, 1.0)
        bg = 0.5 + 0.25 * np.sin((xx + speed * i) / 9.0) * np.cos(yy / 11.0)
        img = np.stack([0.6 * bg + 0.4 * blob, 0.8 * bg, 0.3 + 0.5 * blob], axis=-1)
        frames.append(np.clip(img * 255.0, 0, 255).astype(np.uint8))
    return np.stack(frames)


@pytest.fixture
def moving_video():
    """``moving_video(t=12, h=48, w=64, speed=2.0)``: smooth motion, uint8 (t, h, w, 3)."""
    return _moving_video


@pytest.fixture
def frame_shuffle():
    """A fixed permutation of 12 frame indices: ``video[frame_shuffle]`` is the same frames, jerky."""
    import numpy as np

    return np.array([9, 2, 7, 4, 5, 11, 0, 3, 6, 10, 8, 1])


# --------------------------------------------------------------------------------------------
# A tiny project to sample and evaluate, and several ranks to run a stage on (torchrun, gloo)
# --------------------------------------------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def torchrun():
    """``torchrun(script, *args, nproc=2)``: ``script`` on ``nproc`` ranks of one host (a free port,
    one thread per rank); the completed process, its output shown when it fails."""

    def run(script: Path, *args: str, nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
        import signal

        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(script), *map(str, args)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        # a session of its own: a run past its time is killed with its ranks, none left behind
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            pytest.fail(f"{' '.join(cmd)} ran past {timeout} s:\n{out[-4000:]}\n{err[-6000:]}")
        assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{out[-4000:]}\n{err[-6000:]}"
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err)

    return run


def _save_fake_i3d(path: Path) -> None:
    """A TorchScript stand-in with the StyleGAN-V I3D signature (3 features per video)."""
    import torch

    class Detector(torch.nn.Module):
        def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False,
                    return_features: bool = False) -> torch.Tensor:
            return torch.stack([x.mean((1, 2, 3, 4)), x.amax((1, 2, 3, 4)), x.std((1, 2, 3, 4))], 1)

    torch.jit.script(Detector()).save(str(path))


def _build_tiny_pipeline(conditioning: str = "embedding", given_rgb: str = "noised", tokenizer: str = "byt5",
                         patch_size: int = 2, rotary: bool = False):
    """A tiny random UDPDiffPipeline (2 tasks with the task embedding unless ``conditioning`` says
    otherwise; 9 frames, latent 8x8 = 32x32 video), built as the train stage saves it. ``tokenizer``
    ``words`` learns its words from two captions about cubes and spheres."""
    import torch
    from diffusers import AutoencoderKLCogVideoX

    from udpdiff.models.scheduler import build_scheduler
    from udpdiff.models.text import build_text_encoder
    from udpdiff.models.transformer import UDPDiffTransformer3DModel
    from udpdiff.pipeline import UDPDiffPipeline

    tokenizer, encoder = build_text_encoder({"tokenizer": tokenizer, "config": {"d_model": 32, "d_ff": 64,
                                                        "num_layers": 1, "num_heads": 2, "d_kv": 16}}, seed=0,
                                            captions=["A red cube slides left.", "A blue sphere rolls, spinning."])
    torch.manual_seed(0)
    vae = AutoencoderKLCogVideoX(down_block_types=("CogVideoXDownBlock3D",) * 3,
                                 up_block_types=("CogVideoXUpBlock3D",) * 3, block_out_channels=(8, 8, 8),
                                 latent_channels=16, layers_per_block=1, norm_num_groups=4)
    transformer = UDPDiffTransformer3DModel(num_attention_heads=2, attention_head_dim=16, time_embed_dim=32,
                                            text_embed_dim=32, num_layers=2, sample_width=8, sample_height=8,
                                            sample_frames=9, patch_size=patch_size, max_text_seq_length=16,
                                            use_rotary_positional_embeddings=rotary,
                                            num_tasks=2 if conditioning == "embedding" else 0)
    return UDPDiffPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=vae.eval(), transformer=transformer.eval(),
                           scheduler=build_scheduler({"type": "ddim"}), task_conditioning=conditioning,
                           given_rgb=given_rgb)


@pytest.fixture(scope="session")
def random_vae_dir(tmp_path_factory) -> Path:
    """A small random (untrained) AutoencoderKLCogVideoX saved as the autoencoder stage saves one."""
    from udpdiff.models.vae import build_vae

    path = tmp_path_factory.mktemp("random-vae") / "vae"
    spec = {"config": {"block_out_channels": [16, 32, 32], "layers_per_block": 1, "norm_num_groups": 8,
                       "latent_channels": 16, "temporal_compression_ratio": 4}}
    build_vae(spec, seed=0).save_pretrained(path)
    return path


def _save_tiny_pipeline(path: Path) -> None:
    _build_tiny_pipeline().save_pretrained(path)


@pytest.fixture
def benchmark_script():
    """``benchmark_script("probe_rgb_reliance")``: a ``benchmarks/`` script loaded as a module (the
    folder is not a package a test can import from)."""
    import importlib.util

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture
def tiny_pipeline():
    """``tiny_pipeline(conditioning="embedding", patch_size=2, rotary=False, ...)``: a fresh tiny random
    UDPDiffPipeline (same weights each call)."""
    return _build_tiny_pipeline


@pytest.fixture
def inference_project(tmp_path):
    """``(params, paths)`` of a project under ``tmp_path`` ready for the sample and evaluate stages:
    params.yaml (the tiny profile at 32x32, 3 prompts per task, 2 denoising steps, no runtime trials,
    evaluation chunks of 2 with tiny random DINO and CLIP and an I3D stand-in), 6 synthetic clips (3 in
    the val split) and a tiny random trained pipeline."""
    import torch
    import yaml
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection, ViTConfig, ViTModel

    from udpdiff.config import load_params
    from udpdiff.data.synthetic import synthesize_dataset
    from udpdiff.paths import ProjectPaths

    models = tmp_path / "metric-models"
    torch.manual_seed(0)
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       image_size=224, patch_size=16), add_pooling_layer=False).save_pretrained(models / "dino")
    CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                   num_attention_heads=2, image_size=224, patch_size=32,
                                                   projection_dim=16)).save_pretrained(models / "clip")
    _save_fake_i3d(models / "i3d.pt")
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    tiny = raw["profiles"]["tiny"]
    tiny["data"].update(height=32, width=32)
    tiny["text_encoder"].update(max_length=16)
    tiny["sample"].update(num_samples=3, num_inference_steps=2, runtime_trials=0, gallery_size=2)
    tiny["evaluate"].update(batch_size=2, dino=str(models / "dino"), clip=str(models / "clip"),
                            i3d=str(models / "i3d.pt"))
    raw["profile"] = "tiny"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    p = load_params(tmp_path / "params.yaml")
    paths = ProjectPaths(tmp_path, "tiny")
    synthesize_dataset(paths.clips, num_clips=6, num_frames=9, height=32, width=32, fps=8, seed=3, val_fraction=0.5)
    _save_tiny_pipeline(paths.pipeline)
    return p, paths


@pytest.fixture
def graph_capture_only(monkeypatch):
    """Compiled blocks (``udpdiff.acceleration``) through torch.compile's ``aot_eager`` backend: the
    same graph capture as Inductor (fullgraph, AOTAutograd) without its C++ code generation, which
    costs ~20 s per compile on two cores; dynamo's caches are cleared before and after."""
    import torch

    from udpdiff import acceleration

    monkeypatch.setattr(acceleration, "BACKEND", "aot_eager")
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# --- tiny training runs on a random latent cache (the training, acceleration and GPU tests, dist_worker.py) ---

TRAIN_CLIPS = [f"clip{i}" for i in range(6)]
DEEPSPEED_DIR = REPO / "infra" / "deepspeed"


def tiny_train_params(tmp_path: Path, **train_overrides):
    """``tiny`` shrunk to a one-block 4x4-latent transformer and 6 steps, written to ``tmp_path``."""
    import yaml

    from udpdiff.config import load_params

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    tiny = raw["profiles"]["tiny"]
    tiny["transformer"]["config"].update(sample_height=4, sample_width=4, num_layers=1, max_text_seq_length=8)
    tiny["train"].update({"steps": 6, "micro_batch_size": 2, "checkpoint_every": 2, "keep_last": 2, "log_every": 2,
                          "warmup_steps": 2, **train_overrides})
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_params(path)


def random_latent_cache(tmp_path: Path, text_dim: int = 64) -> Path:
    """A latent cache as the latents stage writes it, with random contents."""
    import torch

    from udpdiff.latents import EMPTY_PROMPT_FILE, record_path, save_record

    g = torch.Generator().manual_seed(0)
    d = tmp_path / "latents"
    d.mkdir()
    for cid in TRAIN_CLIPS:
        rec = {"clip_id": cid}
        for prefix in ("rgb", "segmentation", "depth"):
            rec[f"{prefix}_mean"] = torch.randn(16, 3, 4, 4, generator=g)
            rec[f"{prefix}_std"] = torch.rand(16, 3, 4, 4, generator=g) * 0.1
        for key in ("long", "short", "long:segmentation", "short:segmentation", "long:depth", "short:depth"):
            rec[f"text:{key}"] = torch.randn(8, text_dim, generator=g)
        save_record(record_path(d, cid), rec)
    save_record(d / EMPTY_PROMPT_FILE, {"text:empty": torch.zeros(8, text_dim)})
    return d


def train_tiny(p, latents: Path, ckpt: Path, **kw):
    """``udpdiff.train.train`` on ``random_latent_cache``'s clips."""
    from udpdiff.models.scheduler import build_scheduler
    from udpdiff.train import train

    return train(p, latents, TRAIN_CLIPS, ckpt, scaling_factor=1.0, vae_scale_spatial=4,
                 scheduler=build_scheduler(p.active.scheduler.model_dump()), **kw)


def _markdown_rows(md: str) -> list[list[str]]:
    """Every row of every markdown table in ``md`` as stripped cells (alignment rows left out), so tests
    read cells, not the renderer's padding."""
    rows = []
    for line in md.splitlines():
        if line.startswith("|") and not re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", line):
            rows.append([c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]])
    return rows


@pytest.fixture
def markdown_rows():
    return _markdown_rows
