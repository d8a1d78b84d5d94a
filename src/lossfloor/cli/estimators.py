"""``lossfloor estimators``: what each registered estimator can do, read from its declared
capabilities (where it runs and why not elsewhere, draws, forms, options, needs)."""

from __future__ import annotations

import argparse
from typing import Any

from lossfloor.cli.common import Declared, check_args, estimator_option


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "estimators",
        help="what each estimator of `estimate --estimator` can do (where it runs, draws, "
        "forms, options)",
        description=__doc__.splitlines()[0] + " " + " ".join(__doc__.splitlines()[1:]),
    )
    parser.add_argument("--json", metavar="FILE", default=None, help="also write this as JSON")
    parser.set_defaults(run=run, declared=Declared(outputs=("--json",)))


def _choices(values: frozenset[str], default: str) -> str:
    return f"{', '.join(sorted(values))} (auto: {default})"


def describe() -> dict[str, dict[str, Any]]:
    """Each registered estimator's name → its summary line and declared capabilities."""
    from lossfloor.optimal.capabilities import ITEMS, PLACES
    from lossfloor.optimal.estimators import ESTIMATORS, declared

    out = {}
    for name, caps in declared().items():
        doc = (ESTIMATORS.get(name).__doc__ or "").strip()
        out[name] = {
            "summary": doc.splitlines()[0].replace("``", "") if doc else "",
            "runs_on": [p for p in PLACES if p in caps.runs_on],
            "not_on": {p: caps.why_not[p] for p in PLACES if p not in caps.runs_on},
            "items": [k for k in ITEMS if k in caps.items],
            "not_for": {k: caps.why_not[k] for k in ITEMS if k not in caps.items},
            "draws": sorted(caps.draws),
            "default_draws": caps.default_draws,
            "forms": sorted(caps.forms),
            "default_form": caps.default_form,
            "options": sorted(caps.options),
            "needs_neighbours": caps.needs_neighbours,
            "sweeps_grid": caps.sweeps_grid,
            "adapts_inner": caps.adapts_inner,
            "exact": caps.exact,
        }
    return out


def _lines(name: str, d: dict[str, Any]) -> list[str]:
    from lossfloor.optimal.capabilities import ITEM_TEXT, PLACE_TEXT

    flags = [
        ("exact", "exact per-draw values (a diagnosis pairs a model's loss with them)"),
        (
            "sweeps_grid",
            "sweeps a whole σ grid at once (one process in memory: any draws and "
            "sizes; sharded or streamed: plain draws, fixed sizes)",
        ),
        ("needs_neighbours", "reads the neighbour index of the sources"),
        ("adapts_inner", "--target-rse also sizes its --inner"),
    ]
    lines = [f"{name}: {d['summary']}"]
    lines.append("  runs on   " + ", ".join(PLACE_TEXT[p] for p in d["runs_on"]))
    lines += [f"  not on    {PLACE_TEXT[p]}: {why}" for p, why in d["not_on"].items()]
    lines.append("  items     " + ", ".join(ITEM_TEXT[k] for k in d["items"]))
    lines += [f"  not for   {ITEM_TEXT[k]}: {why}" for k, why in d["not_for"].items()]
    lines.append("  draws     " + _choices(frozenset(d["draws"]), d["default_draws"]))
    lines.append("  forms     " + _choices(frozenset(d["forms"]), d["default_form"]))
    options = ", ".join(estimator_option(o) for o in d["options"]) or "none"
    lines.append("  options   " + options)
    lines += [f"  also      {text}" for key, text in flags if d[key]]
    return lines


def run(args: argparse.Namespace) -> int:
    from lossfloor.io import write_json

    check_args(args)
    described = describe()
    print("\n\n".join("\n".join(_lines(name, d)) for name, d in described.items()))
    if args.json:
        write_json(args.json, described)
    return 0
