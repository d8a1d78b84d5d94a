"""`lossfloor estimate`: the optimal loss J*(σ) of a dataset over a σ grid.

This module: the options and ``run``; ``inputs.py`` reads and checks what the options give and
runs the estimate, ``report.py`` prints and writes what it found."""

from __future__ import annotations

import argparse

from lossfloor.cli.common import (
    ESTIMATOR_OPTIONS,
    Declared,
    add_data_arguments,
    add_device_argument,
    add_dtype_argument,
)

#: The files read and written, and the options that apply only under another.
DECLARED = Declared(
    inputs=("--data", "--sources"),
    outputs=("--out", "--csv", "--plot"),
    partial=("--out",),
    needs=(
        ("--max-outer", "--target-rse"),
        ("--chunk-mb", "--stream"),
        ("--bandwidth", "--sources"),
        ("--restart", "--out"),
    ),  # fmt: skip
)
#: Parameters of the Python API that options of another name set (for its errors).
PARAM_OPTIONS = {"precision": "--dtype", "heldout": "--sources", **ESTIMATOR_OPTIONS}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "estimate",
        help="optimal loss J*(σ) of a dataset",
        description="Estimate the optimal loss J*(σ) (per element, VE σ, x0 units) of a dataset.",
    )
    add_data_arguments(p)
    _add_problem_options(p)
    _add_estimator_option(p)
    _add_inner_set_options(p)
    _add_draw_options(p)
    _add_unit_options(p)
    _add_resource_options(p)
    _add_output_options(p)
    p.set_defaults(run=run, param_options=PARAM_OPTIONS, declared=DECLARED)


def _add_problem_options(p: argparse.ArgumentParser) -> None:
    """What is estimated: the conditional J*, held-out sources and the σ grid."""
    p.add_argument(
        "--conditional",
        action="store_true",
        help="J* of the class-conditional model: the posterior within the source's class",
    )
    p.add_argument(
        "--sources",
        default=None,
        metavar="SPEC",
        help="held-out data (e.g. fashion-mnist:test): add each σ's held-out loss of the "
        "training set's optimal denoiser (an upper bound on the population's J*; docs/floor.md)",
    )
    p.add_argument(
        "--bandwidth",
        default=None,
        help="with --sources: also the held-out loss of the smoothed denoiser (kernel width "
        "b, x0 units: auto = leave-one-out on the data | a number ≥ 0; default: none, no "
        "smoothed loss)",
    )
    p.add_argument(
        "--sigmas",
        default="0.01:100:25",
        help="σ grid (VE σ, x0 units): a list 0.1,1,10 or min:max:count, log-spaced",
    )


def _add_estimator_option(p: argparse.ArgumentParser) -> None:
    """The estimator (its help: each one's cost and accuracy)."""
    p.add_argument(
        "--estimator",
        default="full",
        help="full (exact, O(M·N·D) per σ: the reference) | stratified (each source's nearest "
        "points exact plus L random ones weighted N/L: exact below σ*, within ~1%% well above "
        "it, but low by 10–30%% where J* rises — see docs/benchmarks.md) | gram (a whole grid "
        "at once: exact weights from two products shared by every σ, the source exactly and "
        "--inner weight-proportional draws of the rest; unbiased; within 0.3%% of full on the "
        "same draws on all of Fashion-MNIST; CPU time vs full, measured on Fashion-MNIST at "
        "M = 1,024, 1-2 threads: 0.11-0.14 at 32 σ and N ≥ 20,000, 0.14-0.34 at N = 2,000-5,000, "
        "0.3-0.5 at 8 σ and N ≥ 5,000, 0.6-0.8 at 8 σ and N = 2,000 (docs/benchmarks.md); "
        "plain draws) | snis | "
        "dol | cdol "
        "(the paper's sub-sampled estimators, for comparison). Each runs on data in memory; "
        "under torchrun and on streamed data: full, snis, dol, cdol, stratified and gram (all "
        "of them). "
        "What each can do (where it runs, draws, forms, options), read from the capabilities "
        "declared on its class: lossfloor estimators",
    )


def _add_inner_set_options(p: argparse.ArgumentParser) -> None:
    """The inner sets of the sub-sampled estimators."""
    p.add_argument(
        "--inner",
        type=int,
        default=None,
        metavar="L",
        help="inner set size (default: N/10); stratified: the far sample (default: N/20); "
        "gram: weight-proportional draws of the points other than the source, per outer draw "
        "(default: 32)",
    )
    p.add_argument(
        "--near",
        type=int,
        default=None,
        metavar="K",
        help="stratified: points summed exactly, the source and its K−1 nearest (default: 16)",
    )
    p.add_argument(
        "--C",
        default=None,
        help="cdol's source weight divisor: a number | paper (4N/L) | balanced ((N−1)/(L−1)) "
        "(default: paper)",
    )
    p.add_argument("--replace", action="store_true", help="draw the random part with replacement")
    p.add_argument(
        "--source-in-random",
        choices=["auto", "yes", "no"],
        default="auto",
        help="may the random part contain the query's source (auto: snis yes, dol/cdol no)",
    )
    p.add_argument(
        "--layout",
        default="shared",
        help="shared (one random inner set per --share queries) | independent (one per query)",
    )
    p.add_argument(
        "--share", type=int, default=256, help="queries sharing one random inner set (shared)"
    )
    p.add_argument(
        "--fused",
        action="store_true",
        help="gram: every σ's weights and draws in one compiled pass over the products (a C "
        "kernel built at first use with the system's compiler, cached; one process); equal to "
        "the default passes up to rounding; a 32-σ Fashion-MNIST curve about 2× faster",
    )


def _add_draw_options(p: argparse.ArgumentParser) -> None:
    """The outer draws: their number (fixed or adaptive), seed, noise and form."""
    p.add_argument(
        "--outer",
        type=int,
        default=None,
        metavar="M",
        help="outer draws (x0, ε), shared by every σ (default: N, each point once)",
    )
    p.add_argument(
        "--target-rse",
        type=float,
        default=None,
        metavar="R",
        help="adaptive sizes: per σ, as many outer draws (and, stratified, far points) as give "
        "this relative standard error, from a pilot of --outer draws (default 4096); each σ "
        "reports the draws it used and the error it reached (default: fixed sizes)",
    )
    p.add_argument(
        "--max-outer",
        type=int,
        default=None,
        metavar="M",
        help="with --target-rse: at most M outer draws per σ (default: 64 × the pilot)",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the outer draws and the random inner sets"
    )
    p.add_argument(
        "--draws",
        default="auto",
        help="outer noise: tilted (importance-sampled toward each source's nearest neighbours, "
        "with likelihood-ratio weights: right below σ*, where J* rests on rare draws) | plain "
        "(ε ~ N(0, I), as in the paper) | auto (tilted for full, stratified and gram, else plain)",
    )
    p.add_argument(
        "--form",
        default="auto",
        help="auto | closed | direct | combined (auto: combined for full, stratified and gram, "
        "closed otherwise)",
    )


def _add_unit_options(p: argparse.ArgumentParser) -> None:
    """The process, target and schedule that J* is also given in."""
    p.add_argument(
        "--process",
        default="edm",
        help="ve | edm | vp | vp-cosine | vp-edm | fm: gives each σ's process time t",
    )
    p.add_argument(
        "--target",
        default="F",
        help="x0 | eps | score | velocity | v | F: J* is also given in its units",
    )
    p.add_argument(
        "--sigma-data", type=float, default=0.5, help="σ_data of the F target (x0 units)"
    )
    p.add_argument(
        "--total",
        default=None,
        help="also the total E_σ~p[w(σ)·J*(σ)] under this schedule: edm | ve | vp | fm | "
        "fm-logit-normal (default: none)",
    )


def _add_resource_options(p: argparse.ArgumentParser) -> None:
    """Device, precision, memory and streaming."""
    add_device_argument(p)
    add_dtype_argument(p)
    p.add_argument("--tile-mb", type=float, default=32.0, help="memory of one logits tile, in MiB")
    p.add_argument(
        "--stream",
        action="store_true",
        help="data larger than memory: read the items in chunks (.npy, image folder, "
        "EDM zip, named source), never all at once; under torchrun each process reads its "
        "shard (every estimator; docs/distributed.md)",
    )
    p.add_argument(
        "--chunk-mb",
        type=float,
        default=None,
        help="with --stream: memory of one chunk of keys, in MiB (default: 256, "
        "data.chunked.DEFAULT_CHUNK_MB)",
    )
    p.add_argument(
        "--memory-gb",
        type=float,
        default=None,
        help="without --stream: stream anyway (saying so) when the data in memory would need "
        "more than this many GiB per process (default: the memory available now, divided "
        "among this machine's processes)",
    )


def _add_output_options(p: argparse.ArgumentParser) -> None:
    """The files written, resuming, and the table."""
    p.add_argument(
        "--out",
        default=None,
        metavar="FILE.json",
        help="result JSON (checkpointed per σ in FILE.json.partial; a rerun resumes)",
    )
    p.add_argument(
        "--csv", default=None, metavar="FILE.csv", help="the table as CSV (units in the header)"
    )
    p.add_argument(
        "--restart",
        action="store_true",
        help="discard OUT.partial of an earlier estimate with other options (default: refuse it)",
    )
    p.add_argument("--plot", default=None, metavar="FILE.png", help="PNG of J*(σ)")
    p.add_argument("--quiet", action="store_true", help="no table, no progress bar")


def run(args: argparse.Namespace) -> int:
    from lossfloor.cli.common import resolve_device
    from lossfloor.cli.estimate.inputs import estimate, read_inputs, with_heldout_losses
    from lossfloor.cli.estimate.report import report
    from lossfloor.distributed import launched

    # under torchrun: one process of K, each on its shard of the data; rank 0 reports and writes
    with launched(resolve_device(args.device)) as (group, device):
        with group.together():
            inputs = read_inputs(args, group)
        curve = estimate(args, inputs, device)
        with group.together():
            if inputs.heldout is not None:
                curve = with_heldout_losses(args, curve, inputs, device)
            if group.main:
                report(curve, args, inputs.ds)
    return 0
