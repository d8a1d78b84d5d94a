"""What the options of `lossfloor estimate` give, checked before any work (the grid, the units,
the data, streamed where asked or where memory is short, the held-out set, the estimator), and
the estimate they ask for."""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lossfloor.errors import UserError

if TYPE_CHECKING:
    import torch

    from lossfloor.data import Dataset
    from lossfloor.data.chunked import ChunkedDataset
    from lossfloor.diffusion import Process, Target
    from lossfloor.distributed import Group
    from lossfloor.optimal import Curve, Estimator
    from lossfloor.schedules import NoiseSchedule


@dataclass
class Inputs:
    """What the options give, checked before any work."""

    sigmas: list[float]
    process: Process
    target: Target
    schedule: NoiseSchedule | None
    bandwidth: float | str | None
    ds: Dataset | ChunkedDataset
    heldout: tuple[Dataset, Dataset] | None  # (the training set in memory, the held-out set)
    estimator: Estimator


def read_inputs(args: argparse.Namespace, group: Group) -> Inputs:
    """The checked options, the data (streamed where asked or where memory is short) and the
    estimator."""
    from lossfloor.cli.common import check_args, load_data_from_args, parse_sigmas, parse_total
    from lossfloor.diffusion import get_process, get_target
    from lossfloor.optimal.draws import check_outer

    check_args(args, write=group.main)
    sigmas = parse_sigmas(args.sigmas)
    if args.outer is not None:
        check_outer(args.outer)
    process = get_process(args.process)
    target = get_target(args.target, sigma_data=args.sigma_data)
    schedule = parse_total(args.total)
    if not (math.isfinite(args.tile_mb) and args.tile_mb * 2**20 >= 1):
        raise UserError(f"--tile-mb {args.tile_mb}: must be a finite size of at least one byte")
    if args.sources is not None and group.world > 1:
        raise UserError("--sources: held-out losses run in one process, not under torchrun")
    bandwidth = _bandwidth(args)
    # every process streams if one must (they must read the data alike: stream.must_stream)
    stream = args.stream or _too_large(args, group)
    ds = _open_stream(args) if stream else load_data_from_args(args)
    heldout = _heldout(args, ds)
    estimator = _estimator(args, ds.n)
    return Inputs(sigmas, process, target, schedule, bandwidth, ds, heldout, estimator)


def estimate(args: argparse.Namespace, inputs: Inputs, device: torch.device) -> Curve:
    """J* over the grid (checkpointed per σ to OUT.partial)."""
    from lossfloor.optimal import estimate_curve

    return estimate_curve(
        inputs.ds,
        inputs.sigmas,
        inputs.estimator,
        conditional=args.conditional,
        outer=args.outer,
        seed=args.seed,
        draws=args.draws,
        form=args.form,
        precision=args.dtype,
        device=device,
        process=inputs.process,
        target=inputs.target,
        schedule=inputs.schedule,
        tile_bytes=int(args.tile_mb * 2**20),
        checkpoint=Path(args.out + ".partial") if args.out else None,
        restart=args.restart,
        progress=not args.quiet,
        target_rse=args.target_rse,
        max_outer=args.max_outer,
    )


def with_heldout_losses(
    args: argparse.Namespace, curve: Curve, inputs: Inputs, device: torch.device
) -> Curve:
    """``curve`` with the --sources' held-out losses (and smoothed ones, with --bandwidth)."""
    from lossfloor.floor import with_heldout

    assert inputs.heldout is not None
    train, heldout = inputs.heldout
    return with_heldout(
        curve,
        train,
        heldout,
        outer=args.outer,
        bandwidth=inputs.bandwidth,
        precision=args.dtype,
        device=device,
        tile_bytes=int(args.tile_mb * 2**20),
        progress=not args.quiet,
    )


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
    from lossfloor.optimal.stream import must_stream

    if args.memory_gb is not None and not (math.isfinite(args.memory_gb) and args.memory_gb > 0):
        raise UserError(f"--memory-gb {args.memory_gb}: must be a finite number of GiB > 0")
    if args.xflip or args.sources or args.key or args.labels_key:
        return False
    memory = None if args.memory_gb is None else args.memory_gb * 2**30
    need = must_stream(args.data, group, limit=args.limit, memory_bytes=memory)
    if need is None:
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


def _heldout(
    args: argparse.Namespace, ds: Dataset | ChunkedDataset
) -> tuple[Dataset, Dataset] | None:
    """The training set and the --sources dataset, checked against it before any work."""
    if args.sources is None:
        return None
    from lossfloor.data import Dataset, load_dataset
    from lossfloor.floor import check_heldout, check_same_kind

    if args.conditional:
        raise UserError("--sources: held-out sources need an unconditional J* (no --conditional)")
    assert isinstance(ds, Dataset)  # --sources never streams (_open_stream, _too_large)
    heldout = load_dataset(args.sources)
    check_heldout(ds.x, heldout.x)
    check_same_kind(ds.std, heldout.std)
    return ds, heldout


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
        fused=args.fused,
    )
