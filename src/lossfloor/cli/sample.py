"""``lossfloor sample``: draw images from a model with EDM's Heun (or Euler) sampler."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lossfloor import __version__
from lossfloor.cli.common import Declared, add_device_argument, check_args, resolve_device
from lossfloor.errors import UserError
from lossfloor.io import save_with

if TYPE_CHECKING:
    import torch

    from lossfloor.sampling import Churn


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sample",
        help="sample images from a model (run, diffusers, python:MODULE:CALLABLE)",
        description="EDM's sampler (Karras et al. 2022, Algorithms 1 and 2) on its σ schedule "
        "(ρ = 7, σ 80 → 0.002 clamped to the model's range, through its round_sigma). Image i "
        "uses seed SEED+i with EDM's per-seed latents, so samples do not depend on --batch and "
        "an EDM model gives EDM's images for the same seeds on the same kind of device.",
    )
    p.add_argument(
        "--model",
        "--run",
        dest="model",
        required=True,
        metavar="SPEC",
        help="RUN_DIR | CHECKPOINT | saved diffusers pipeline or UNet | python:MODULE:CALLABLE "
        "(a factory returning a denoiser with EDM's protocol)",
    )
    p.add_argument("--n", type=int, required=True, help="number of samples")
    p.add_argument("--steps", type=int, default=18, help="σ levels N (Heun: 2N−1 evaluations)")
    p.add_argument(
        "--sampler", choices=("heun", "euler"), default="heun", help="Heun (2nd order) or Euler"
    )
    p.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    p.add_argument("--shape", default=None, metavar="C,H,W",
                   help="image shape, for a model that does not declare one")  # fmt: skip
    g = p.add_argument_group("σ levels and churn (EDM's Algorithm 2)")
    g.add_argument("--sigma-min", type=float, default=None,
                   help="lowest σ (default max(0.002, the model's))")  # fmt: skip
    g.add_argument("--sigma-max", type=float, default=None,
                   help="highest σ (default min(80, the model's))")  # fmt: skip
    g.add_argument("--rho", type=float, default=7.0, help="Karras schedule exponent (default 7)")
    g.add_argument("--churn", type=float, default=0.0, metavar="S_CHURN",
                   help="stochasticity S_churn (default 0: deterministic)")  # fmt: skip
    g.add_argument("--s-min", type=float, default=0.0, help="churn only for σ ≥ S_min")
    g.add_argument("--s-max", type=float, default=float("inf"), help="churn only for σ ≤ S_max")
    g.add_argument("--s-noise", type=float, default=1.0, help="churn noise scale S_noise")
    p.add_argument(
        "--labels",
        default=None,
        metavar="LIST",
        help="class labels, comma-separated, repeated over the samples "
        "(conditional runs only; default 0, 1, …, C−1 repeated)",
    )
    p.add_argument("--batch", type=int, default=64, help="images per batch (default 64)")
    p.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA")
    add_device_argument(p)
    p.add_argument("--out-grid", default=None, metavar="FILE.png", help="PNG grid of the samples")
    p.add_argument(
        "--out-npz",
        default=None,
        metavar="FILE.npz",
        help="x: float32 N×C×H×W in [−1, 1] (clipped), y: labels, seeds, meta; a model "
        "trained on VAE latents writes its latents as latents (unclipped, the data's final "
        "units) unless --vae decodes them into images",
    )
    p.add_argument(
        "--vae",
        default=None,
        metavar="DIR",
        help="decode the samples through this diffusers AutoencoderKL (save_pretrained folder): "
        "latents in the run's final units are mapped back to the VAE's, raw = (x − bias)/scale "
        "per channel as recorded when the run read its data (none recorded: as they are), and "
        "written as images in [−1, 1]",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(
        run=run,
        param_options={"S_churn": "--churn", "S_min": "--s-min", "S_noise": "--s-noise"},
        declared=Declared(inputs=("--model",), outputs=("--out-grid", "--out-npz")),
    )


def _shape(text: str | None, declared: list[int] | None) -> list[int]:
    """The image shape: --shape C,H,W, else the one the model declares."""
    if text is None:
        if declared is None:
            raise UserError("the model declares no image shape; give --shape C,H,W")
        return list(declared)
    try:
        shape = [int(v) for v in text.split(",")]
    except ValueError:
        shape = []
    if len(shape) != 3 or min(shape) < 1:
        raise UserError(f"--shape {text!r}: expected three positive integers C,H,W")
    if declared is not None and shape != list(declared):
        raise UserError(f"--shape {text}: the model takes {','.join(map(str, declared))}")
    return shape


def _labels(text: str | None, n: int, num_classes: int | None) -> torch.Tensor | None:
    """The label of each sample: the list (or 0..C−1) repeated to n entries."""
    import torch

    if num_classes is None:
        if text is not None:
            raise UserError("--labels: this model is unconditional; drop --labels")
        return None
    try:
        values = list(range(num_classes)) if text is None else [int(v) for v in text.split(",")]
    except ValueError:
        raise UserError(f"--labels {text!r}: expected comma-separated integers") from None
    bad = [v for v in values if not 0 <= v < num_classes]
    if bad:
        raise UserError(f"--labels: {bad[0]} is not a class of this model (0..{num_classes - 1})")
    return torch.tensor(values, dtype=torch.long).repeat(-(-n // len(values)))[:n]


def run(args: argparse.Namespace) -> int:
    from lossfloor.data.encode import load_vae
    from lossfloor.models import load_model
    from lossfloor.sampling import Churn, generate, image_grid, sampling_sigmas
    from lossfloor.vae import check_fits, decode, is_latent_data, transform_of

    if args.out_grid is None and args.out_npz is None:
        raise UserError("give --out-grid FILE.png and/or --out-npz FILE.npz")
    check_args(args)
    if args.n < 1:
        raise UserError(f"--n {args.n}: must be at least 1")
    if args.seed < 0:
        raise UserError(f"--seed {args.seed}: must be >= 0")
    churn = Churn(args.churn, args.s_min, args.s_max, args.s_noise)
    device = resolve_device(args.device)
    denoiser, info = load_model(args.model, None, device, ema=not args.raw)
    shape = _shape(args.shape, info.get("image_shape"))
    data = info.get("config", {}).get("data")
    latent = is_latent_data(data) and args.vae is None  # latents written as latents
    if latent and args.out_grid is not None:
        raise UserError(
            f"--out-grid: {args.model} draws VAE latents, not images; give --vae DIR to decode "
            "them (or write the latents with --out-npz alone)"
        )
    vae = None if args.vae is None else load_vae(args.vae, device)
    if vae is not None:
        check_fits(vae, tuple(shape))
    labels = _labels(args.labels, args.n, info.get("num_classes"))
    sigmas = sampling_sigmas(denoiser, args.steps, args.sigma_min, args.sigma_max, args.rho)
    seeds = list(range(args.seed, args.seed + args.n))
    x = generate(
        denoiser,
        shape,
        seeds,
        steps=args.steps,
        sampler=args.sampler,
        labels=labels,
        batch=args.batch,
        sigma_min=args.sigma_min,
        sigma_max=args.sigma_max,
        rho=args.rho,
        churn=churn,
        device=device,
        progress=False if args.no_progress else None,
    )
    if vae is not None:
        x = decode(vae, x, transform_of(data), args.batch, device)
    elif not latent:
        x = x.clamp(-1, 1)
    if args.out_grid is not None:
        grid = image_grid(x)
        save_with(args.out_grid, lambda p: grid.save(p, format="PNG"))
    if args.out_npz is not None:
        _write_npz(args, x, labels, seeds, sigmas, churn, info)
    what = "latents" if latent else "samples" if vae is None else f"images (decoded by {args.vae})"
    print(f"{args.n} {what} ({args.sampler}, {args.steps} steps, σ {float(sigmas[0]):g} → "
          f"{float(sigmas[-2]):g}) from {args.model}")  # fmt: skip
    return 0


def _write_npz(
    args: argparse.Namespace,
    x: torch.Tensor,
    labels: torch.Tensor | None,
    seeds: list[int],
    sigmas: torch.Tensor,
    churn: Churn,
    info: dict[str, Any],
) -> None:
    """--out-npz: the samples ``x``, their seeds, their labels (if any) and a JSON ``meta``
    saying how they were drawn, written atomically."""
    import numpy as np

    from lossfloor.vae import is_latent_data

    meta: dict[str, Any] = {
        "model": {k: v for k, v in info.items() if k != "config"},
        "ema": not args.raw,
        "sampler": args.sampler,
        "steps": args.steps,
        "sigma_min": float(sigmas[-2]) if args.steps > 1 else None,
        "sigma_max": float(sigmas[0]),
        "rho": args.rho,
        "churn": vars(churn) if churn.S_churn > 0 else None,
        "seeds": [args.seed, args.seed + args.n - 1],
        "data": info.get("config", {}).get("data"),
        "lossfloor_version": __version__,
    }
    if args.vae is not None:
        meta["vae"] = args.vae  # images decoded from latents (through data's latent_transform)
    elif is_latent_data(meta["data"]):
        meta["latent"] = True  # latents, not images: ``lossfloor fid`` wants --vae
    arrays = {"x": x.numpy(), "seeds": np.asarray(seeds, dtype=np.int64)}
    if labels is not None:
        arrays["y"] = labels.numpy()
    arrays["meta"] = np.asarray(json.dumps(meta))

    def save(path: Path) -> None:
        with open(path, "wb") as f:
            # allow_pickle: numpy's default, named so that **arrays cannot be taken for it
            np.savez(f, allow_pickle=True, **arrays)

    save_with(args.out_npz, save)
