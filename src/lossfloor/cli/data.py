"""``lossfloor data``: describe a dataset (size, shape, range, mean, variance, labels, sha256)."""

from __future__ import annotations

import argparse

from lossfloor import __version__
from lossfloor.cli.common import Declared, add_data_arguments, check_args, load_data_from_args
from lossfloor.io import write_json


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "data",
        help="describe a dataset (size, range, variance = J*(σ→∞), fingerprint)",
        description=__doc__.splitlines()[0],
    )
    add_data_arguments(parser)
    parser.add_argument("--json", metavar="FILE", default=None, help="also write this as JSON")
    parser.set_defaults(run=run, declared=Declared(inputs=("--data",), outputs=("--json",)))


def run(args: argparse.Namespace) -> int:
    from lossfloor.data import mean_and_variance
    from lossfloor.data.dataset import posterior_variance

    check_args(args)
    ds = load_data_from_args(args)
    mean, variance = mean_and_variance(ds.x)
    within = None if ds.std is None else posterior_variance(ds.std)
    counts = None if ds.labels is None else ds.labels.bincount().tolist()
    info = {
        **ds.describe(),
        "limit": args.limit,
        "dtype": str(ds.x.dtype).removeprefix("torch."),
        "min": float(ds.x.min()),
        "max": float(ds.x.max()),
        "mean": mean,
        "variance_per_element": variance if within is None else variance + within,
        "class_counts": counts,
        "lossfloor_version": __version__,
    }
    if within is not None:
        info |= {
            "variance_of_means_per_element": variance,
            "posterior_variance_per_element": within,
        }
    shape = "x".join(map(str, ds.shape))
    channels = f"{ds.shape[0]} channels, " if within is not None and len(ds.shape) == 3 else ""
    labels = "none" if counts is None else f"{len(counts)} classes, counts {counts}"
    print(f"name      {ds.name}")
    print(f"items     {ds.n}" + (" (half of them mirrored copies)" if ds.xflip else ""))
    print(f"shape     {shape} ({channels}{ds.dim} elements per item)")
    if within is None:
        print(f"range     {info['dtype']} [{info['min']:.6g}, {info['max']:.6g}]")
        print(f"mean      {mean:.6g}")
        print(f"variance  {variance:.6g} per element (the optimal loss J* as σ → ∞)")
    else:
        print("kind      Gaussian items N(mean, diag std²) (VAE posteriors), final units")
        print(
            f"means     {info['dtype']} in [{info['min']:.6g}, {info['max']:.6g}], mean {mean:.6g}"
        )
        print(f"variance  {variance:.6g} per element of the means (between items)")
        print(f"          {within:.6g} per element mean(std²) (within items)")
        print(f"          {variance + within:.6g} per element in total (J* as σ → ∞)")
    print(f"labels    {labels}")
    print(f"sha256    {ds.sha256}")
    if args.json:
        write_json(args.json, info)
    return 0
