"""udpdiff quiets three known, harmless third-party warnings (torchao present) and nothing else."""

import logging
import subprocess
import sys

import pytest

import udpdiff


def _record(name: str, msg: str) -> logging.LogRecord:
    return logging.LogRecord(name, logging.WARNING, __file__, 1, msg, None, None)


def test_the_filter_drops_the_known_messages_and_passes_others():
    f = udpdiff._KnownThirdPartyNoise()
    assert not f.filter(_record("torch.utils._pytree", "<enum 'X'> is an Enum subclass ... Calling register_constant() "
                                                       "on Enum subclasses is deprecated and will be an error"))
    assert f.filter(_record("torch.utils._pytree", "some other pytree warning"))
    assert not f.filter(_record("diffusers.quantizers.torchao.torchao_quantizer",
                                "Unable to import `torchao` Tensor objects. This may affect loading checkpoints"))
    assert f.filter(_record("diffusers.quantizers.torchao.torchao_quantizer", "anything else"))
    assert f.filter(_record("torchao", "Skipping import of cpp extensions due to incompatible torch version"))


def test_importing_diffusers_after_udpdiff_prints_none_of_them():
    pytest.importorskip("torchao")
    code = "import udpdiff\nfrom diffusers import CogVideoXTransformer3DModel\nimport torchao.optim\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    for noise in ("register_constant() on Enum", "Unable to import `torchao` Tensor objects"):
        assert noise not in out.stderr, out.stderr
    import torch

    if torch.version.cuda is None:
        assert "Failed to load" not in out.stderr, out.stderr
