"""``lossfloor encode``: a pixel dataset → VAE latents (each item's posterior mean and std) in
EDM2's latent zip layout, which ``--data`` reads back (``--encoder raw`` or
``--latent-scale/--latent-bias``) and EDM2's ``training/dataset.py`` loads."""

from __future__ import annotations

import argparse
import os

from lossfloor.cli.common import (
    PARTIAL,
    Declared,
    add_device_argument,
    check_args,
    note_limit,
)

DESCRIPTION = (
    "Encode a pixel dataset with a VAE into EDM2's latent zip (as EDM2's dataset_tool.py encode "
    "writes it): per image NNNNN/img-mean-std-NNNNNNNN.npy, a float32 2C×h×w array holding the "
    "posterior mean (latent_dist.mean) and std (exp(½·logvar)) on channels, and dataset.json "
    "with the labels (or null), the VAE's scaling_factor/shift_factor and per-channel latent "
    "statistics. --vae is a folder that diffusers' AutoencoderKL.save_pretrained wrote (or a "
    "saved pipeline holding one in vae/), or python:MODULE:CALLABLE, called with each pixel "
    "batch (B×C×H×W float32 on --device) and returning (mean, std). Finished batches are kept "
    "in OUT.partial/; an interrupted encode run again continues there, and the zip is written "
    "atomically at the end."
)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "encode",
        help="encode images with a VAE into an EDM2 latent zip (mean and std per item)",
        description=DESCRIPTION,
    )
    g = parser.add_argument_group("data")
    g.add_argument(
        "--data",
        required=True,
        metavar="SPEC",
        help="images: fashion-mnist[:test] | mnist10k | FILE.npz | FILE.npy | FOLDER | EDM.zip",
    )
    g.add_argument(
        "--limit", type=int, default=None, metavar="N", help="encode the first N images only"
    )
    g.add_argument("--key", default=None, help="array key inside an .npz (default: x, or the only)")
    g.add_argument("--labels-key", default=None, help="labels key inside an .npz (default: y)")
    parser.add_argument(
        "--vae",
        required=True,
        metavar="DIR|python:MODULE:CALLABLE",
        help="a diffusers AutoencoderKL folder (save_pretrained), or a callable pixels → "
        "(mean, std)",
    )
    parser.add_argument("--out", required=True, metavar="LATENTS.zip", help="the latent zip")
    parser.add_argument("--batch", type=int, default=64, help="images per VAE call")
    parser.add_argument(
        "--pixel-range",
        choices=("signed", "unit"),
        default="signed",
        help="pixels as the VAE takes them: signed = [−1, 1] (diffusers' VAEs); unit = [0, 1] "
        "(EDM2's StabilityVAEEncoder feeds the SD VAE x/255; its raw_mean/raw_std assume it)",
    )
    add_device_argument(parser)
    parser.add_argument(
        "--restart",
        action="store_true",
        help="discard OUT.partial of an earlier encode with another VAE or options (default: "
        "refuse it)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(
        run=run,
        declared=Declared(inputs=("--data", "--vae"), outputs=("--out",), partial=("--out",)),
    )


def run(args: argparse.Namespace) -> int:
    from lossfloor.data.encode import encode_dataset

    check_args(args)
    from lossfloor.cli.common import resolve_device

    summary = encode_dataset(
        args.data,
        args.vae,
        args.out,
        limit=args.limit,
        key=args.key,
        labels_key=args.labels_key,
        batch=args.batch,
        pixel_range=args.pixel_range,
        device=resolve_device(args.device),
        partial=args.out + PARTIAL,
        restart=args.restart,
        progress=not args.quiet,
    )
    note_limit(args.limit, summary.n)
    shape = "×".join(map(str, summary.image_shape))
    latent = "×".join(map(str, summary.latent_shape))
    resumed = f", {summary.resumed} of them from {args.out}{PARTIAL}" if summary.resumed else ""
    size = os.path.getsize(summary.out) / 2**20
    print(
        f"encoded {summary.n} images ({shape}) into {summary.out}: {latent} latents (mean and "
        f"std), {size:.1f} MiB, {summary.seconds:.1f} s{resumed}"
    )
    vae = summary.meta["vae"]
    stats = summary.meta["latent_statistics"]
    units = ["read it back with --encoder raw (raw VAE units)"]
    if vae.get("scaling_factor") is not None:
        sf, shift = vae["scaling_factor"], vae.get("shift_factor") or 0.0
        bias0 = 0.0 - shift * sf  # 0.0 − x: no "-0" when there is no shift
        units.append(f"diffusers' units with --latent-scale {sf:g} --latent-bias {bias0:g}")
    scale = [0.5 / s if s > 0 else 1.0 for s in stats["std_of_samples"]]
    bias = [-m * c for m, c in zip(stats["mean_of_means"], scale, strict=True)]
    units.append(
        "EDM2's normalisation (mean 0, std 0.5 per channel) with --latent-scale "
        f"{','.join(f'{v:.6g}' for v in scale)} --latent-bias {','.join(f'{v:.6g}' for v in bias)}"
    )
    print("; ".join(units))
    return 0
