"""``lossfloor fid``: FID and KID of samples against a dataset (Inception-v3 and/or classifier
features), with the sample counts stated."""

from __future__ import annotations

import argparse
import sys

from lossfloor import __version__
from lossfloor.cli.common import (
    Declared,
    add_data_arguments,
    add_device_argument,
    check_args,
    load_data_from_args,
    note_limit,
    resolve_device,
)
from lossfloor.errors import UserError
from lossfloor.evaluation import FEATURES, KID_SUBSETS
from lossfloor.io import write_json

DESCRIPTION = (
    "Fréchet distance and KID of samples against a dataset's reference items, on Inception-v3 "
    "features (FID; torchmetrics' offline weights, images resized to 299×299, gray repeated to "
    "RGB) and/or the penultimate features of the bundled Fashion-MNIST classifier "
    "(FD-classifier; 28×28 grayscale only). The reference items are as many as there are "
    "samples (--n-reference): the whole dataset or a fixed random subset (seed 0); their "
    "features are cached in $LOSSFLOOR_CACHE/fid. KID is the unbiased MMD² (cubic polynomial "
    "kernel) averaged over --kid-subsets random subsets of up to 1000 items, ± their spread; "
    "below 1000 samples it is noisy and a warning says so, as for a Fréchet distance from fewer "
    "samples than feature dimensions. Every line states the sample and reference counts."
)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "fid",
        help="FID/KID of samples against a dataset (Inception and/or classifier features)",
        description=DESCRIPTION,
    )
    parser.add_argument(
        "--samples",
        required=True,
        metavar="FILE|FOLDER",
        help="samples: .npz (array 'samples', else as --data reads it), .npy, image folder, .zip",
    )
    add_data_arguments(parser)
    parser.add_argument(
        "--n", type=int, default=None, help="use the first N samples (default: all)"
    )
    parser.add_argument(
        "--n-reference",
        type=int,
        default=None,
        metavar="M",
        help="reference items (default: as many as samples, at most the dataset)",
    )
    parser.add_argument(
        "--feature",
        choices=[*FEATURES, "both"],
        default="inception",
        help="features: inception (FID), classifier (FD-classifier, 28×28 gray) or both",
    )
    parser.add_argument("--batch", type=int, default=32, help="images per feature batch")
    add_device_argument(parser)
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of KID's random subsets (default: 0)"
    )
    parser.add_argument(
        "--kid-subsets", type=int, default=KID_SUBSETS, help="number of KID's random subsets"
    )
    parser.add_argument(
        "--vae",
        default=None,
        metavar="DIR",
        help="the samples are VAE latents (lossfloor sample of a run on latents, without "
        "--vae): decode them through this diffusers AutoencoderKL first, raw = (x − bias)/scale "
        "as the run recorded (none recorded: as they are); --data stays the pixel dataset (FID "
        "measures images)",
    )
    parser.add_argument("--out", metavar="FILE.json", default=None, help="the result as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(
        run=run, declared=Declared(inputs=("--samples", "--data"), outputs=("--out",))
    )


def run(args: argparse.Namespace) -> int:
    from lossfloor.evaluation.fid import evaluate, load_samples

    check_args(args)
    device = resolve_device(args.device)
    latents = _latent_samples(args)
    samples = load_samples(args.samples, args.n)
    note_limit(args.n, len(samples.x), "--n")
    dataset = load_data_from_args(args)
    if dataset.gaussian or dataset.latent is not None:
        raise UserError(
            f"--data {args.data}: FID measures images, and these are VAE latents; give the "
            "pixel dataset (and --vae DIR to decode latent samples)"
        )
    images = samples.x
    if args.vae is not None:
        from lossfloor.data.encode import load_vae
        from lossfloor.vae import decode, transform_of

        transform = transform_of((latents or {}).get("data"))
        images = decode(load_vae(args.vae, device), images, transform, args.batch, device)
    features = FEATURES if args.feature == "both" else (args.feature,)
    result = evaluate(
        images,
        dataset,
        features=features,
        n_reference=args.n_reference,
        batch=args.batch,
        device=device,
        seed=args.seed,
        kid_subsets=args.kid_subsets,
        progress=not args.quiet,
    )
    result = {
        "samples": {"path": args.samples, **samples.describe()},
        **result,
        "options": {
            "data": args.data,
            "limit": args.limit,
            "xflip": args.xflip,
            "feature": args.feature,
            "batch": args.batch,
            "seed": args.seed,
            "kid_subsets": args.kid_subsets,
            "n": args.n,
            "n_reference": args.n_reference,
        }
        | ({"vae": args.vae} if args.vae is not None else {}),
        "lossfloor_version": __version__,
    }
    for s in result["scores"].values():
        _warn_small_fid(s)
        _warn_small_kid(s)
        print(
            f"{s['metric']:<13} {s['frechet_distance']:.4f}   "
            f"KID {s['kid_mean']:.5f} ± {s['kid_std']:.5f} "
            f"({s['kid_subsets']} subsets of {s['kid_subset_size']})   "
            f"({s['n_samples']} samples vs {s['n_reference']} reference items of {args.data}; "
            f"{s['extractor']}, {s['feature_dim']}-d)"
        )
    if args.out:
        write_json(args.out, result)
    return 0


def _latent_samples(args: argparse.Namespace) -> dict | None:
    """The meta of --samples where they are latents to decode (a sample file of latents, or
    any samples given with --vae; None otherwise); UserError (one line) for latents without
    --vae (no FID on latents) or images with it."""
    from lossfloor.vae import sample_meta

    meta = sample_meta(args.samples)
    latent = meta is not None and bool(meta.get("latent"))
    if latent and args.vae is None:
        raise UserError(
            f"--samples {args.samples} are VAE latents, not images; give --vae DIR to decode "
            "them (FID measures images)"
        )
    if args.vae is not None and meta is not None and not latent:
        raise UserError(
            f"--vae: --samples {args.samples} are images already (lossfloor sample wrote "
            "them without latents); drop --vae"
        )
    return None if args.vae is None else (meta or {})


def _warn_small_fid(score: dict) -> None:
    """A warning on stderr when there are fewer samples than feature dimensions: their
    covariance is then singular and the Fréchet distance is biased high (the bias falls as
    1/n), so it compares only with values at the same sample count."""
    n, dim = score["n_samples"], score["feature_dim"]
    if n < dim:
        print(
            f"lossfloor: warning: {score['metric']} from {n} samples < {dim} feature dimensions "
            "is biased high (their covariance is singular; the bias falls as 1/n): compare it "
            f"only at equal sample counts, and use ≥ {dim} samples for a stable value",
            file=sys.stderr,
        )


def _warn_small_kid(score: dict) -> None:
    """A warning on stderr when KID's subsets are smaller than its usual size: the unbiased
    MMD² is noisy there (it can be negative), and when the subsets hold every sample their
    spread is 0 and says nothing about the error."""
    from lossfloor.evaluation.fid import KID_SUBSET_SIZE

    size, n = score["kid_subset_size"], score["n_samples"]
    if size >= KID_SUBSET_SIZE:
        return
    spread = (
        "every subset is the whole sample set, so its ± is 0 by construction"
        if size >= n
        else "its ± is the spread over subsets, not the error against the data"
    )
    print(
        f"lossfloor: warning: KID from subsets of {size} < {KID_SUBSET_SIZE} items is noisy "
        f"(it can be negative); {spread}; use ≥ {KID_SUBSET_SIZE} samples for a stable KID",
        file=sys.stderr,
    )
