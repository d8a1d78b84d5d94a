"""Datasets: named sources (digits, Fashion-MNIST, MNIST-10k) and user files, as a ``Dataset``."""

from lossfloor.data.cache import cache_dir
from lossfloor.data.dataset import Dataset, fingerprint, load_dataset, mean_and_variance
from lossfloor.data.sources import NAMED_SOURCES

__all__ = [
    "NAMED_SOURCES",
    "Dataset",
    "cache_dir",
    "fingerprint",
    "load_dataset",
    "mean_and_variance",
]
