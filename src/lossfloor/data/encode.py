"""``lossfloor encode``: pixel data → each item's VAE posterior N(m, diag s²), written as EDM2's
``dataset_tool.py encode`` writes a latent zip, which ``formats.latents`` (and EDM2's
``training/dataset.py`` ImageFolderDataset) read.

The layout: item i is the member ``NNNNN/img-mean-std-IIIIIIII.npy`` (IIIIIIII = i in 8 digits,
NNNNN its first 5, i.e. i // 1000), ``np.save`` of a float32 (2C, h, w) array: the mean on the
first C channels, the std on the last C (diffusers' ``latent_dist.mean`` and ``.std`` =
exp(½·logvar)); then ``dataset.json`` ``{"labels": [[member, label], ...]}`` or
``{"labels": null}``. Members are stored uncompressed (as EDM2) with a fixed time (1980-01-01),
so the same input gives the same bytes. ``dataset.json`` also holds ``"vae"`` (what encoded,
diffusers' ``scaling_factor``/``shift_factor``, the pixel range) and ``"latent_statistics"``
(per channel: mean and std of the means, mean of the stds, std of the sampled latents
√(Var m + E s²)); EDM2's loaders and lossfloor's read only ``"labels"``.

Resumable: each finished batch is saved atomically in a folder beside the output
(``OUT.partial/batch-KKKKKKKK.npz``: its latents and the sha256 of its pixels) under a key of
the VAE, the batch size, the pixel range, the item count and shape and the device; a rerun
skips those batches (their pixels read again and checked) and the zip is written atomically at
the end from the saved batches, which are then removed.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lossfloor.data.dataset import _reader, open_items, to_unit
from lossfloor.data.formats import LABELS_FILE, ArrayItems, Items
from lossfloor.data.formats.latents import LATENT_SUFFIX, is_latent_zip
from lossfloor.device import resolve_device
from lossfloor.errors import Interrupted, ParameterError, UserError
from lossfloor.io import atomic_path, read_json, write_json
from lossfloor.progress import progress_bar
from lossfloor.pyspec import PYTHON_PREFIX, cwd_importable, import_callable

if TYPE_CHECKING:
    import torch

#: The pixel ranges a VAE may take: diffusers' [−1, 1], or [0, 1] as EDM2's StabilityVAEEncoder
#: feeds the SD VAE (x/255; its raw_mean/raw_std assume it).
PIXEL_RANGES = {"signed": (-1.0, 1.0), "unit": (0.0, 1.0)}
PARTIAL_KEY = "key.json"
#: A member's time: fixed, so that one input gives one zip, byte for byte.
MEMBER_TIME = (1980, 1, 1, 0, 0, 0)
#: The layout of the partial batches; a change makes older ones another key.
_PARTIAL_VERSION = 1


def latent_member(index: int) -> str:
    """The zip member of item ``index``, as EDM2's dataset_tool.py names it."""
    idx = f"{index:08d}"
    return f"{idx[:5]}/img-mean-std-{idx}{LATENT_SUFFIX}"


@dataclass(frozen=True)
class Encoder:
    """A VAE's encoder: ``encode(pixels)`` of a B×C×H×W float32 batch in ``pixel_range``, on
    the encoder's device, → (mean, std), each B×c×h×w float32 on the cpu."""

    encode: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    identity: str  # sha256 of an AutoencoderKL's config and weights; the spec of a callable
    info: dict[str, Any]  # recorded in dataset.json under "vae"
    in_channels: int | None = None
    factor: int | None = None  # the spatial downsampling, where known
    device: Any = field(default=None, compare=False)


def load_vae(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> Any:
    """The diffusers ``AutoencoderKL`` that ``save_pretrained`` wrote in folder ``path`` (or in
    ``path/vae``, a saved pipeline's), on ``device`` in eval mode without gradients; a missing
    folder, a file, or a folder holding no AutoencoderKL is one line."""
    import torch
    from diffusers import AutoencoderKL

    given = Path(path).expanduser()
    if not given.exists():
        raise ParameterError("vae", str(path), "not found; give the folder that AutoencoderKL"
                             ".save_pretrained wrote, or python:MODULE:CALLABLE")  # fmt: skip
    if not given.is_dir():
        raise ParameterError("vae", str(path), "is a file; give the folder that AutoencoderKL"
                             ".save_pretrained wrote (config.json and weights)")  # fmt: skip
    folder = given
    if not (given / "config.json").is_file() and (given / "vae" / "config.json").is_file():
        folder = given / "vae"  # a saved pipeline: its VAE
    if not (folder / "config.json").is_file():
        raise ParameterError("vae", str(path), "holds no config.json: not a diffusers "
                             "AutoencoderKL folder (write one with save_pretrained)")  # fmt: skip
    config = read_json(folder / "config.json")
    kind = config.get("_class_name") if isinstance(config, dict) else None
    if kind != "AutoencoderKL":
        raise ParameterError("vae", str(path), f"config.json describes "
                             f"{kind or 'no diffusers class'}, not an AutoencoderKL")  # fmt: skip
    try:
        vae = AutoencoderKL.from_pretrained(folder, torch_dtype=torch.float32)
    except Exception as exc:  # diffusers' own failure (weights missing, shapes): one line
        reason = " ".join(str(exc).split())[:300]
        raise ParameterError("vae", str(path), f"loading the AutoencoderKL failed "
                             f"({type(exc).__name__}: {reason})") from None  # fmt: skip
    return vae.to(resolve_device(device)).eval().requires_grad_(False)


def _weights_sha256(module: Any) -> str:
    """sha256 of a module's config (without diffusers' private keys: ``_name_or_path``, the
    version) and every state-dict tensor (name, dtype, shape, bytes)."""
    import torch

    config = {k: v for k, v in dict(module.config).items() if not k.startswith("_")}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def open_encoder(spec: str, device: str | torch.device = "auto") -> Encoder:
    """The encoder ``spec`` names: a folder holding a diffusers AutoencoderKL (``load_vae``), or
    ``python:MODULE:CALLABLE``, called with each pixel batch (a B×C×H×W float32 tensor on
    ``device``) and returning (mean, std) of one B×c×h×w shape (tensors or arrays); the
    callable's own code is not part of the resume key, its spec is."""
    import torch

    dev = resolve_device(device)
    if spec.startswith(PYTHON_PREFIX):
        fn = import_callable(spec, "vae")
        name = spec.rpartition(":")[2]

        def call(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            try:
                with cwd_importable():
                    out = fn(pixels)
            except Exception as exc:  # the user's callable failed: say how, in one line
                raise UserError(
                    f"vae {spec}: {name}() raised {type(exc).__name__}: {exc}"
                ) from None
            return _checked_output(out, len(pixels), spec)

        info: dict[str, Any] = {"source": spec, "class": "python callable"}
        return Encoder(call, spec, info, device=dev)
    vae = load_vae(spec, dev)

    @torch.inference_mode()
    def run(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = vae.encode(pixels).latent_dist
        return dist.mean.float().cpu(), dist.std.float().cpu()

    cfg = vae.config
    info = {
        "source": str(spec),
        "class": "AutoencoderKL",
        "latent_channels": int(cfg.latent_channels),
        "scaling_factor": cfg.get("scaling_factor"),
        "shift_factor": cfg.get("shift_factor"),
        "latents_mean": cfg.get("latents_mean"),  # diffusers' per-channel normalisation, if set
        "latents_std": cfg.get("latents_std"),
    }
    factor = 2 ** (len(cfg.block_out_channels) - 1)
    return Encoder(run, _weights_sha256(vae), info, int(cfg.in_channels), factor, dev)


def _checked_output(out: Any, batch: int, spec: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A callable's (mean, std): two float arrays of one B×c×h×w shape, finite, std ≥ 0, as
    float32 cpu tensors."""
    import torch

    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise UserError(f"vae {spec}: returned {type(out).__name__}; return (mean, std)")
    pair = []
    for label, value in zip(("mean", "std"), out, strict=True):
        t = torch.as_tensor(value) if isinstance(value, (torch.Tensor, np.ndarray)) else None
        if t is None or not t.is_floating_point():
            what = type(value).__name__ if t is None else str(t.dtype)
            raise UserError(f"vae {spec}: its {label} is {what}; return float tensors")
        pair.append(t.detach().float().cpu())
    mean, std = pair
    if mean.shape != std.shape or mean.ndim != 4 or len(mean) != batch:
        raise UserError(
            f"vae {spec}: returned mean {tuple(mean.shape)} and std {tuple(std.shape)} for "
            f"{batch} images; return two arrays of shape {batch}×c×h×w"
        )
    if not (torch.isfinite(mean).all() and torch.isfinite(std).all()):
        raise UserError(f"vae {spec}: returned NaN or infinite values")
    if (std < 0).any():
        raise UserError(f"vae {spec}: returned a negative std; a std is ≥ 0")
    return mean, std


def pixel_items(
    spec: str, *, limit: int | None = None, key: str | None = None, labels_key: str | None = None
) -> Items:
    """The images of ``spec`` read by rows (``open_items``; an .npz read whole, with ``key`` and
    ``labels_key``); latent data and N×D vectors are refused."""
    if limit is not None and limit < 1:
        raise ParameterError("limit", limit, "must be at least 1 (leave it out to use all items)")
    read, is_npz = _reader(spec)
    if is_npz:
        raw = read(limit=limit, key=key, labels_key=labels_key)
        if raw.std is not None:
            raise UserError(f"{spec} holds latents (arrays mean and std); encode takes pixels")
        items: Items = ArrayItems(raw.values, raw.scale, raw.labels, spec)
    elif key is not None or labels_key is not None:
        param, value = ("key", key) if key is not None else ("labels_key", labels_key)
        raise ParameterError(param, value, f"applies only to .npz files, not to {spec}")
    else:
        path = Path(spec).expanduser()
        if path.suffix.lower() == ".zip" and path.is_file() and zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                if is_latent_zip(zf.namelist()):
                    raise UserError(f"{spec} is an EDM2 latent zip; encode takes pixels")
        items = open_items(spec, limit=limit)
    if len(items.shape) != 3:
        raise UserError(
            f"{spec} holds vectors of {math.prod(items.shape)} numbers; encode takes images (C×H×W)"
        )
    return items


def _pixels(rows: np.ndarray, scale: str, where: str, pixel_range: str) -> torch.Tensor:
    """float32 pixels of unscaled ``rows``: [−1, 1] as ``load_dataset`` scales them, or [0, 1]
    (uint8 values v/255 as EDM2, other data (x + 1)/2)."""
    import torch

    if pixel_range == "unit":
        if scale == "uint8":
            return torch.from_numpy(rows.astype(np.float32)).div_(255)
        return to_unit(rows, scale, where).add_(1).mul_(0.5)
    return to_unit(rows, scale, where)


def _rows_sha256(rows: np.ndarray) -> str:
    digest = hashlib.sha256(f"{rows.dtype.str}:{rows.shape}".encode())
    digest.update(np.ascontiguousarray(rows).tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class EncodeSummary:
    """What ``encode_dataset`` wrote: ``n`` items of ``image_shape`` into ``out`` as latents
    of ``latent_shape`` (2C×h×w: mean and std), ``resumed`` of them from the partial batches,
    in ``seconds``; ``meta`` is dataset.json without the labels."""

    out: Path
    n: int
    image_shape: tuple[int, ...]
    latent_shape: tuple[int, ...]
    resumed: int
    seconds: float
    meta: dict[str, Any]


def encode_dataset(
    data: str,
    vae: str | Encoder,
    out: str | os.PathLike[str],
    *,
    limit: int | None = None,
    key: str | None = None,
    labels_key: str | None = None,
    batch: int = 64,
    pixel_range: str = "signed",
    device: str | torch.device = "auto",
    partial: str | os.PathLike[str] | None = None,
    restart: bool = False,
    progress: bool = True,
) -> EncodeSummary:
    """Encode the images of ``data`` (any spec ``load_dataset`` reads, images only) with
    ``vae`` (``open_encoder``'s spec, or an ``Encoder``) in batches of ``batch``, pixels in
    ``pixel_range`` (``PIXEL_RANGES``), into the EDM2 latent zip ``out`` (module docstring),
    resuming from the batches in ``partial`` (default ``OUT.partial``) unless ``restart``."""
    import torch

    out = Path(out)
    if out.suffix.lower() != ".zip":
        raise ParameterError("out", str(out), "give a .zip file (EDM2's latent zip layout)")
    if batch < 1:
        raise ParameterError("batch", batch, "must be at least 1")
    if pixel_range not in PIXEL_RANGES:
        raise ParameterError("pixel_range", pixel_range, f"use one of {', '.join(PIXEL_RANGES)}")
    items = pixel_items(data, limit=limit, key=key, labels_key=labels_key)
    try:
        encoder = vae if isinstance(vae, Encoder) else open_encoder(vae, device)
        _check_fits(encoder, items.shape, data)
    except BaseException:
        items.close()
        raise
    folder = Path(partial) if partial is not None else out.with_name(out.name + ".partial")
    run_key = {
        "version": _PARTIAL_VERSION,
        "vae": encoder.identity,
        "batch": batch,
        "pixel_range": pixel_range,
        "n": items.n,
        "shape": list(items.shape),
        "device": torch.device(encoder.device or "cpu").type,
    }
    _open_partial(folder, run_key, restart)
    started, resumed = time.monotonic(), 0
    bar = progress_bar(total=items.n, desc="encode", unit="img", enabled=progress)
    batches = range(0, items.n, batch)
    try:
        for k, lo in enumerate(batches):
            hi = min(lo + batch, items.n)
            rows = items.read(lo, hi)
            digest = _rows_sha256(rows)
            path = folder / f"batch-{k:08d}.npz"
            if path.is_file():
                _check_saved(path, digest, hi - lo, k)
                resumed += hi - lo
            else:
                x = _pixels(rows, items.scale, data, pixel_range).to(encoder.device)
                mean, std = encoder.encode(x)
                latents = torch.cat([mean, std], dim=1).numpy().astype(np.float32, copy=False)
                _save_batch(path, latents, digest)
            bar.update(hi - lo)
    except KeyboardInterrupt:
        raise Interrupted(
            f"the batches encoded so far are kept in {folder}; the same command continues "
            "from there"
        ) from None
    finally:
        bar.close()
        items.close()
    meta, latent_shape = _write_zip(out, folder, len(batches), items.labels, encoder, pixel_range)
    _remove_partial(folder)
    return EncodeSummary(out, items.n, tuple(items.shape), latent_shape, resumed,
                         time.monotonic() - started, meta)  # fmt: skip


def _check_fits(encoder: Encoder, shape: tuple[int, ...], data: str) -> None:
    """The images' channels are the VAE's ``in_channels``, their sides multiples of its
    downsampling (else the latents would not decode to the images' size)."""
    channels, height, width = shape
    if encoder.in_channels is not None and channels != encoder.in_channels:
        raise UserError(
            f"{data} holds {channels}-channel images but the VAE takes {encoder.in_channels} "
            "channels (its config's in_channels); give data with as many channels"
        )
    f = encoder.factor
    if f is not None and (height % f or width % f):
        raise UserError(
            f"{data} holds {height}×{width} images, but the VAE downsamples by {f}: crop or pad "
            f"them to multiples of {f}"
        )


def _open_partial(folder: Path, run_key: dict[str, Any], restart: bool) -> None:
    """Make ``folder`` hold the batches of ``run_key``: new, kept (same key), or emptied
    (``restart``); another key, or a folder that is no encode's, is refused."""
    key_file = folder / PARTIAL_KEY
    if folder.exists() and not restart:
        try:
            saved = read_json(key_file)
        except UserError:
            saved = None
        if not isinstance(saved, dict):
            raise ParameterError("restart", None, f"{folder} exists but is no partial encode; "
                                 "delete it, or set {option} to empty it")  # fmt: skip
        if saved != run_key:
            done = len(list(folder.glob("batch-*.npz")))
            raise ParameterError(
                "restart", None, f"{folder} holds {done} batches encoded with another VAE, "
                "batch size, pixel range, data size or device; rerun with those, or set "
                "{option} to discard them",
            )  # fmt: skip
        return
    if folder.exists():
        _remove_partial(folder)
    try:
        folder.mkdir(parents=True)
    except OSError as exc:
        raise UserError(f"cannot create {folder} ({exc.strerror})") from None
    write_json(key_file, run_key)


def _remove_partial(folder: Path) -> None:
    """Delete the partial batches and their key, then the folder (left, with a one-line error,
    where it holds anything else)."""
    if not folder.is_dir():
        if folder.exists():
            raise UserError(f"{folder} is a file; delete it (the encode keeps its batches there)")
        return
    for path in [*folder.glob("batch-*.npz"), *folder.glob(".batch-*"), folder / PARTIAL_KEY]:
        path.unlink(missing_ok=True)
    try:
        folder.rmdir()
    except OSError:
        raise UserError(f"{folder} holds files other than an encode's batches; move them and "
                        "delete the folder") from None  # fmt: skip


def _save_batch(path: Path, latents: np.ndarray, pixels_sha256: str) -> None:
    """One batch's latents and the sha256 of its pixels, written atomically."""
    with atomic_path(path) as tmp, tmp.open("wb") as f:
        np.savez(f, latents=latents, pixels=np.array(pixels_sha256))


def _load_batch(path: Path) -> tuple[np.ndarray, str]:
    try:
        with np.load(path, allow_pickle=False) as saved:
            return saved["latents"], str(saved["pixels"])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise UserError(f"{path} is not a readable batch ({exc}); delete it to encode it "
                        "again") from None  # fmt: skip


def _check_saved(path: Path, digest: str, rows: int, k: int) -> None:
    """A saved batch holds ``rows`` latents of the pixels hashed to ``digest``."""
    latents, pixels = _load_batch(path)
    if pixels != digest or len(latents) != rows:
        raise ParameterError("restart", None, f"{path.parent}: batch {k} was encoded from "
                             "other pixels (the data changed); set {option} to encode "
                             "everything again")  # fmt: skip


def _write_zip(
    out: Path,
    folder: Path,
    batches: int,
    labels: np.ndarray | None,
    encoder: Encoder,
    pixel_range: str,
) -> tuple[dict[str, Any], tuple[int, ...]]:
    """The zip from the saved batches (atomically): one member per item, then dataset.json
    with the labels, the VAE and the per-channel statistics (float64 sums)."""
    names: list[str] = []
    sums: dict[str, np.ndarray] = {}
    count, shape = 0, (0, 0, 0)
    with atomic_path(out) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
        for k in range(batches):
            latents, _ = _load_batch(folder / f"batch-{k:08d}.npz")
            if k == 0:
                shape = tuple(latents.shape[1:])
            elif latents.shape[1:] != shape:
                raise UserError(f"the VAE gave {'×'.join(map(str, shape))} latents for batch 0 "
                                f"but {'×'.join(map(str, latents.shape[1:]))} for batch {k}; "
                                "every item needs one shape")  # fmt: skip
            c = shape[0] // 2
            m, s = latents[:, :c].astype(np.float64), latents[:, c:].astype(np.float64)
            for name, v in (("m", m), ("m2", m * m), ("s", s), ("s2", s * s)):
                sums[name] = sums.get(name, np.zeros(c)) + v.sum(axis=(0, 2, 3))
            count += len(latents) * shape[1] * shape[2]
            for item in latents:
                buf = io.BytesIO()
                np.save(buf, np.ascontiguousarray(item))
                names.append(latent_member(len(names)))
                _write_member(zf, names[-1], buf.getvalue())
        entries = (
            None if labels is None else [[n, int(v)] for n, v in zip(names, labels, strict=True)]
        )
        mean = sums["m"] / count
        var_m = np.maximum(sums["m2"] / count - mean**2, 0)
        meta = {
            "vae": {**encoder.info, "pixel_range": list(PIXEL_RANGES[pixel_range])},
            "latent_statistics": {
                "mean_of_means": mean.tolist(),
                "std_of_means": np.sqrt(var_m).tolist(),
                "mean_of_stds": (sums["s"] / count).tolist(),
                "std_of_samples": np.sqrt(var_m + sums["s2"] / count).tolist(),
            },
        }
        _write_member(zf, LABELS_FILE, json.dumps({"labels": entries, **meta}).encode())
    return meta, tuple(shape)


def _write_member(zf: zipfile.ZipFile, name: str, data: bytes) -> None:
    info = zipfile.ZipInfo(name, date_time=MEMBER_TIME)
    info.external_attr = 0o644 << 16
    zf.writestr(info, data, compress_type=zipfile.ZIP_STORED)
