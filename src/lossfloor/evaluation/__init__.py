"""Sample quality: FID/KID with the offline Inception-v3, and a fast classifier Fréchet distance."""

from lossfloor.evaluation.classifier import ClassifierFeatures, SmallClassifier, load_classifier
from lossfloor.evaluation.fid import (
    FeatureStats,
    evaluate,
    extract_features,
    frechet_distance,
    kernel_distance,
    load_samples,
    reference_features,
)
from lossfloor.evaluation.inception import InceptionFeatures

__all__ = [
    "ClassifierFeatures",
    "FeatureStats",
    "InceptionFeatures",
    "SmallClassifier",
    "evaluate",
    "extract_features",
    "frechet_distance",
    "kernel_distance",
    "load_classifier",
    "load_samples",
    "reference_features",
]
