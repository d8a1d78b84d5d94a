"""A small CNN classifier for 28×28 grayscale images whose penultimate features give a fast
Fréchet distance ("FD-classifier").

The committed weights (``lossfloor/assets/fmnist_classifier.pt``) were trained on Fashion-MNIST
by ``benchmarks/train_classifier.py``; ``fmnist_classifier.json`` beside them records the
architecture, the test accuracy and the command.
"""

from __future__ import annotations

import hashlib
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from lossfloor.errors import UserError

IMAGE_SHAPE = (1, 28, 28)
FEATURE_DIM = 128
NUM_CLASSES = 10
ASSET_NAME = "fmnist_classifier"


def _block(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]


class SmallClassifier(nn.Module):
    """conv32 → pool → conv64 ×2 → pool → conv128 → global average pool (128-d features)
    → linear head. Inputs: N×1×28×28 in [−1, 1]."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.body = nn.Sequential(
            *_block(1, 32),
            nn.MaxPool2d(2),
            *_block(32, 64),
            *_block(64, 64),
            nn.MaxPool2d(2),
            *_block(64, FEATURE_DIM),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(FEATURE_DIM, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features, N×128."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits, N×10."""
        return self.head(self.body(x))


def default_weights_path() -> Path:
    """The committed Fashion-MNIST weights inside the installed package."""
    return Path(str(resources.files("lossfloor") / "assets" / f"{ASSET_NAME}.pt"))


def load_classifier(path: str | Path | None = None) -> SmallClassifier:
    """The classifier with weights from ``path`` (default: the committed ones), in eval mode."""
    p = Path(path) if path is not None else default_weights_path()
    if not p.is_file():
        raise UserError(
            f"classifier weights not found at {p}; train them with "
            "`python benchmarks/train_classifier.py` or use --feature inception"
        )
    model = SmallClassifier()
    try:
        model.load_state_dict(torch.load(p, map_location="cpu", weights_only=True))
    except (RuntimeError, ValueError, OSError) as exc:
        raise UserError(f"{p} does not hold SmallClassifier weights ({exc})") from None
    return model.eval().requires_grad_(False)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, batch: int = 500) -> float:
    """Fraction of items whose arg-max logit equals the label."""
    correct = 0
    for i in range(0, len(x), batch):
        correct += int((model(x[i : i + batch]).argmax(1) == labels[i : i + batch]).sum())
    return correct / len(x)


class ClassifierFeatures(nn.Module):
    """Feature extractor: N×1×28×28 images in [−1, 1] → N×128 penultimate features."""

    num_features = FEATURE_DIM

    def __init__(self, path: str | Path | None = None) -> None:
        super().__init__()
        weights = Path(path) if path is not None else default_weights_path()
        self.model = load_classifier(weights)
        digest = hashlib.sha256(weights.read_bytes()).hexdigest()[:12]
        self.name = f"{ASSET_NAME}-{digest}"

    def check_shape(self, shape: tuple[int, ...]) -> None:
        """Raise a UserError unless items are 1×28×28 images."""
        if tuple(shape) != IMAGE_SHAPE:
            raise UserError(
                f"classifier features need 1×28×28 grayscale images, got items of shape "
                f"{'×'.join(map(str, shape))}; use --feature inception"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.embed(x.float())
