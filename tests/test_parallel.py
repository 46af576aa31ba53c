"""CFG-parallel sampling (udpdiff.parallel): two ranks share one sample's guidance batch and give
the one-process sample."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from udpdiff.models.transformer import UDPDiffTransformer3DModel
from udpdiff.parallel import BatchSplit, BatchSplitHook, _positional_names

GENERATE = ["generate", "--prompt", "a cube", "--steps", "3", "--height", "32", "--width", "32", "--num-frames", "9",
            "--guidance-scale", "4", "--task", "depth"]


def test_the_hook_reads_positional_inputs_by_their_diffusers_names():
    assert _positional_names(UDPDiffTransformer3DModel(num_layers=1))[:3] == [
        "hidden_states", "encoder_hidden_states", "timestep"]


def test_a_batch_that_does_not_divide_runs_whole():
    """One rank's view of a 2-rank split: an odd batch is left alone (no collective is needed),
    an even one is cut to this rank's slice, task ids and timesteps with it."""
    model = UDPDiffTransformer3DModel(num_layers=1, num_tasks=2)
    hook = BatchSplitHook(BatchSplit(rank=1, world=2))
    hook.initialize_hook(model)
    x, text, t = torch.zeros(3, 1, 32, 4, 4), torch.zeros(3, 5, 8), torch.tensor([1, 2, 3])
    args, kwargs = hook.pre_forward(model, x, text, t, task_id=torch.tensor([0, 1, 1]))
    assert args == (x, text, t) and not hook._active and hook.post_forward(model, "out") == "out"
    x, text, t = torch.arange(4.0).view(4, 1, 1, 1, 1), torch.zeros(4, 5, 8), torch.tensor([10, 11, 12, 13])
    args, kwargs = hook.pre_forward(model, x, encoder_hidden_states=text, timestep=t,
                                    task_id=torch.tensor([0, 0, 1, 1]),
                                    image_rotary_emb=(torch.zeros(4, 2), torch.zeros(4, 2)), return_dict=False)
    assert args == () and hook._active and hook.split.splits == 1
    assert kwargs["hidden_states"].flatten().tolist() == [2.0, 3.0] and kwargs["timestep"].tolist() == [12, 13]
    assert kwargs["task_id"].tolist() == [1, 1] and kwargs["encoder_hidden_states"].shape[0] == 2
    assert kwargs["image_rotary_emb"][0].shape == (4, 2) and kwargs["return_dict"] is False  # shared inputs stay


@pytest.mark.slow
def test_two_ranks_generate_the_one_process_sample(tmp_path, torchrun, tiny_pipeline):
    """``torchrun -m udpdiff.cli generate`` on two CPU ranks (gloo): each runs half of every CFG
    batch and of the VAE decode; rank 0 writes what one process writes. Batch 1 against batch 2
    rounds differently in fp32, so frames agree to one uint8 level, not bit for bit."""
    from udpdiff import cli

    pipe_dir = tmp_path / "pipeline"
    pipe = tiny_pipeline()
    torch.nn.init.normal_(pipe.transformer.task_embedding.weight)
    pipe.save_pretrained(pipe_dir)
    assert cli.main([*GENERATE, "--pipeline", str(pipe_dir), "--out", str(tmp_path / "one")]) == 0
    script = tmp_path / "generate.py"
    script.write_text("import sys\nfrom udpdiff.cli import main\nraise SystemExit(main(sys.argv[1:]))\n")
    proc = torchrun(script, *GENERATE, "--pipeline", pipe_dir, "--out", tmp_path / "two")
    assert proc.stderr.count("CFG-parallel: rank") == 2 and "computed the same sample whole" not in proc.stderr
    assert proc.stdout.count("wrote") == 1  # rank 0 alone writes
    one, two = (np.load(tmp_path / d / "depth-seed0.npz") for d in ("one", "two"))
    for key in ("video", "colormap"):
        assert np.abs(one[key].astype(int) - two[key].astype(int)).max() <= 1, key
    np.testing.assert_allclose(two["dense"], one["dense"], atol=0.02)
    assert not np.array_equal(one["video"], np.zeros_like(one["video"]))


def test_the_split_is_undone(tiny_pipeline):
    """split_cfg_batch hooks the transformer (and the VAE decode); remove_cfg_split restores whole
    batches: the pipeline then samples exactly what it did before."""
    from udpdiff.distributed import Ranks
    from udpdiff.parallel import HOOK_NAME, remove_cfg_split, split_cfg_batch

    kw = dict(task="depth", num_frames=9, height=32, width=32, num_inference_steps=2, guidance_scale=3.0,
              max_sequence_length=16)
    pipe = tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    before = pipe("a cube", generator=torch.Generator().manual_seed(0), **kw).videos
    split = split_cfg_batch(pipe, Ranks(rank=0, world=2))
    assert pipe.batch_split is split and pipe.transformer._diffusers_hook.get_hook(HOOK_NAME) is not None
    assert split_cfg_batch(pipe, Ranks()) is None  # one rank: nothing to split
    remove_cfg_split(pipe)
    assert pipe.batch_split is None and pipe.transformer._diffusers_hook.get_hook(HOOK_NAME) is None
    after = pipe("a cube", generator=torch.Generator().manual_seed(0), **kw).videos
    np.testing.assert_array_equal(after, before)


def test_fastercache_and_cfg_parallel_are_refused_together(tiny_pipeline):
    """FasterCache approximates the unconditional half of the guidance batch from the whole batch,
    which a rank holding half of it does not have."""
    from udpdiff.acceleration import accelerate_pipeline
    from udpdiff.config import AccelerationParams
    from udpdiff.distributed import Ranks
    from udpdiff.parallel import split_cfg_batch

    pipe = tiny_pipeline()
    accelerate_pipeline(pipe, AccelerationParams.model_validate({"approximate": {"cache": {"type": "faster"}}}))
    with pytest.raises(ValueError, match="FasterCache"):
        split_cfg_batch(pipe, Ranks(rank=0, world=2))
    pipe = tiny_pipeline()
    accelerate_pipeline(pipe, AccelerationParams.model_validate({"approximate": {"cache": {"type": "pab"}}}))
    assert split_cfg_batch(pipe, Ranks(rank=0, world=2)) is not None  # PAB caches per call: each rank its own
