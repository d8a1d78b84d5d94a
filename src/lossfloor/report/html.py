"""The page: one self-contained HTML file. Figures are inlined as base64 PNG (``data:`` URIs),
the CSS is inline, there are no scripts and no fonts but the reader's own, so the file opens
offline, reads on a phone (one column, max-width, images scale) and prints (details open,
sections kept whole)."""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from html import escape
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from lossfloor.report.sections import Section

#: Figures' resolution: sharp on a phone and in print, ~100-200 kB a figure.
DPI = 130

CSS = """
:root { color-scheme: light; --ink: #1b1f24; --muted: #57606a; --rule: #d0d7de; }
* { box-sizing: border-box; }
body { margin: 0; font: 16px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
       color: var(--ink); background: #fff; }
main { max-width: 60rem; margin: 0 auto; padding: 1rem; }
h1 { font-size: 1.6rem; margin: .5rem 0; }
h2 { font-size: 1.3rem; margin-top: 2rem; border-bottom: 2px solid var(--rule); }
h3 { font-size: 1.1rem; margin: 1.5rem 0 .5rem; }
.lede, footer, .data { color: var(--muted); }
nav ol { padding-left: 1.2rem; columns: 2 16rem; }
figure { margin: 0; }
.summary { background: #f6f8fa; border-left: 4px solid #0969da; padding: .6rem 1rem; }
.summary ul { margin: .3rem 0 0; padding-left: 1.2rem; }
figure img { display: block; width: 100%; height: auto; }
.reading p { margin: .4rem 0; }
.reading p.units { color: var(--muted); font-size: .9rem; }
details { margin: .5rem 0 1rem; font-size: .85rem; }
summary { cursor: pointer; color: var(--muted); }
table { border-collapse: collapse; width: 100%; table-layout: fixed; }
th, td { text-align: left; vertical-align: top; padding: .2rem .4rem;
         border-top: 1px solid var(--rule); overflow-wrap: anywhere; }
th { width: 30%; font-weight: 600; }
table.values th { width: auto; }
code { font-size: .9em; }
@media (max-width: 40rem) {
  body { font-size: 15px; } main { padding: .5rem; } th { width: 40%; }
  h1 { font-size: 1.3rem; } h2 { font-size: 1.1rem; }
}
@media print {
  nav { display: none; }
  main { max-width: none; padding: 0; }
  section.result { break-inside: avoid; }
  details > summary { display: none; }
  h2 { break-before: auto; break-after: avoid; }
}
"""


def png_data(fig: Figure) -> str:
    """``fig`` as a ``data:image/png;base64,…`` URI (tight bounding box, DPI)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _section(sec: Section, key: str) -> str:
    parts = [f'<section class="result" id="{escape(key)}">', f"<h3>{escape(sec.title)}</h3>"]
    if sec.figure is not None:
        parts.append(f'<figure><img src="{png_data(sec.figure)}" alt="{escape(sec.alt)}"></figure>')
    *reading, units = sec.sentences
    parts.append('<div class="reading">')
    parts += [f"<p>{escape(s)}</p>" for s in reading]
    parts.append(f'<p class="units">{escape(units)}</p></div>')
    if sec.table is not None:
        header, rows = sec.table
        head = "".join(f"<th>{escape(h)}</th>" for h in header)
        cells = "".join(
            "<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in rows
        )
        parts.append(f'<table class="values"><tr>{head}</tr>{cells}</table>')
    if sec.provenance:
        prov = "".join(
            f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>" for k, v in sec.provenance.items()
        )
        parts.append(
            f"<details open><summary>Where these numbers came from</summary><table>{prov}"
            "</table></details>"
        )
    parts.append("</section>")
    return "\n".join(parts)


def page(
    title: str,
    groups: Sequence[tuple[str, Sequence[Section]]],
    footer: Sequence[str],
) -> str:
    """The HTML page: the title, a contents list, per data group (heading, sections) and the
    footer lines (how the page was made)."""
    toc: list[str] = []
    body: list[str] = []
    for g, (heading, sections) in enumerate(groups, start=1):
        body.append(f'<h2 id="data-{g}">{escape(heading)}</h2>')
        summary = "".join(f"<li>{escape(sec.summary)}</li>" for sec in sections if sec.summary)
        if summary:
            body.append(f'<div class="summary"><strong>In short</strong><ul>{summary}</ul></div>')
        for sec in sections:
            key = f"d{g}-{sec.key}"
            toc.append(f'<li><a href="#{key}">{escape(sec.title)}</a></li>')
            body.append(_section(sec, key))
    lede = (
        "What a dataset lets a diffusion model learn, and how far a model is from it. J*(σ) is "
        "the lowest denoising loss any model can reach on the training set at noise level σ; "
        "the gap J_θ − J* is what a model could still learn. Each section says what its figure "
        "shows and what to do about it."
    )
    foot = "".join(f"<p>{escape(line)}</p>" for line in footer)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n"
        f'<h1>{escape(title)}</h1>\n<p class="lede">{escape(lede)}</p>\n'
        f"<nav><ol>{''.join(toc)}</ol></nav>\n" + "\n".join(body) + f"\n<footer>{foot}</footer>\n"
        "</main>\n</body>\n</html>\n"
    )
