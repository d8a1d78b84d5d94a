"""`lossfloor estimate`: the optimal loss J*(σ) of a dataset over a σ grid."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from lossfloor.cli.common import (
    Declared,
    add_data_arguments,
    add_device_argument,
    add_dtype_argument,
)
from lossfloor.errors import UserError

if TYPE_CHECKING:
    from lossfloor.data import Dataset
    from lossfloor.data.chunked import ChunkedDataset
    from lossfloor.distributed import Group
    from lossfloor.optimal import Curve, Estimator

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
PARAM_OPTIONS = {"precision": "--dtype", "heldout": "--sources"}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "estimate",
        help="optimal loss J*(σ) of a dataset",
        description="Estimate the optimal loss J*(σ) (per element, VE σ, x0 units) of a dataset.",
    )
    add_data_arguments(p)
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
        "under torchrun and on streamed data: full, snis, dol and cdol (the shared layout). "
        "Their capabilities are declared on their classes (lossfloor.optimal.capabilities)",
    )
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
        "(ε ~ N(0, I), as in the paper) | auto (tilted for full and stratified, else plain)",
    )
    p.add_argument(
        "--form",
        default="auto",
        help="auto | closed | direct | combined (auto: combined for full, stratified and gram, "
        "closed otherwise)",
    )
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
    add_device_argument(p)
    add_dtype_argument(p)
    p.add_argument("--tile-mb", type=float, default=32.0, help="memory of one logits tile, in MiB")
    p.add_argument(
        "--stream",
        action="store_true",
        help="data larger than memory: read the items in chunks (.npy, image folder, "
        "EDM zip, named source), never all at once; under torchrun each process reads its "
        "shard (full, snis, dol, cdol; docs/distributed.md)",
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
    p.set_defaults(run=run, param_options=PARAM_OPTIONS, declared=DECLARED)


def run(args: argparse.Namespace) -> int:
    from lossfloor.cli.common import (
        check_args,
        load_data_from_args,
        parse_sigmas,
        parse_total,
        resolve_device,
    )
    from lossfloor.diffusion import get_process, get_target
    from lossfloor.distributed import launched
    from lossfloor.optimal import estimate_curve
    from lossfloor.optimal.draws import check_outer

    # under torchrun: one process of K, each on its shard of the data; rank 0 reports and writes
    with launched(resolve_device(args.device)) as (group, device):
        with group.together():
            check_args(args, write=group.main)
            sigmas = parse_sigmas(args.sigmas)
            if args.outer is not None:
                check_outer(args.outer)
            process = get_process(args.process)
            target = get_target(args.target, sigma_data=args.sigma_data)
            schedule = parse_total(args.total)
            if not (math.isfinite(args.tile_mb) and args.tile_mb * 2**20 >= 1):
                raise UserError(
                    f"--tile-mb {args.tile_mb}: must be a finite size of at least one byte"
                )
            if args.sources is not None and group.world > 1:
                raise UserError("--sources: held-out losses run in one process, not under torchrun")
            bandwidth = _bandwidth(args)
            # every process streams if one must (they must read the data alike)
            stream = args.stream or group.any(_too_large(args, group))
            ds = _open_stream(args) if stream else load_data_from_args(args)
            heldout = _heldout(args, ds)
            estimator = _estimator(args, ds.n)
        curve = estimate_curve(
            ds,
            sigmas,
            estimator,
            conditional=args.conditional,
            outer=args.outer,
            seed=args.seed,
            draws=args.draws,
            form=args.form,
            precision=args.dtype,
            device=device,
            process=process,
            target=target,
            schedule=schedule,
            tile_bytes=int(args.tile_mb * 2**20),
            checkpoint=Path(args.out + ".partial") if args.out else None,
            restart=args.restart,
            progress=not args.quiet,
            target_rse=args.target_rse,
            max_outer=args.max_outer,
        )
        with group.together():
            if heldout is not None:
                from lossfloor.floor import with_heldout

                curve = with_heldout(
                    curve,
                    ds,
                    heldout,
                    outer=args.outer,
                    bandwidth=bandwidth,
                    precision=args.dtype,
                    device=device,
                    tile_bytes=int(args.tile_mb * 2**20),
                    progress=not args.quiet,
                )
            if group.main:
                _report(curve, args, ds)
    return 0


def _open_stream(args: argparse.Namespace) -> ChunkedDataset:
    """The --data items read in chunks (--stream), after refusing what streaming does not
    do."""
    from lossfloor.data.chunked import DEFAULT_CHUNK_MB, open_chunked

    for option, value in (("--xflip", args.xflip), ("--sources", args.sources),
                          ("--key", args.key), ("--labels-key", args.labels_key)):  # fmt: skip
        if value:
            raise UserError(f"{option}: not with --stream (it reads .npy, folders, zips in chunks)")
    from lossfloor.cli.common import note_limit

    chunk_mb = DEFAULT_CHUNK_MB if args.chunk_mb is None else args.chunk_mb
    data = open_chunked(args.data, limit=args.limit, chunk_mb=chunk_mb)
    note_limit(args.limit, data.n)
    return data


def _too_large(args: argparse.Namespace, group: Group) -> bool:
    """Whether the data in memory would need more than --memory-gb (default: the memory
    available, shared by this machine's processes; ``optimal.stream.memory_need``): then say so
    and stream. Data that cannot stream (.npz, --xflip, --sources) are loaded as asked."""
    from lossfloor.optimal.stream import memory_need

    if args.memory_gb is not None and not (math.isfinite(args.memory_gb) and args.memory_gb > 0):
        raise UserError(f"--memory-gb {args.memory_gb}: must be a finite number of GiB > 0")
    if args.xflip or args.sources or args.key or args.labels_key:
        return False
    memory = None if args.memory_gb is None else args.memory_gb * 2**30
    need = memory_need(args.data, limit=args.limit, world=group.world, memory_bytes=memory)
    if need is None or not need.stream:
        return False
    if group.main:
        print(
            f"lossfloor: {args.data} needs ~{need.need / 2**30:.3g} GiB per process in memory, "
            f"more than {need.budget / 2**30:.3g} GiB: streaming it (--stream)",
            file=sys.stderr,
        )
    return True


def _bandwidth(args: argparse.Namespace) -> float | str | None:
    """--bandwidth (given only with --sources: ``DECLARED.needs``), checked before any work."""
    from lossfloor.cli.common import parse_bandwidth
    from lossfloor.floor import check_bandwidth

    if args.bandwidth is None:
        return None
    bandwidth = parse_bandwidth(args.bandwidth)
    check_bandwidth(bandwidth)
    return bandwidth


def _heldout(args: argparse.Namespace, ds: Dataset | ChunkedDataset) -> Dataset | None:
    """The --sources dataset, checked against the training data before any work."""
    if args.sources is None:
        return None
    from lossfloor.data import load_dataset
    from lossfloor.floor import check_heldout

    if args.conditional:
        raise UserError("--sources: held-out sources need an unconditional J* (no --conditional)")
    heldout = load_dataset(args.sources)
    check_heldout(ds.x, heldout.x)
    return heldout


def _estimator(args: argparse.Namespace, n: int) -> Estimator:
    """The estimator the options name, for n data points."""
    from lossfloor.optimal import make_estimator

    return make_estimator(
        args.estimator,
        n,
        inner=args.inner,
        C=args.C,
        replace=args.replace,
        exclude_source={"auto": None, "yes": False, "no": True}[args.source_in_random],
        layout=args.layout,
        share=args.share,
        near=args.near,
    )


def _report(curve: Curve, args: argparse.Namespace, ds: Dataset | ChunkedDataset) -> None:
    """The table (unless --quiet), the JSON and the plot the options ask for (in that order:
    a failing plot leaves the JSON written)."""
    from lossfloor.cli.common import write_plot

    if not args.quiet:
        _print_table(curve, args)
        if curve.sources is not None:
            _print_heldout(curve)
    _warn_unresolved(curve)
    _warn_target_missed(curve)
    if args.out:
        curve.save(args.out)
    if args.csv:
        curve.to_csv(args.csv)
    if args.plot:
        from lossfloor.plots import plot_optimal_loss

        write_plot(
            args.plot,
            lambda: plot_optimal_loss(
                args.plot,
                [(curve.estimator["name"], curve)],
                data_variance=curve.data_variance,
                title=f"{ds.name}: optimal loss (n={ds.n}, M={curve.outer})",
            ),
            args.out or args.csv,
        )


def _print_heldout(curve: Curve) -> None:
    """Held-out losses (upper bounds on the population's J*) beside J* of the training set."""
    print(f"held-out sources {curve.sources['name']} (n={curve.sources['n']}), per element:")
    print(f"{'sigma':>10} {'J*(train)':>12} {'held-out':>12} {'stderr':>10} {'smoothed':>12} "
          f"{'stderr':>10} {'b':>8}")  # fmt: skip
    for p in curve.points:
        sm = (
            "" if p.smoothed_loss is None else f"{p.smoothed_loss:12.6g} {p.smoothed_stderr:10.3g} "
        )
        b = "" if p.bandwidth is None else f"{p.bandwidth:8.3g}"
        print(f"{p.sigma:10.4g} {p.optimal_loss:12.6g} {p.heldout_loss:12.6g} "
              f"{p.heldout_stderr:10.3g} {sm}{b}")  # fmt: skip


def _warn_unresolved(curve: Curve) -> None:
    """One line on stderr naming the σ whose value rests on too few draws to trust its stderr,
    but for those where the bound shows J* memorised (the table reports the bound there)."""
    from lossfloor.optimal.moments import MIN_EFFECTIVE_DRAWS

    bad = [p for p in curve.points if p.resolved is False and not p.memorised]
    if bad:
        listed = ", ".join(f"{p.sigma:.4g} (ESS {p.ess:.3g})" for p in bad)
        print(
            f"lossfloor: warning: J* is not resolved at σ = {listed}: fewer than "
            f"{MIN_EFFECTIVE_DRAWS:g} effective draws carry it, so its value and standard error "
            "are unreliable; "
            + ("use more --outer" if curve.draws == "tilted" else "use --draws tilted"),
            file=sys.stderr,
        )


def _warn_target_missed(curve: Curve) -> None:
    """One line on stderr naming the σ whose relative standard error exceeds --target-rse
    (their draws reached --max-outer)."""
    if curve.target_rse is None:
        return
    bad = [p for p in curve.points if p.rse is None or p.rse > curve.target_rse]
    if bad:
        listed = ", ".join(
            f"{p.sigma:.4g} ({'J* = 0' if p.rse is None else f'rse {p.rse:.3g}'})" for p in bad
        )
        print(
            f"lossfloor: warning: the target relative standard error {curve.target_rse:g} is "
            f"not reached at σ = {listed} with {curve.outer} draws; raise --max-outer",
            file=sys.stderr,
        )


def _print_table(curve: Curve, args: argparse.Namespace) -> None:
    """The points, a line saying what each column is, the data variance and the total; with
    adaptive sizes, each σ's draws M (and far sample L) and achieved relative stderr; where J*
    is memorised and the draws do not resolve it, its upper bound "≤ b" in place of the
    estimate."""
    from lossfloor.diffusion import get_process, get_target
    from lossfloor.optimal.bound import MEMORISED_SHARE
    from lossfloor.optimal.moments import in_target_units

    process = get_process(args.process)
    target = get_target(args.target, sigma_data=args.sigma_data)
    head = f"J*({args.target})"
    adaptive = curve.target_rse is not None
    far = adaptive and any(p.inner is not None for p in curve.points)
    extra = (f" {'M':>8}" + (f" {'L':>7}" if far else "") + f" {'rse':>8}") if adaptive else ""
    print(f"{'sigma':>10} {'t':>10} {'J*(x0)':>12} {'stderr':>10} {head:>12} {'s':>7}{extra}")
    for p in curve.points:
        value, se, tgt = f"{p.optimal_loss:12.6g}", f"{p.stderr:10.3g}", p.optimal_loss_target
        bounded = bool(p.memorised and not p.resolved)
        if bounded:
            value, se = f"≤ {p.upper_bound:.4g}".rjust(12), f"{'memorised':>10}"
            tgt = in_target_units(p.upper_bound, p.sigma, process, target)
        sizes = ""
        if adaptive:
            rse = "—" if p.rse is None else f"{p.rse:.3g}"
            sizes = f" {p.outer:8d}" + (f" {p.inner:7d}" if far else "") + f" {rse:>8}"
        shown = "—" if tgt is None else f"{'≤ ' if bounded else ''}{tgt:.6g}"
        print(f"{p.sigma:10.4g} {p.t:10.4g} {value} {se} {shown:>12} {p.seconds:7.2f}{sizes}")
    print(
        f"sigma: VE σ; t: the process' time at σ; J*(x0) ± stderr: per element, x0 units; "
        f"{head}: per element, in the target's units; s: seconds for that σ"
        + (
            f"; M: outer draws used (target rse {curve.target_rse:g}, pilot {curve.pilot})"
            + ("; L: far sample" if far else "")
            + "; rse: stderr/J*"
            if adaptive
            else ""
        )
        + (
            f"; ≤ b, memorised: J* ≤ b, a rigorous bound (the nearest-point denoiser's error) "
            f"at most {MEMORISED_SHARE:g} × the data variance, where the draws cannot resolve J*"
            if any(p.memorised and not p.resolved for p in curve.points)
            else ""
        )
    )
    print(f"data variance per element: {curve.data_variance:.6g} (J* as σ → ∞)")
    if curve.total is not None:
        t = curve.total
        print(
            f"total under {t.schedule['name']}: {t.optimal_loss:.6g} ± {t.stderr:.2g} "
            f"(quadrature ±{t.quadrature_error:.2g}, tail {t.tail:.2g})"
        )
