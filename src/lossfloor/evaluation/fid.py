"""Fréchet distance (FID, FD-classifier) and KID between samples and a dataset's reference set.

Features are extracted once, in batches; the reference set's features and statistics are cached
per dataset in ``$LOSSFLOOR_CACHE/fid`` (default ``~/.cache/lossfloor/fid``) as npz (mean, cov,
n, features), keyed by the dataset fingerprint, the feature extractor and the reference count.
The Fréchet distance is computed here (float64, eigen-based); KID by torchmetrics'
``KernelInceptionDistance`` on the same features.
"""

from __future__ import annotations

import hashlib
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn

from lossfloor.data import Dataset, cache_dir, load_dataset
from lossfloor.errors import ParameterError, UserError
from lossfloor.evaluation import FEATURES, KID_SUBSETS
from lossfloor.evaluation.classifier import ClassifierFeatures
from lossfloor.evaluation.inception import InceptionFeatures
from lossfloor.io import save_with
from lossfloor.progress import progress_bar

METRIC_NAMES = {"inception": "FID", "classifier": "FD-classifier"}
REFERENCE_SEED = 0
KID_SUBSET_SIZE = 1000
_CACHE_VERSION = "fid-reference-v1"


@dataclass(frozen=True)
class FeatureStats:
    """Mean (d), unbiased covariance (d×d, divisor n − 1) and count of a feature set, float64."""

    mean: np.ndarray
    cov: np.ndarray
    n: int

    @classmethod
    def from_features(cls, features: np.ndarray) -> FeatureStats:
        f = np.asarray(features, dtype=np.float64)
        if f.ndim != 2 or len(f) < 2:
            raise UserError(f"statistics need at least 2 feature vectors, got {len(f)}")
        return cls(f.mean(0), np.cov(f, rowvar=False), len(f))


def features_factor(features: np.ndarray) -> np.ndarray:
    """B = (F − mean)ᵀ/√(n − 1), d×n, with B Bᵀ the unbiased covariance of the n×d features F."""
    f = np.asarray(features, dtype=np.float64)
    return (f - f.mean(0)).T / np.sqrt(len(f) - 1)


def _symmetric(c: np.ndarray) -> np.ndarray:
    return (c + c.T) / 2


def _above_rank_tolerance(w: np.ndarray) -> np.ndarray:
    """Eigenvalues above max(w)·dim·eps (numpy's matrix-rank rule); the rest is rounding."""
    return w > max(float(w.max(initial=0.0)), 0.0) * len(w) * np.finfo(np.float64).eps


def covariance_factor(cov: np.ndarray) -> np.ndarray:
    """B = V·diag(√w) over the eigenpairs (w, V) of symmetric PSD ``cov`` above the rank
    tolerance, so that B Bᵀ = cov (d×r, r = numerical rank)."""
    w, v = np.linalg.eigh(_symmetric(np.asarray(cov, np.float64)))
    keep = _above_rank_tolerance(w)
    return v[:, keep] * np.sqrt(w[keep])


def frechet_distance(
    mu1: np.ndarray,
    cov1: np.ndarray,
    mu2: np.ndarray,
    cov2: np.ndarray,
    *,
    factor1: np.ndarray | None = None,
) -> float:
    """FD = ‖μ1 − μ2‖² + tr C1 + tr C2 − 2 tr((C1^½ C2 C1^½)^½), in float64.

    For any B with B Bᵀ = C1 (``factor1``; default ``covariance_factor(C1)``), C1^½ C2 C1^½ has
    the nonzero eigenvalues of the symmetric PSD matrix Bᵀ C2 B, so the last trace is
    Σ √eig(Bᵀ C2 B), exact for the rank-deficient covariances of n ≤ d samples. The centred
    features /√(n − 1) are such a B and avoid the d×d eigendecomposition when n < d."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    cov1, cov2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != mu1.shape * 2:
        raise ValueError(f"mismatched shapes {mu1.shape}, {cov1.shape}, {mu2.shape}, {cov2.shape}")
    b = covariance_factor(cov1) if factor1 is None else np.asarray(factor1, np.float64)
    eig = np.linalg.eigvalsh(_symmetric(b.T @ cov2 @ b))
    trace_sqrt = float(np.sqrt(eig[_above_rank_tolerance(eig)]).sum())
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2 * trace_sqrt)


class Extractor(Protocol):
    """A module mapping a batch of images to its feature rows (any ``nn.Module`` that does)."""

    def to(self, device: torch.device | str) -> Extractor: ...

    def eval(self) -> Extractor: ...

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


class FeatureExtractor(Extractor, Protocol):
    """An ``Extractor`` with a ``name`` (a key of the reference cache) that checks the item
    shape it accepts (``ClassifierFeatures``, ``InceptionFeatures``)."""

    name: str

    def check_shape(self, shape: tuple[int, ...]) -> None: ...


def make_extractor(feature: str) -> FeatureExtractor:
    """``inception`` (2048-d, offline TF weights) or ``classifier`` (128-d, Fashion-MNIST CNN)."""
    if feature == "inception":
        return InceptionFeatures()
    if feature == "classifier":
        return ClassifierFeatures()
    raise ParameterError("feature", feature, f"expected one of {', '.join(FEATURES)} or both")


@torch.inference_mode()
def extract_features(
    extractor: Extractor,
    x: torch.Tensor,
    *,
    batch: int = 32,
    device: torch.device | str = "cpu",
    desc: str = "features",
    progress: bool = True,
) -> np.ndarray:
    """N×d float32 features of images ``x`` (N×C×H×W in [−1, 1]), ``batch`` at a time."""
    if batch < 1:
        raise ParameterError("batch", batch, "must be at least 1")
    extractor = extractor.to(device).eval()
    out = []
    for i in progress_bar(range(0, len(x), batch), desc=desc, enabled=progress):
        out.append(extractor(x[i : i + batch].to(device)).float().cpu())
    return torch.cat(out).numpy()


def reference_indices(n_total: int, n: int) -> torch.Tensor:
    """The reference subset: all items if n = n_total, else the first n of a seed-0 permutation
    (nested: a smaller n takes a prefix of a larger n's subset)."""
    if n >= n_total:
        return torch.arange(n_total)
    return torch.randperm(n_total, generator=torch.Generator().manual_seed(REFERENCE_SEED))[:n]


def _cache_key(dataset: Dataset, extractor_name: str, n: int) -> str:
    return f"{_CACHE_VERSION}|{dataset.sha256}|xflip={dataset.xflip}|{extractor_name}|n={n}"


def reference_cache_path(dataset: Dataset, extractor_name: str, n: int) -> Path:
    """Where the reference features of ``n`` items of ``dataset`` are cached."""
    digest = hashlib.sha256(_cache_key(dataset, extractor_name, n).encode()).hexdigest()[:20]
    return cache_dir() / "fid" / f"{extractor_name}-n{n}-{digest}.npz"


def _read_cache(path: Path, key: str) -> tuple[np.ndarray, FeatureStats] | None:
    """Cached (features, stats) if ``path`` holds them for ``key``; None if absent or stale."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["key"]) != key:
                return None
            return z["features"], FeatureStats(z["mean"], z["cov"], int(z["n"]))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None


def reference_features(
    extractor: FeatureExtractor,
    dataset: Dataset,
    n: int,
    *,
    batch: int = 32,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> tuple[np.ndarray, FeatureStats, bool]:
    """Features and statistics of ``n`` reference items (see ``reference_indices``), from the
    cache when present; returns (features, stats, cache_hit). Written atomically on a miss."""
    if not 2 <= n <= dataset.n:
        raise UserError(
            f"reference count {n}: need 2 ≤ n ≤ {dataset.n} (the size of {dataset.name})"
        )
    path = reference_cache_path(dataset, extractor.name, n)
    key = _cache_key(dataset, extractor.name, n)
    cached = _read_cache(path, key)
    if cached is not None:
        return cached[0], cached[1], True
    x = dataset.x[reference_indices(dataset.n, n)]
    feats = extract_features(
        extractor, x, batch=batch, device=device, desc="reference", progress=progress
    )
    stats = FeatureStats.from_features(feats)

    def save(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, key=key, features=feats, mean=stats.mean, cov=stats.cov, n=stats.n)

    save_with(path, save)
    return feats, stats, False


class _Precomputed(nn.Module):
    """Identity "feature extractor": lets torchmetrics' KID run on features computed once."""

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return f


def kernel_distance(
    ref_features: np.ndarray,
    sample_features: np.ndarray,
    *,
    subsets: int = KID_SUBSETS,
    subset_size: int = KID_SUBSET_SIZE,
    seed: int = 0,
) -> dict:
    """KID (torchmetrics): unbiased MMD² with kernel (f·g/d + 1)³, mean and std over ``subsets``
    random subsets of min(subset_size, n_ref, n_samples) items each, float64, seeded."""
    from torchmetrics.image.kid import KernelInceptionDistance

    size = min(subset_size, len(ref_features), len(sample_features))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        kid = KernelInceptionDistance(feature=_Precomputed(), subsets=subsets, subset_size=size)
    kid.update(torch.from_numpy(np.asarray(ref_features, np.float64)), real=True)
    kid.update(torch.from_numpy(np.asarray(sample_features, np.float64)), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = kid.compute()
    return {
        "kid_mean": float(mean),
        "kid_std": float(std),
        "kid_subsets": subsets,
        "kid_subset_size": size,
    }


def load_samples(path: str | Path, n: int | None = None) -> Dataset:
    """Images from an npz (array ``samples`` if present, else as the data loader reads it), an
    npy, an image folder or an EDM zip, as a Dataset of N×C×H×W float32 in [−1, 1] with its
    fingerprint; the first ``n`` if given."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"samples not found: {p}; give the .npz written by `lossfloor sample`")
    if n is not None and n < 2:
        raise ParameterError("n", n, "a Fréchet distance needs at least 2 samples")
    key = None
    if p.suffix.lower() == ".npz":
        try:
            with np.load(p, allow_pickle=False) as z:
                key = "samples" if "samples" in z.files else None
        except (OSError, ValueError, EOFError, zipfile.BadZipFile):
            key = None  # load_dataset reports the unreadable file
    samples = load_dataset(str(p), key=key, limit=n)
    if samples.x.ndim != 4:
        raise UserError(f"{p}: samples must be images N×C×H×W, got shape {tuple(samples.x.shape)}")
    if n is not None and samples.n < n:
        raise ParameterError("n", n, f"{p} holds only {samples.n} samples; ask for fewer")
    if samples.n < 2:
        raise UserError(f"{p} holds {samples.n} sample; a Fréchet distance needs at least 2")
    return samples


def _check_samples(samples: torch.Tensor, dataset: Dataset) -> None:
    """UserError unless ``samples`` are ≥ 2 finite images of the dataset's item shape."""
    if len(samples) < 2:
        raise UserError(f"{len(samples)} sample given; a Fréchet distance needs at least 2")
    if tuple(samples.shape[1:]) != dataset.shape:
        raise UserError(
            f"samples are {'×'.join(map(str, samples.shape[1:]))} but {dataset.name} items are "
            f"{'×'.join(map(str, dataset.shape))}; compare samples with the data they model"
        )
    if not torch.isfinite(samples).all():
        raise UserError("the samples hold NaN or infinite values; the sampler diverged")


def _score(
    extractor: FeatureExtractor,
    feature: str,
    samples: torch.Tensor,
    dataset: Dataset,
    n_ref: int,
    *,
    batch: int,
    device: torch.device | str,
    seed: int,
    kid_subsets: int,
    progress: bool,
) -> dict:
    """FD and KID of ``samples`` against ``n_ref`` reference items in one feature space."""
    extractor.check_shape(dataset.shape)
    ref_feats, ref_stats, hit = reference_features(
        extractor, dataset, n_ref, batch=batch, device=device, progress=progress
    )
    sample_feats = extract_features(
        extractor, samples, batch=batch, device=device, desc="samples", progress=progress
    )
    stats = FeatureStats.from_features(sample_feats)
    factor = features_factor(sample_feats) if stats.n < stats.mean.shape[0] else None
    fd = frechet_distance(stats.mean, stats.cov, ref_stats.mean, ref_stats.cov, factor1=factor)
    return {
        "metric": METRIC_NAMES[feature],
        "extractor": extractor.name,
        "feature_dim": int(ref_stats.mean.shape[0]),
        "frechet_distance": fd,
        **kernel_distance(ref_feats, sample_feats, subsets=kid_subsets, seed=seed),
        "n_samples": len(samples),
        "n_reference": ref_stats.n,
        "reference_cache_hit": hit,
    }


def evaluate(
    samples: torch.Tensor,
    dataset: Dataset,
    *,
    features: tuple[str, ...] = ("inception",),
    n_reference: int | None = None,
    batch: int = 32,
    device: torch.device | str = "cpu",
    seed: int = 0,
    kid_subsets: int = KID_SUBSETS,
    extractors: dict[str, FeatureExtractor] | None = None,
    progress: bool = True,
) -> dict:
    """Fréchet distance and KID of ``samples`` against ``n_reference`` items of ``dataset``
    (default: as many as there are samples, at most the whole set) in each feature space.

    ``extractors`` maps a feature name to a ready module (default: ``make_extractor``)."""
    if kid_subsets < 1:
        raise ParameterError("kid_subsets", kid_subsets, "must be at least 1")
    _check_samples(samples, dataset)
    n_ref = min(len(samples), dataset.n) if n_reference is None else n_reference
    scores = {}
    for feature in features:
        given = (extractors or {}).get(feature)
        extractor = given if given is not None else make_extractor(feature)
        scores[feature] = _score(
            extractor, feature, samples, dataset, n_ref, batch=batch, device=device, seed=seed,
            kid_subsets=kid_subsets, progress=progress,
        )  # fmt: skip
    return {
        "reference": {
            **dataset.describe(),
            "n_used": n_ref,
            "selection": "all" if n_ref == dataset.n else f"randperm(seed={REFERENCE_SEED})[:n]",
        },
        "n_samples": len(samples),
        "kid_seed": seed,
        "scores": scores,
    }
