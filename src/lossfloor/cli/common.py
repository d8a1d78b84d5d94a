"""Options several subcommands share: data selection, σ grids, the device, output checks, the
optimal-loss schedule's options (``schedule`` and ``train --schedule optimal``)."""

from __future__ import annotations

import argparse
import fnmatch
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from lossfloor.errors import ParameterError, UserError
from lossfloor.io import check_writable

if TYPE_CHECKING:  # torch and the data layer load when a command runs, not for --help
    import torch

    from lossfloor.data import Dataset
    from lossfloor.results import Result
    from lossfloor.schedules import NoiseSchedule, OptimalLossSchedule

    R = TypeVar("R", bound=Result)


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("data")
    g.add_argument(
        "--data",
        required=True,
        metavar="SPEC",
        help="digits | fashion-mnist[:test] | mnist10k | FILE.npz | FILE.npy | FOLDER | EDM.zip "
        "| LATENT_FOLDER (LightningDiT shards)",
    )
    g.add_argument(
        "--limit", type=int, default=None, metavar="N", help="use the first N items (default: all)"
    )
    g.add_argument("--xflip", action="store_true", help="add mirrored copies (doubles the set)")
    g.add_argument("--key", default=None, help="array key inside an .npz (default: x, or the only)")
    g.add_argument("--labels-key", default=None, help="labels key inside an .npz (default: y)")
    g.add_argument(
        "--encoder",
        choices=("sd-vae", "raw", "lightningdit"),
        default=None,
        help="latent data (an EDM2 latent zip, an .npz with mean and std, a LightningDiT "
        "latent FOLDER) to final units: sd-vae = EDM2's Stable Diffusion VAE constants, raw = "
        "as stored, lightningdit = (x − mean)/std of its latents_stats.pt (its default)",
    )
    g.add_argument(
        "--latent-scale",
        type=_floats,
        default=None,
        metavar="S[,S...]",
        help="latent data's final units: x·S + B per channel (or one value for all)",
    )
    g.add_argument("--latent-bias", type=_floats, default=None, metavar="B[,B...]",
                   help="see --latent-scale (default 0)")  # fmt: skip


def _floats(text: str) -> list[float]:
    """A comma-separated list of numbers (argparse's type: a bad one exits 2 in one line)."""
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a comma-separated list of numbers: {text!r}"
        ) from None


def load_data_from_args(args: argparse.Namespace) -> Dataset:
    """The Dataset named by --data/--limit/--xflip/--key/--labels-key and, for latent data,
    --encoder/--latent-scale/--latent-bias (a --limit beyond the data's size is said,
    ``note_limit``)."""
    from lossfloor.data import load_dataset

    ds = load_dataset(
        args.data,
        limit=args.limit,
        xflip=args.xflip,
        key=args.key,
        labels_key=args.labels_key,
        encoder=args.encoder,
        latent_scale=args.latent_scale,
        latent_bias=args.latent_bias,
    )
    note_limit(args.limit, ds.n // 2 if ds.xflip else ds.n)
    return ds


def say(line: str) -> None:
    """``line`` on stderr, from the first process only (torchrun's RANK 0, or no torchrun):
    the notes and warnings every process would otherwise repeat."""
    if os.environ.get("RANK", "0") == "0":
        print(line, file=sys.stderr)


def note_limit(limit: int | None, n: int, option: str = "--limit") -> None:
    """One line on stderr when ``limit`` exceeds the ``n`` items there are: all ``n`` are
    used."""
    if limit is not None and limit > n:
        say(f"lossfloor: note: {option} {limit}: the data has {n} items; using all {n}")


@dataclass(frozen=True)
class Declared:
    """What a command reads and writes, by option (``--out``; a positional by its metavar,
    ``RUN_DIR``), and which options apply only under another: ``check_args`` checks them all
    before any work."""

    inputs: tuple[str, ...] = ()
    """Files or folders read (a value naming no existing path, e.g. ``digits``, is no file)."""
    outputs: tuple[str, ...] = ()
    """Files written."""
    partial: tuple[str, ...] = ()
    """The outputs also checkpointed beside themselves, to FILE.partial."""
    folders: tuple[str, ...] = ()
    """Folders written (a run directory)."""
    needs: tuple[tuple[str, str], ...] = ()
    """(option, the option it applies under): the first given without the second is refused."""


#: The files a model folder input (a run directory, a saved diffusers pipeline) is read from
#: (``fnmatch`` patterns, at any depth): its configs, weights and stats. A data folder is read
#: from its images and labels (``_data_files``). An output there would replace or join them;
#: other files in those folders are free to write.
MODEL_FILES = ("config.json", "model_index.json", "scheduler_config.json", "stats.jsonl",
               "*.pt", "*.pth", "*.ckpt", "*.safetensors", "*.bin")  # fmt: skip
_MODEL_OPTIONS = ("--model", "RUN_DIR", "--vae")


#: The suffix of the checkpoint beside an output that a rerun resumes from.
PARTIAL = ".partial"


def _data_files() -> tuple[str, ...]:
    """The files a data folder is read from: its images (``formats.IMAGE_SUFFIXES``) and the
    labels file."""
    from lossfloor.data.formats import IMAGE_SUFFIXES, LABELS_FILE

    return (*(f"*{s}" for s in IMAGE_SUFFIXES), LABELS_FILE)


def _dest(option: str) -> str:
    """The attribute of ``option`` in the parsed arguments (``--out-grid`` → ``out_grid``)."""
    return option.removeprefix("--").replace("-", "_").lower()


def _given(args: argparse.Namespace, option: str) -> bool:
    """Whether ``option`` was given: its value is neither None nor False (a flag's default)."""
    value = getattr(args, _dest(option))
    return value is not None and value is not False


def _paths(args: argparse.Namespace, option: str) -> list[str]:
    """The paths given to ``option`` (none, one, or a positional's list)."""
    value = getattr(args, _dest(option))
    return [] if value is None else [value] if isinstance(value, str) else list(value)


def _resolved(path: str) -> Path:
    """``path`` made absolute with every symlink followed (so ``./x``, ``x`` and a link to
    ``x`` are one path)."""
    return Path(path).resolve()


def _within(path: Path, folder: Path, patterns: tuple[str, ...]) -> bool:
    """Whether ``path`` lies below ``folder`` under a name ``patterns`` match."""
    return path.is_relative_to(folder) and any(fnmatch.fnmatch(path.name, p) for p in patterns)


def _collides(out: Path, out_folder: bool, read: Path, read_option: str) -> bool:
    """Whether writing ``out`` (a file, or with ``out_folder`` a run directory) touches the
    input ``read``: the same path, one of the files of a folder input, or (a run directory)
    an input that is one of the run's files."""
    if out == read:
        return True
    if read.is_dir():
        patterns = MODEL_FILES if read_option in _MODEL_OPTIONS else _data_files()
        if _within(out, read, patterns):
            return True
    return out_folder and _within(read, out, MODEL_FILES)


def check_args(args: argparse.Namespace, write: bool = True) -> None:
    """The one check of a command's declared options (``args.declared``, a ``Declared``),
    made at the start of its ``run``, before any work: an option given without the one it
    applies under; an output that is an input or another output (paths compared resolved:
    symlinks followed, ``./x`` = ``x``; FILE.partial counted); and, with ``write`` (one
    process of several passes False), every output tried by writing there
    (``io.check_writable``). Each is one line, a ``UserError``."""
    declared: Declared = args.declared
    for option, needed in declared.needs:
        if _given(args, option) and not _given(args, needed):
            raise UserError(f"{option}: applies only with {needed}; give {needed} or drop {option}")
    written: dict[Path, str] = {}  # every path written → "OPTION PATH" that writes it
    outputs = [(o, p) for o in (*declared.outputs, *declared.folders) for p in _paths(args, o)]
    for option, path in outputs:
        files = [path, *([path + PARTIAL] if option in declared.partial else [])]
        for file in files:
            key = _resolved(file)
            if key in written:
                raise UserError(
                    f"{option} {path}: {written[key]} writes there too; give each output its own "
                    "path"
                )
            written[key] = f"{option} {path}"
            for read_option in declared.inputs:
                for read in _paths(args, read_option):
                    if os.path.exists(read) and _collides(
                        key, option in declared.folders, _resolved(read), read_option
                    ):
                        raise UserError(
                            f"{option} {path}: would overwrite the input {read_option} {read}; "
                            "write the output elsewhere"
                        )
    if write:
        for option, path in outputs:
            siblings = (PARTIAL,) if option in declared.partial else ()
            check_writable(path, option, siblings, folder=option in declared.folders)


@dataclass(frozen=True)
class Invocation:
    """How this command was run: its argv ("lossfloor", the command, its options) and when it
    started (``time.time()``); ``main`` puts it on the parsed arguments as ``args.invocation``."""

    argv: list[str]
    started: float


def save_result(result: R, path: str, args: argparse.Namespace) -> R:
    """Save ``result`` at ``path`` with the provenance of this run (``args.invocation``, the
    time now: ``provenance.describe_run``); returns the result saved. The one place the CLI
    records where its result files came from (the library's results carry none)."""
    from lossfloor.provenance import describe_run

    run: Invocation = args.invocation
    saved = replace(result, provenance=describe_run(run.argv, run.started))
    saved.save(path)
    return saved


def write_plot(path: str, draw: Callable[[], object], written: str | None) -> None:
    """``draw()`` the plot at ``path``; a failure is one line that says which result file
    (``written``) was saved before it."""
    try:
        draw()
    except Exception as exc:  # any plotting failure: the results are already safe
        kept = f"; the results are in {written}" if written else ""
        reason = f"{type(exc).__name__}: {exc}"
        raise UserError(f"--plot {path}: the plot failed ({reason}){kept}") from None


def parse_sigmas(text: str, option: str = "--sigmas") -> list[float]:
    """``"0.1,1,10"`` (a list) or ``"min:max:count"`` (log-spaced, both ends included), checked
    as a σ grid (``lossfloor.optimal.precision.check_sigmas``) and reported under ``option``."""
    from lossfloor.optimal.precision import check_sigmas

    text = text.strip()
    try:
        if ":" in text:
            parts = text.split(":")
            if len(parts) != 3:
                raise ValueError
            lo, hi, count = float(parts[0]), float(parts[1]), int(parts[2])
            if count < 1:
                raise UserError(f"{option} {text}: the count must be at least 1")
            if lo <= 0 or hi <= 0:
                raise UserError(f"{option} {text}: σ must be > 0 (the grid is log-spaced)")
            if count == 1:
                values = [lo]
            else:
                step = (math.log(hi) - math.log(lo)) / (count - 1)
                values = [math.exp(math.log(lo) + i * step) for i in range(count)]
        else:
            values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(
            f"{option} {text!r}: expected a comma-separated list (0.1,1,10) or min:max:count"
        ) from None
    if not values:
        raise UserError(f"{option} {text!r}: no σ given; give a list 0.1,1,10 or min:max:count")
    try:
        check_sigmas(values)
    except ParameterError as exc:
        raise UserError(exc.for_option(option)) from None
    return values


def parse_total(name: str | None) -> NoiseSchedule | None:
    """The schedule --total names (None without it): one with p(σ) and w(σ) of its own, not
    the optimal-loss schedule, which is built from a J* curve (``lossfloor schedule``)."""
    from lossfloor.schedules import SCHEDULE_NAMES, SCHEDULES, get_schedule

    if name is None:
        return None
    try:
        known = SCHEDULES.canonical(name) in SCHEDULE_NAMES
    except UserError:  # its message lists the optimal-loss schedule too
        known = False
    if not known:
        raise UserError(f"--total {name}: expected one of {' | '.join(SCHEDULE_NAMES)}")
    return get_schedule(name)


def parse_bandwidth(text: str) -> float | str | None:
    """auto | none | a number ≥ 0 (checked by the library)."""
    if text in ("auto", "none"):
        return None if text == "none" else text
    try:
        return float(text)
    except ValueError:
        raise UserError(f"--bandwidth {text}: expected auto, none or a number ≥ 0") from None


#: The devices --device names; ``auto`` is cuda when a CUDA device is available, else cpu.
DEVICES = ("auto", "cpu", "cuda")


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """--device, the one device rule of every command (``resolve_device``)."""
    parser.add_argument(
        "--device",
        default="auto",
        help="auto | cpu | cuda; auto: cuda when a CUDA device is available, else cpu",
    )


def add_dtype_argument(parser: argparse.ArgumentParser) -> None:
    """--dtype, the precision rule of the estimators (``precision.choose_dtype``)."""
    parser.add_argument(
        "--dtype",
        default="auto",
        help="float32 | float64 | auto (float64 where float32's error bound is too large: small "
        "σ, large data, huge σ)",
    )


def resolve_device(name: str) -> torch.device:
    """The torch device named by --device: cpu, cuda (which must be available) or auto (cuda
    when available, else cpu): the library's rule (``lossfloor.device.resolve_device``)."""
    from lossfloor.device import resolve_device as library_rule

    if name not in DEVICES:
        raise UserError(f"--device {name}: expected {' | '.join(DEVICES)}")
    try:
        return library_rule(name)
    except ParameterError as exc:
        raise UserError(exc.for_option("--device")) from None


# OptimalLossSchedule parameter → (option, type, help); options default to None (= the
# schedule's default), so only the options given reach the schedule.
_PARAMS: dict[str, tuple[str, type, str]] = {
    "a": ("--weight-scale", float, "a in w = a·min(1/J*, w_max) + bump (default 1)"),
    "w_max": ("--w-max", float, "cap of 1/J* (default 1/J*(σ*))"),
    "sigma_star": ("--sigma-star", float, "σ* (default: smallest σ with J* ≥ τ·Var)"),
    "star_threshold": ("--star-threshold", float, "τ of the σ* rule (default 0.01)"),
    "bump": ("--bump", float, "bump height below σ*, relative to a·w_max (default 0: off)"),
    "bump_mean": ("--bump-mean", float, "bump centre μ in ln σ (default ln σ* − 1)"),
    "bump_std": ("--bump-std", float, "bump width s in ln σ (default 0.5)"),
    "density": ("--density", str, "gap: p ∝ (w·gap)^γ; lognormal: EDM's p (default gap)"),
    "p_mean": ("--p-mean", float, "lognormal density: mean of ln σ (default -1.2)"),
    "p_std": ("--p-std", float, "lognormal density: std of ln σ (default 1.2)"),
    "exponent": ("--exponent", float, "γ in p ∝ (w·gap)^γ (default 1)"),
    "gap_floor": ("--gap-floor", float, "gap ≥ this × its maximum (default 0.02)"),
    "halflife": ("--gap-halflife", float, "online gap: half-life in images (default 2000)"),
    "bins": ("--gap-bins", int, "online gap: ln σ bins (default 32)"),
    "sigma_min": ("--sigma-min", float, "lowest σ drawn (default 0.002)"),
    "sigma_max": ("--sigma-max", float, "highest σ drawn (default 80)"),
}
PARAM_OPTIONS = {
    **{param: option for param, (option, _, _) in _PARAMS.items()},
    "optimal_loss": "--curve",
    "gap": "--gap",
}

#: The option of `estimate` that sets an estimator parameter, where it is not --<param>.
ESTIMATOR_OPTIONS = {"exclude_source": "--source-in-random"}


def estimator_option(param: str) -> str:
    """`estimate`'s option for the estimator parameter ``param``."""
    return ESTIMATOR_OPTIONS.get(param, "--" + param.replace("_", "-"))


#: The parameters of the online gap, which exists only while training.
_ONLINE = ("halflife", "bins")


def add_schedule_options(parser: argparse.ArgumentParser, train: bool = False) -> None:
    """--curve, --gap and the schedule's parameters (``--schedule optimal`` of train, where
    --curve is needed only with it; the online gap's options only there)."""
    g = parser.add_argument_group("optimal-loss schedule" + (" (--schedule optimal)" * train))
    g.add_argument("--curve", default=None, required=not train, metavar="CURVE.json",
                   help="J* curve (lossfloor estimate --out) of the training data")  # fmt: skip
    gap_help = "the gap J_θ − J*: a lossfloor diagnose --out file"
    g.add_argument("--gap", default=None, metavar="DIAGNOSIS.json" + "|online" * train,
                   help=gap_help + (", or online (estimated during training)" if train else "")
                   + " (without it: p from w alone)")  # fmt: skip
    for param, (option, kind, text) in _PARAMS.items():
        if param in _ONLINE and not train:
            continue
        metavar = "{gap,lognormal}" if param == "density" else kind.__name__.upper()
        g.add_argument(option, dest=f"sched_{param}", type=kind, default=None, help=text,
                       metavar=metavar)  # fmt: skip


def build_schedule(args: argparse.Namespace, allow_online: bool) -> OptimalLossSchedule:
    """The schedule of --curve, --gap and the parameters given."""
    from lossfloor.diagnosis import Diagnosis
    from lossfloor.optimal import Curve
    from lossfloor.schedules import OptimalLossSchedule
    from lossfloor.schedules.optimal import gap_range

    if args.curve is None:
        raise UserError("the optimal-loss schedule needs --curve CURVE.json (lossfloor estimate)")
    curve = Curve.load(args.curve)
    gap: Any = None
    if args.gap == "online":
        if not allow_online:
            raise UserError("--gap online exists only while training (lossfloor train)")
        gap = "online"
    elif args.gap is not None:
        gap = Diagnosis.load(args.gap)
    params = {p: getattr(args, f"sched_{p}", None) for p in _PARAMS}
    note = None
    if isinstance(gap, Diagnosis):  # the ends not given: inside the gap's σ, with a note
        given = (params["sigma_min"], params["sigma_max"])
        covered = [p.sigma for p in gap.points]
        ends = gap_range(covered, *given)
        default = (OptimalLossSchedule.sigma_min, OptimalLossSchedule.sigma_max)
        wanted = tuple(d if g is None else g for g, d in zip(given, default, strict=True))
        if ends != wanted:
            note = (
                f"lossfloor: note: the gap {args.gap} covers σ in [{min(covered):.4g}, "
                f"{max(covered):.4g}]: the schedule draws σ in [{ends[0]:.4g}, {ends[1]:.4g}], "
                f"not [{wanted[0]:g}, {wanted[1]:g}] (diagnose over that range, or give "
                "--sigma-min/--sigma-max)"
            )
        params["sigma_min"], params["sigma_max"] = ends
    if isinstance(gap, Diagnosis):
        gap = gap.gap_table(curve.dataset)
    schedule = OptimalLossSchedule.from_curve(
        curve, gap, **{k: v for k, v in params.items() if v is not None}
    )
    if note is not None:
        say(note)
    if (coarse := schedule.coarse_warning()) is not None:
        say(f"lossfloor: warning: --curve {args.curve}: {coarse}")
    return schedule
