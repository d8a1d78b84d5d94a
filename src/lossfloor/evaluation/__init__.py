"""Sample quality: FID/KID with the offline Inception-v3, and a fast classifier Fréchet distance.

The names below load their module (torch; torchmetrics for KID) on first use, so that the
command line can read ``FEATURES`` and ``KID_SUBSETS`` for its options without those imports.
"""

from __future__ import annotations

import importlib
from typing import Any

FEATURES = ("inception", "classifier")
KID_SUBSETS = 100

_EXPORTS = {
    "ClassifierFeatures": "classifier",
    "SmallClassifier": "classifier",
    "load_classifier": "classifier",
    "FeatureStats": "fid",
    "evaluate": "fid",
    "extract_features": "fid",
    "frechet_distance": "fid",
    "kernel_distance": "fid",
    "load_samples": "fid",
    "reference_features": "fid",
    "InceptionFeatures": "inception",
}


def __getattr__(name: str) -> Any:
    """Import the module that defines ``name`` when it is first asked for."""
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)


__all__ = ["FEATURES", "KID_SUBSETS", *_EXPORTS]
