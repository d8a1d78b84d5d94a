"""``lossfloor report``: one self-contained HTML page of results (estimate, diagnose, floor,
schedule, scaling fits) and training runs, grouped by the data they are of."""

from __future__ import annotations

import argparse
import shlex

from lossfloor.cli.common import Declared


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "report",
        help="one HTML page of J*, models' gaps, the floor, the schedule and scaling fits",
        description="Read result JSON files (estimate, diagnose, floor, schedule, scaling fit), "
        "training stats (stats.jsonl) and run directories, and write one self-contained HTML "
        "page: a figure per result, drawn together where they are of the same data, with "
        "sentences that read it and where its numbers came from. No network is needed to view "
        "it; it reads on a phone and prints.",
    )
    p.add_argument("result", nargs="+", metavar="RESULT",
                   help="result JSON, stats.jsonl or run directory")  # fmt: skip
    p.add_argument("--out", required=True, metavar="REPORT.html", help="the HTML page")
    p.add_argument("--title", default=None, help="the page's title (default: the data's names)")
    p.set_defaults(run=run, declared=Declared(inputs=("RESULT",), outputs=("--out",)))


def run(args: argparse.Namespace) -> int:
    from lossfloor.cli.common import check_args
    from lossfloor.report import write_report

    check_args(args)
    command = shlex.join(["lossfloor", "report", *args.result, "--out", args.out]
                         + (["--title", args.title] if args.title else []))  # fmt: skip
    write_report(args.result, args.out, args.title, command)
    print(f"report of {len(args.result)} input(s) written to {args.out}")
    return 0
