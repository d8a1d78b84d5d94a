"""The one place that turns a path or a name into a denoiser.

``load_model(spec, dataset)`` takes ``optimal`` (the dataset's exact posterior mean), a lossfloor
run directory or checkpoint (``load_run``), or a locally saved diffusers UNet2DModel +
DDPMScheduler (``load_diffusers_pipeline``). ``diagnose``, ``sample``, ``fid`` and the trainer's
resume all go through here.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lossfloor.data import Dataset
from lossfloor.diffusion.denoiser import Denoiser
from lossfloor.errors import UserError

Tensor = torch.Tensor
DenoiserFn = Callable[..., Tensor]

CHECKPOINT_LATEST = "checkpoint-latest.pt"
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
    from lossfloor.training.backbone import UNetBackbone

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

    denoiser = Denoiser(net, config["process"], config["target"], config["train"]["sigma_data"])
    return denoiser.to(device).eval().requires_grad_(False), config


def load_diffusers_pipeline(path: str | Path, device: str | torch.device = "cpu") -> Denoiser:
    """A locally saved diffusers UNet2DModel + DDPMScheduler (``save_pretrained``) as a Denoiser:
    ε-prediction on the scheduler's discrete VP process, timesteps as the noise input."""
    from diffusers import DDPMScheduler, UNet2DModel

    from lossfloor.diffusion import VPDiscrete

    root = Path(path)
    unet_dir = root / "unet" if (root / "unet").is_dir() else root
    sched_dir = root / "scheduler" if (root / "scheduler").is_dir() else root
    try:
        unet = UNet2DModel.from_pretrained(unet_dir, local_files_only=True)
        scheduler = DDPMScheduler.from_pretrained(sched_dir, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise UserError(
            f"{root} is not a saved diffusers UNet2DModel + DDPMScheduler: {exc}"
        ) from None
    if scheduler.config.prediction_type != "epsilon":
        raise UserError(
            f"{root}: prediction_type {scheduler.config.prediction_type!r}; "
            "only epsilon is supported"
        )

    def net(x_in: Tensor, c_noise: Tensor, labels: Tensor | None = None) -> Tensor:
        t = c_noise.reshape(-1).expand(x_in.shape[0])
        return unet(x_in, t, class_labels=labels).sample

    process = VPDiscrete(scheduler.alphas_cumprod.double())
    denoiser = Denoiser(net, process, "eps", scale_input=False)
    denoiser.unet = unet  # registers the weights with the Module (device moves, eval)
    return denoiser.to(device).eval().requires_grad_(False)


def _is_diffusers_pipeline(path: Path) -> bool:
    return (
        (path / "model_index.json").is_file()
        or (path / "scheduler").is_dir()
        or (path / "scheduler_config.json").is_file()
    )


def load_model(
    spec: str, dataset: Dataset, device: str | torch.device = "cpu", ema: bool = True
) -> tuple[DenoiserFn, dict[str, Any]]:
    """``optimal`` | a lossfloor run directory or checkpoint | a saved diffusers pipeline, as
    (denoiser, description); a run is checked against ``dataset``'s shape and labels."""
    if spec == "optimal":
        from lossfloor.optimal import OptimalDenoiser

        return OptimalDenoiser(dataset), {"kind": "optimal", "conditional": False}
    path = Path(spec)
    if not path.exists():
        raise UserError(f"model not found: {spec} (a run directory, checkpoint, or 'optimal')")
    if _is_diffusers_pipeline(path):
        return load_diffusers_pipeline(path, device), {"kind": "diffusers", "path": str(path)}
    denoiser, config = load_run(path, ema=ema, device=device)
    check_compatible(config, dataset)
    conditional = config["model"].get("num_classes") is not None
    return denoiser, {"kind": "lossfloor-run", "path": str(path), "ema": ema,
                      "conditional": conditional, "config": config}  # fmt: skip
