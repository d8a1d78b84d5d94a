"""The one place that turns a path or a name into a denoiser.

``load_model(spec, dataset)`` takes ``optimal`` (the dataset's exact posterior mean), a lossfloor
run directory or checkpoint (``load_run``), a locally saved diffusers UNet2DModel with its
scheduler (``load_diffusers``), or ``python:MODULE:CALLABLE``, a factory returning any
object with EDM's denoiser protocol (``load_python_model``). ``diagnose``, ``sample`` and the
trainer's resume go through here.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lossfloor.data import Dataset
from lossfloor.diffusion.denoiser import Denoiser, read_protocol
from lossfloor.diffusion.schedulers import PREDICTION_TARGETS, scheduler_table
from lossfloor.errors import UserError
from lossfloor.pyspec import PYTHON_PREFIX, cwd_importable, import_callable
from lossfloor.runfiles import CHECKPOINT_LATEST

Tensor = torch.Tensor
DenoiserFn = Callable[..., Tensor]

CHECKPOINT_FORMAT = "lossfloor-run/1"


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> dict[str, Any]:
    """A lossfloor training checkpoint (a dict with ``format`` = CHECKPOINT_FORMAT)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # a truncated or foreign file: say so in one line
        raise UserError(f"{path} is not a readable checkpoint ({type(exc).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not a lossfloor training checkpoint")
    return ckpt


def checkpoint_path(run: str | Path) -> Path:
    """The latest checkpoint of a run directory, or ``run`` itself if it is a file."""
    path = Path(run)
    if path.is_dir():
        return path / CHECKPOINT_LATEST
    if not path.exists():
        raise UserError(f"run directory or checkpoint not found: {path}")
    return path


def check_compatible(config: dict[str, Any], dataset: Dataset) -> None:
    """UserError unless ``dataset`` has the image shape (and labels) the run's model needs."""
    model = config["model"]
    want = tuple(model["image_shape"])
    if tuple(dataset.shape) != want:
        raise UserError(
            f"the model was trained on {'×'.join(map(str, want))} images but {dataset.name} holds "
            f"{'×'.join(map(str, dataset.shape))} items; use data of the model's shape"
        )
    if model["num_classes"] is not None and dataset.labels is None:
        raise UserError(f"the model is class-conditional but {dataset.name} has no labels")


def load_run(
    run: str | Path, ema: bool = True, device: str | torch.device = "cpu"
) -> tuple[Denoiser, dict[str, Any]]:
    """(Denoiser in eval mode, run config) from a run directory or a checkpoint file.

    ``ema=True`` loads the EMA weights (what a run is sampled and diagnosed with). The process
    and target are rebuilt from the full configs the run recorded (``config["process"]``,
    ``config["target"]``), so every parameter (e.g. a VP β range) is the trained one.
    """
    from lossfloor.backbone import UNetBackbone

    path = checkpoint_path(run)
    ckpt = load_checkpoint(path, device)
    config = ckpt["config"]
    net = UNetBackbone(config["model"])
    try:
        net.load_state_dict(ckpt["ema" if ema else "model"])
    except RuntimeError as exc:  # weights of another architecture than the config's
        first = str(exc).strip().splitlines()[-1].strip()
        raise UserError(
            f"{path}: its weights do not fit the model its config describes ({first})"
        ) from None

    num_classes = config["model"].get("num_classes") or 0
    denoiser = Denoiser(net, config["process"], config["target"], config["train"]["sigma_data"],
                        label_dim=num_classes)  # fmt: skip
    return denoiser.to(device).eval().requires_grad_(False), config


def _json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: not a readable JSON config ({type(exc).__name__})") from None


def _diffusers_dirs(root: Path) -> tuple[Path, Path]:
    """(UNet folder, scheduler folder) of a saved pipeline (unet/, scheduler/) or of a UNet saved
    alone with a scheduler_config.json beside its config.json."""
    unet_dir = root / "unet" if (root / "unet").is_dir() else root
    sched_dir = next(
        (
            d
            for d in (root / "scheduler", root, unet_dir)
            if (d / "scheduler_config.json").is_file()
        ),
        None,
    )
    if not (unet_dir / "config.json").is_file():
        raise UserError(f"{root}: no UNet config.json (in {root} or {root / 'unet'})")
    if sched_dir is None:
        raise UserError(
            f"{root}: no scheduler_config.json beside the UNet or in {root / 'scheduler'}; "
            f"save the training scheduler there with scheduler.save_pretrained({str(root)!r})"
        )
    return unet_dir, sched_dir


def load_diffusers_pipeline(path: str | Path, device: str | torch.device = "cpu") -> Denoiser:
    """The Denoiser of ``load_diffusers`` (without its description)."""
    return load_diffusers(path, device)[0]


def _load_diffusers_parts(root: Path) -> tuple[Any, Any, tuple[Path, Path, str]]:
    """The UNet2DModel and the scheduler saved at ``root``, and (UNet folder, scheduler
    folder, scheduler class name)."""
    import diffusers
    from diffusers import UNet2DModel

    unet_dir, sched_dir = _diffusers_dirs(root)
    unet_class = _json(unet_dir / "config.json").get("_class_name")
    if unet_class != "UNet2DModel":
        raise UserError(f"{unet_dir}: a {unet_class} is not supported (only UNet2DModel)")
    sched_class = _json(sched_dir / "scheduler_config.json").get("_class_name")
    scheduler_cls = getattr(diffusers, str(sched_class), None)
    if scheduler_cls is None:
        raise UserError(f"{sched_dir}: unknown scheduler class {sched_class!r}")
    try:
        unet = UNet2DModel.from_pretrained(unet_dir, local_files_only=True)
        scheduler = scheduler_cls.from_pretrained(sched_dir, local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{root}: cannot load the UNet or the scheduler ({first})") from None
    return unet, scheduler, (unet_dir, sched_dir, str(sched_class))  # a diffusers class name


def _unet_channels(cfg: Any, scheduler: Any, unet_dir: Path) -> tuple[int, bool, int]:
    """(image channels C, whether the UNet's 2C outputs are split into mean and learned
    variance, number of classes: 0 if unconditional) of a UNet config."""
    channels, out_channels = cfg.in_channels, cfg.out_channels
    variance = scheduler.config.get("variance_type")
    split = out_channels == 2 * channels and variance in ("learned", "learned_range")
    if out_channels != channels and not split:
        raise UserError(
            f"{unet_dir}: the UNet has {out_channels} output channels for {channels} input "
            f"channels and variance_type {variance!r}; supported: equal counts, or twice as many "
            "with variance_type learned or learned_range"
        )
    if cfg.class_embed_type is not None and cfg.num_class_embeds is None:
        raise UserError(f"{unet_dir}: class_embed_type {cfg.class_embed_type!r} is not "
                        "supported (only num_class_embeds class labels)")  # fmt: skip
    return channels, split, cfg.num_class_embeds or 0


def _diffusers_net(
    unet: Any, root: Path, channels: int, split: bool, num_classes: int
) -> Callable[..., Tensor]:
    """net(x_in, c_noise, labels): the UNet at timesteps c_noise, its mean channels only."""

    def net(x_in: Tensor, c_noise: Tensor, labels: Tensor | None = None) -> Tensor:
        if num_classes and labels is None:
            raise UserError(f"{root}: the UNet is class-conditional; it needs class labels")
        t = c_noise.reshape(-1).expand(x_in.shape[0])
        out = unet(x_in, t, class_labels=labels).sample
        return out[:, :channels] if split else out

    return net


def load_diffusers(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[Denoiser, dict[str, Any]]:
    """A locally saved diffusers UNet2DModel and the scheduler it was trained with, as a
    Denoiser on the scheduler's discrete VP process (timesteps as the noise input), and its
    description (image shape, classes, prediction type, timesteps used).

    Any scheduler with ``alphas_cumprod`` (DDPM, DDIM, Euler, DPM-Solver, …); a zero-terminal-SNR
    table (ᾱ = 0, σ̃ = ∞ at the end) is restricted to its timesteps with ᾱ > 0 (the σ range
    ends at the last finite σ̃; ``timesteps_dropped`` says how many were cut). prediction_type
    epsilon / v_prediction / sample → target eps / v / x0. A class-conditional UNet
    (``num_class_embeds``) takes integer labels; a learned-variance UNet (2C outputs,
    variance_type learned or learned_range) has its variance channels split off as diffusers'
    pipelines do. Anything else is a one-line error naming it.
    """
    from lossfloor.diffusion import VPDiscrete

    root = Path(path)
    unet, scheduler, (unet_dir, sched_dir, sched_class) = _load_diffusers_parts(root)
    table, prediction = scheduler_table(scheduler, str(sched_dir))
    kept = int(table.numel())
    cfg = unet.config
    channels, split, num_classes = _unet_channels(cfg, scheduler, unet_dir)
    net = _diffusers_net(unet, root, channels, split, num_classes)
    denoiser = Denoiser(net, VPDiscrete(table), PREDICTION_TARGETS[prediction],
                        scale_input=False, label_dim=num_classes)  # fmt: skip
    denoiser.unet = unet  # registers the weights with the Module (device moves, eval)
    size = cfg.sample_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    info = {
        "kind": "diffusers",
        "path": str(root),
        "scheduler": sched_class,
        "prediction_type": prediction,
        "timesteps": kept,
        "timesteps_dropped": len(scheduler.alphas_cumprod) - kept,
        "image_shape": [channels, height, width],
        "num_classes": num_classes or None,
        "conditional": num_classes > 0,
    }
    return denoiser.to(device).eval().requires_grad_(False), info


def _image_shape(model: Any) -> list[int] | None:
    """The C×H×W image shape a model declares: EDM's img_channels/img_resolution, or the
    config of a lossfloor backbone (``model.net.config``); None if it declares none."""
    if hasattr(model, "img_channels") and hasattr(model, "img_resolution"):
        res = int(model.img_resolution)
        return [int(model.img_channels), res, res]
    config = getattr(getattr(model, "net", None), "config", None)
    if isinstance(config, dict) and "image_shape" in config:
        return list(config["image_shape"])
    return None


def load_python_model(
    spec: str, device: str | torch.device = "cpu"
) -> tuple[Callable[..., Tensor], dict[str, Any]]:
    """``python:MODULE:CALLABLE``: import MODULE (from sys.path and the current directory), call
    CALLABLE() and return what it returns — any object with EDM's denoiser protocol (callable as
    D(x, sigma, class_labels), with sigma_min and sigma_max; see ``read_protocol``) — moved to
    ``device`` in eval mode, with its description."""
    factory = import_callable(spec, "model")
    try:
        with cwd_importable():
            model = factory()
    except Exception as exc:  # the user's factory failed: say how, in one line
        raise UserError(f"model {spec}: {spec.rpartition(':')[2]}() raised "
                        f"{type(exc).__name__}: {exc}") from None  # fmt: skip
    protocol = read_protocol(model, strict=True)
    if isinstance(model, torch.nn.Module):
        model = model.to(device).eval().requires_grad_(False)
    info = {
        "kind": "python",
        "spec": spec,
        "class": type(model).__name__,
        "sigma_range": [protocol.sigma_min, protocol.sigma_max],
        "image_shape": _image_shape(model),
        "num_classes": protocol.label_dim or None,
        "conditional": protocol.label_dim > 0,
    }
    return model, info


def _is_diffusers_pipeline(path: Path) -> bool:
    if (path / "model_index.json").is_file() or (path / "scheduler").is_dir():
        return True
    config = path / "config.json"
    return config.is_file() and _json(config).get("_class_name") == "UNet2DModel"


def check_model_data(info: dict[str, Any], dataset: Dataset) -> None:
    """UserError unless ``dataset`` has the image shape the model declares (if it declares one)
    and the labels a class-conditional model needs, within its classes."""
    shape = info.get("image_shape")
    if shape is not None and tuple(dataset.shape) != tuple(shape):
        raise UserError(
            f"the model takes {'×'.join(map(str, shape))} images but {dataset.name} holds "
            f"{'×'.join(map(str, dataset.shape))} items; use data of the model's shape"
        )
    if info.get("conditional"):
        if dataset.labels is None:
            raise UserError(f"the model is class-conditional but {dataset.name} has no labels")
        classes = info.get("num_classes")
        if classes and int(dataset.labels.max()) >= classes:
            raise UserError(f"{dataset.name} has labels up to {int(dataset.labels.max())} but "
                            f"the model knows {classes} classes")  # fmt: skip


def load_model(
    spec: str, dataset: Dataset | None, device: str | torch.device = "cpu", ema: bool = True
) -> tuple[DenoiserFn, dict[str, Any]]:
    """``optimal`` | ``python:MODULE:CALLABLE`` | a lossfloor run directory or checkpoint | a
    saved diffusers pipeline or UNet, as (denoiser, description); the description holds
    ``image_shape``, ``num_classes`` and ``conditional`` where known. Given a ``dataset``, the
    model is checked against its shape and labels (``optimal`` needs one)."""
    if spec == "optimal":
        if dataset is None:
            raise UserError("model 'optimal' is the posterior mean of a dataset; give the data")
        from lossfloor.optimal import OptimalDenoiser

        return OptimalDenoiser(dataset), {"kind": "optimal", "conditional": False,
                                          "image_shape": list(dataset.shape)}  # fmt: skip
    if spec.startswith(PYTHON_PREFIX):
        model, info = load_python_model(spec, device)
    else:
        path = Path(spec)
        if not path.exists():
            raise UserError(
                f"model not found: {spec} (a run directory, checkpoint, saved diffusers "
                "pipeline or UNet, python:MODULE:CALLABLE, or 'optimal')"
            )
        if _is_diffusers_pipeline(path):
            model, info = load_diffusers(path, device)
        else:
            model, config = load_run(path, ema=ema, device=device)
            if dataset is not None:
                check_compatible(config, dataset)
            num_classes = config["model"].get("num_classes")
            info = {"kind": "lossfloor-run", "path": str(path), "ema": ema,
                    "image_shape": list(config["model"]["image_shape"]),
                    "num_classes": num_classes, "conditional": num_classes is not None,
                    "config": config}  # fmt: skip
    if dataset is not None:
        check_model_data(info, dataset)
    return model, info
