"""The ``Dataset`` every command works on, and ``load_dataset`` that resolves a ``--data`` spec."""

from __future__ import annotations

import hashlib
import math
import warnings
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from lossfloor.data.formats import (
    ArrayItems,
    Items,
    NpyFileItems,
    RawData,
    load_edm_zip,
    load_image_folder,
    load_npy,
    load_npz,
    open_edm_zip,
    open_image_folder,
)
from lossfloor.data.formats.latents import (
    LatentTransform,
    is_latent_zip,
    latent_transform,
    load_edm_latents,
)
from lossfloor.data.formats.lightningdit import is_latent_folder, load_lightningdit
from lossfloor.data.sources import NAMED_SOURCES
from lossfloor.errors import ParameterError, UserError

FILE_KINDS = "FILE.npz, FILE.npy, an image FOLDER (PNG/JPEG) or an EDM .zip"
# Divisor d of each scale: x/d − 1 (uint8 0..255 and digits 0..16 both map onto [−1, 1]).
_DIVISORS = {"uint8": 127.5, "digits": 8.0}


@dataclass(frozen=True)
class Dataset:
    """Items in [−1, 1] (N×C×H×W images or N×D vectors), optional labels, a fingerprint.
    With ``std`` (of x's shape), Gaussian items: item i is N(x_i, diag std_i²), the posterior
    of a VAE (``formats.latents``), and ``x`` holds the means; J* is that of their mixture
    (``optimal.mixture``; estimators without the capability 'gaussian' refuse them:
    ``mixture.check_gaussian``). ``latent``: the transform latents were read through to
    final units (raw·scale + bias), recorded so that samples can be mapped back and decoded."""

    name: str
    x: torch.Tensor
    labels: torch.Tensor | None
    sha256: str
    xflip: bool
    std: torch.Tensor | None = None
    latent: LatentTransform | None = None

    def __post_init__(self) -> None:
        if self.x.dtype != torch.float32 or self.x.ndim < 2:
            raise ValueError(f"Dataset.x must be float32 of shape N×..., got {self.x.dtype}")
        if self.std is not None and (
            self.std.dtype != torch.float32 or self.std.shape != self.x.shape
        ):
            raise ValueError("Dataset.std must be float32 of x's shape")
        if self.labels is not None and (
            self.labels.dtype != torch.int64 or self.labels.shape != (len(self.x),)
        ):
            raise ValueError("Dataset.labels must be int64 of shape N")

    @property
    def n(self) -> int:
        """Number of items (mirrored copies included)."""
        return int(self.x.shape[0])

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one item."""
        return tuple(self.x.shape[1:])

    @property
    def dim(self) -> int:
        """Number of elements per item."""
        return math.prod(self.shape)

    @property
    def num_classes(self) -> int | None:
        """Largest label + 1, or None without labels."""
        return None if self.labels is None else int(self.labels.max()) + 1

    @property
    def gaussian(self) -> bool:
        """Whether the items are Gaussians (means ``x``, stds ``std``) rather than points."""
        return self.std is not None

    def flat(self) -> torch.Tensor:
        """The items as an N×D tensor."""
        return self.x.reshape(self.n, self.dim)

    def describe(self) -> dict:
        """What identifies this dataset in a result file."""
        extra: dict[str, object] = {"gaussian_items": True} if self.std is not None else {}
        if self.latent is not None:
            extra["latent_transform"] = self.latent.to_json()
        return {
            "name": self.name,
            "n": self.n,
            "shape": list(self.shape),
            "sha256": self.sha256,
            "xflip": self.xflip,
            "labels": self.labels is not None,
            "num_classes": self.num_classes,
        } | extra


class Fingerprint:
    """``fingerprint`` of an array of ``shape`` (all its rows) fed in consecutive blocks of
    rows: sha256 is sequential, so the blocks' bytes in order give the digest of the whole."""

    def __init__(self, scale: str, dtype: np.dtype, shape: tuple[int, ...]) -> None:
        self.dtype = np.dtype(dtype).newbyteorder("<")
        shape = tuple(int(s) for s in shape)
        self._digest = hashlib.sha256(
            f"lossfloor-data-v1|{scale}|{self.dtype.str}|{shape}|".encode()
        )

    def update(self, rows: np.ndarray) -> None:
        """The next rows (their little-endian bytes)."""
        self._digest.update(np.ascontiguousarray(rows, dtype=self.dtype).data.cast("B"))

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


def fingerprint(values: np.ndarray, scale: str) -> str:
    """sha256 of an unscaled array: its scale rule, dtype, shape and little-endian bytes (the
    one fingerprint of a dataset, in memory or read in chunks: ``Fingerprint``)."""
    digest = Fingerprint(scale, values.dtype, values.shape)
    digest.update(values)
    return digest.hexdigest()


def scale_to_unit(values: np.ndarray, divisor: float) -> torch.Tensor:
    """float32 ``values/divisor − 1``, bit for bit numpy's ``values.astype(float32) / divisor − 1``
    (each float32 operation rounded once), on torch's threads. ``values`` (possibly a read-only
    memory map) are only read."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        source = torch.from_numpy(values)
    return source.to(torch.float32).div_(divisor).sub_(1)


def to_unit(values: np.ndarray, scale: str, where: str) -> torch.Tensor:
    """float32 items in [−1, 1] of unscaled ``values`` (``RawData.scale``): pixel values as
    ``scale_to_unit``, floats as they are (UserError where they hold NaN or ±inf in float32)."""
    if scale != "float":
        return scale_to_unit(values, _DIVISORS[scale])
    with np.errstate(over="ignore"):  # out-of-range float64 becomes inf, reported below
        x = torch.from_numpy(np.array(values, dtype=np.float32))
    nan, inf = int(torch.isnan(x).sum()), int(torch.isinf(x).sum())
    if nan or inf:
        raise UserError(
            f"{where}: the data holds {nan} NaN and {inf} infinite values (in float32); "
            "remove or replace them"
        )
    return x


def posterior_variance(std: torch.Tensor, chunk: int = 4096) -> float:
    """mean(s²) over all elements of Gaussian items' stds, in float64 (in chunks): the
    per-element variance within the items, added to the means' variance in J*(σ → ∞)."""
    flat = std.reshape(len(std), -1)
    total = sum(
        float(flat[i : i + chunk].double().square().sum()) for i in range(0, len(flat), chunk)
    )
    return total / flat.numel()


def mean_and_variance(x: torch.Tensor, chunk: int = 4096) -> tuple[float, float]:
    """Mean of all elements, and the per-element variance across items (1/N) averaged over
    elements — the optimal per-element x0 loss as σ → ∞. Accumulated in float64, in chunks
    converted into one reused buffer."""
    flat = x.reshape(len(x), -1)
    n = flat.shape[0]
    buf = torch.empty(min(chunk, n), flat.shape[1], dtype=torch.float64)

    def chunks() -> Iterator[torch.Tensor]:
        for i in range(0, n, chunk):
            rows = flat[i : i + chunk]
            yield buf[: len(rows)].copy_(rows)

    total = torch.zeros(flat.shape[1], dtype=torch.float64)
    for c in chunks():
        total += c.sum(0)
    mu = total / n
    squares = torch.zeros_like(mu)
    for c in chunks():
        squares += c.sub_(mu).square_().sum(0)
    return float(mu.mean()), float((squares / n).mean())


def _reader(spec: str) -> tuple[Callable[..., RawData], bool]:
    """The function that reads ``spec`` (called with ``limit=``) and whether it is an .npz."""
    if spec in NAMED_SOURCES:
        return NAMED_SOURCES[spec], False
    path = Path(spec).expanduser()
    if path.is_dir():
        return partial(load_image_folder, path), False
    if path.is_file():
        readers: dict[str, Callable[..., RawData]] = {
            ".npz": load_npz,
            ".npy": load_npy,
            ".zip": _load_zip,
        }
        suffix = path.suffix.lower()
        if suffix not in readers:
            raise UserError(
                f"{spec}: unsupported file kind {suffix or '(none)'}; give {FILE_KINDS}"
            )
        return partial(readers[suffix], path), suffix == ".npz"
    if path.suffix or "/" in spec or spec.startswith(("~", ".")):
        raise UserError(f"file or folder not found: {spec}")
    names = ", ".join(NAMED_SOURCES)
    raise UserError(f"unknown dataset {spec!r}: use one of {names}, or a path to {FILE_KINDS}")


def _load_zip(path: Path, *, limit: int | None) -> RawData:
    """An EDM zip of images (``load_edm_zip``) or an EDM2 latent zip (``load_edm_latents``)."""
    try:
        with zipfile.ZipFile(path) as zf:
            latent = is_latent_zip(zf.namelist())
    except (zipfile.BadZipFile, OSError) as exc:
        raise UserError(f"{path} is not a readable zip file ({exc})") from None
    return (load_edm_latents if latent else load_edm_zip)(path, limit=limit)


def open_items(spec: str, *, limit: int | None = None) -> Items:
    """The items of ``spec`` read by rows (``formats.Items``), nothing decoded yet: a named
    source's cached memory map, an ``.npy`` memory map, an image folder or an EDM zip. An
    ``.npz`` is refused (its arrays are read whole)."""
    if limit is not None and limit < 1:
        raise ParameterError("limit", limit, "must be at least 1 (leave it out to use all items)")
    if spec in NAMED_SOURCES:
        raw = NAMED_SOURCES[spec](limit)
        return ArrayItems(raw.values, raw.scale, raw.labels, spec)
    if is_latent_folder(Path(spec).expanduser()):
        raise UserError(f"{spec}: a LightningDiT latent folder is read whole; leave out --stream")
    read, is_npz = _reader(spec)
    if is_npz:
        raise UserError(
            f"{spec}: an .npz is read whole; to stream it, save its array as .npy "
            "(np.save) and give that"
        )
    path = Path(spec).expanduser()
    if path.is_dir():
        return open_image_folder(path, limit=limit)
    if path.suffix.lower() == ".npy":
        return NpyFileItems(path, limit)
    return open_edm_zip(path, limit=limit)


def load_dataset(
    spec: str,
    *,
    limit: int | None = None,
    xflip: bool = False,
    key: str | None = None,
    labels_key: str | None = None,
    encoder: str | None = None,
    latent_scale: Sequence[float] | None = None,
    latent_bias: Sequence[float] | None = None,
) -> Dataset:
    """Load a named source or a file, take the first ``limit`` items, scale to [−1, 1] and
    optionally append horizontally mirrored copies (labels duplicated). Gaussian items (an
    .npz with ``mean`` and ``std``, an EDM2 latent zip: ``formats.latents``) give a Dataset
    with ``std``, in final units through ``encoder`` or ``latent_scale``/``latent_bias``
    (``latents.latent_transform``; required for a latent zip, whose latents are raw); on a
    latent zip, ``key="mean"`` gives the final-unit means as points."""
    if limit is not None and limit < 1:
        raise ParameterError("limit", limit, "must be at least 1 (leave it out to use all items)")
    if spec not in NAMED_SOURCES and is_latent_folder(Path(spec).expanduser()):
        keys = {"key": key, "labels_key": labels_key}
        return _lightningdit_dataset(spec, limit, xflip, keys, encoder, latent_scale, latent_bias)
    transform = latent_transform(encoder, latent_scale, latent_bias)
    read, is_npz = _reader(spec)
    is_zip = spec not in NAMED_SOURCES and Path(spec).suffix.lower() == ".zip"
    if is_npz:
        raw = read(limit=limit, key=key, labels_key=labels_key)
    elif (key is not None and not is_zip) or labels_key is not None:
        param, value = ("key", key) if key is not None else ("labels_key", labels_key)
        raise ParameterError(param, value, f"applies only to .npz files, not to {spec}")
    else:
        raw = read(limit=limit)
    if raw.std is None and transform is not None:
        given = {"encoder": encoder, "latent_scale": latent_scale, "latent_bias": latent_bias}
        raise ParameterError(
            next(p for p, v in given.items() if v is not None), None, "applies only to latent "
            "data (an EDM2 latent zip, or an .npz with arrays mean and std read without a key), "
            f"not to {spec}",
        )  # fmt: skip
    if raw.std is not None or (key is not None and is_zip):
        return _gaussian_dataset(spec, raw, transform, xflip, key, is_zip)
    values = raw.values
    x = to_unit(values, raw.scale, spec)
    labels = None if raw.labels is None else torch.from_numpy(raw.labels.astype(np.int64))
    if xflip:
        if x.ndim != 4:
            raise ParameterError("xflip", True, f"mirrors images, but {spec} holds N×D vectors")
        x = torch.cat([x, x.flip(-1)])
        labels = None if labels is None else torch.cat([labels, labels])
    return Dataset(spec, x, labels, fingerprint(values, raw.scale), xflip)


def _lightningdit_dataset(
    spec: str,
    limit: int | None,
    xflip: bool,
    keys: dict[str, str | None],
    encoder: str | None,
    latent_scale: Sequence[float] | None,
    latent_bias: Sequence[float] | None,
) -> Dataset:
    """A LightningDiT latent folder's 2N points (``formats.lightningdit``): each image's latent
    and its mirrored image's, so the Dataset's mirrored copies are already there."""
    if xflip:
        raise ParameterError("xflip", True, f"{spec} holds each image's mirrored latent already "
                             "(latents_flip)")  # fmt: skip
    for param, value in keys.items():
        if value is not None:
            raise ParameterError(param, value, f"applies only to .npz files, not to {spec}")
    raw = load_lightningdit(Path(spec).expanduser(), limit=limit, encoder=encoder,
                            latent_scale=latent_scale, latent_bias=latent_bias)  # fmt: skip
    labels = None if raw.labels is None else torch.from_numpy(raw.labels.astype(np.int64))
    values = raw.values
    return Dataset(spec, torch.from_numpy(values), labels, fingerprint(values, "float"), True)


def _gaussian_dataset(
    spec: str,
    raw: RawData,
    transform: LatentTransform | None,
    xflip: bool,
    key: str | None,
    is_zip: bool,
) -> Dataset:
    """Gaussian items of ``raw`` (mean ``values``, ``std``) in final units, fingerprinted
    there (mean then std, float32): the same distribution gives the same sha256 however
    stored. ``key="mean"``: the means alone, as points."""
    if raw.std is None:  # a key of an image zip
        raise ParameterError("key", key, f"applies to .npz files and latent zips, not to {spec}")
    if key is not None and key != "mean":
        raise ParameterError("key", key, f"{spec} is an EDM2 latent zip; only 'mean' applies")
    mean, std = raw.values, raw.std
    if transform is not None:
        mean, std = transform.apply(mean, std, spec)
    elif is_zip:
        raise UserError(
            f"{spec}: an EDM2 latent zip holds raw VAE latents; give --encoder sd-vae (EDM2's "
            "Stable Diffusion VAE), --encoder raw, or --latent-scale S --latent-bias B "
            "(per channel) for the final units"
        )
    digest = Fingerprint("gaussian", np.dtype(np.float32), (2, *mean.shape))
    digest.update(mean)
    digest.update(std)
    x, s = torch.from_numpy(mean), torch.from_numpy(std)
    labels = None if raw.labels is None else torch.from_numpy(raw.labels.astype(np.int64))
    if xflip:
        if x.ndim != 4:
            raise ParameterError("xflip", True, f"mirrors images, but {spec} holds N×D vectors")
        x, s = torch.cat([x, x.flip(-1)]), torch.cat([s, s.flip(-1)])
        labels = None if labels is None else torch.cat([labels, labels])
    if key == "mean":
        return Dataset(spec, x, labels, fingerprint(mean, "float"), xflip, latent=transform)
    return Dataset(spec, x, labels, digest.hexdigest(), xflip, s, transform)
