"""``lossfloor report``: the page of a digits estimate + diagnosis + floor + schedule has every
section, its sentences carry the results' numbers, it references nothing outside itself, and
it renders in headless Chromium without console errors (a screenshot that is not blank)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from lossfloor.cli import main
from lossfloor.diagnosis import Diagnosis
from lossfloor.floor import Floor
from lossfloor.optimal import Curve
from lossfloor.report import build_report, sigma_star
from lossfloor.report.sections import g, sigma_list
from lossfloor.schedules.optimal import ScheduleTable

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
RESULTS = ROOT / "docs" / "results"
CURVE, DIAGNOSIS = DATA / "digits-demo.json", DATA / "digits-diagnosis.json"


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> dict[str, Path]:
    """A digits floor (held out: 300 mirrored digits) and the optimal-loss schedule of the
    committed digits estimate and diagnosis, made by the CLI."""
    from lossfloor.data import load_dataset

    folder = tmp_path_factory.mktemp("digits")
    held = folder / "held.npz"
    np.savez(held, x=load_dataset("digits").x[:300].flip(-1).numpy())
    floor, schedule = folder / "floor.json", folder / "schedule.json"
    assert main(["floor", "--data", "digits", "--heldout", str(held), "--sigmas", "0.1,1,10",
                 "--levels", "3", "--repeats", "2", "--outer", "128", "--out", str(floor),
                 "--quiet"]) == 0  # fmt: skip
    assert main(["schedule", "--curve", str(CURVE), "--gap", str(DIAGNOSIS), "--fit",
                 "--out", str(schedule)]) == 0  # fmt: skip
    return {"curve": CURVE, "diagnosis": DIAGNOSIS, "floor": floor, "schedule": schedule}


@pytest.fixture(scope="module")
def page(digits) -> str:
    return build_report([str(p) for p in digits.values()])


def _text(html: str) -> str:
    """The page's text: tags dropped, entities of the escaped characters restored."""
    text = re.sub(r"<[^>]+>", " ", html)
    return text.replace("&#x27;", "'").replace("&quot;", '"').replace("&lt;", "<").replace(
        "&gt;", ">").replace("&amp;", "&")  # fmt: skip


@pytest.mark.slow
def test_every_section_of_a_digits_page_is_present(page):
    for key in ("overview", "estimate", "diagnosis-1", "floor", "schedule"):
        assert f'id="d1-{key}"' in page, key
    assert page.count('<section class="result"') == 5
    assert page.count('<img src="data:image/png;base64,') == 5
    assert "Data: digits, N = 1,797" in _text(page)
    assert page.count("Where these numbers came from") == 4  # the overview has none of its own


@pytest.mark.slow
def test_the_sentences_carry_the_results_numbers(page, digits):
    text = _text(page)
    curve, d = Curve.load(digits["curve"]), Diagnosis.load(digits["diagnosis"])
    floor, schedule = Floor.load(digits["floor"]), ScheduleTable.load(digits["schedule"])
    star = sigma_star(curve.sigmas, curve.values, curve.data_variance)
    assert star is not None
    assert f"σ* ≈ {g(star)}: below it J* ≈ 0" in text
    assert f"data variance ({g(curve.data_variance)})" in text
    peak = max(d.points, key=lambda p: p.gap)
    assert f"The gap peaks at σ ≈ {g(peak.sigma)} ({g(peak.gap)} ± {g(peak.gap_stderr, 2)}" in text
    verdicts = {p.verdict: p.sigma for p in floor.points}
    for verdict, sigma in verdicts.items():
        assert f"{verdict.capitalize()} at σ = {g(sigma)}:" in text
    assert f"P_mean = {schedule.fit['P_mean']:.3f}, P_std = {schedule.fit['P_std']:.3f}" in text
    assert f"σ* = {g(schedule.params['resolved']['sigma_star'])};" in text
    assert curve.dataset is not None
    assert curve.dataset["sha256"] in text  # provenance: the full fingerprint


def _sections(page: str) -> dict[str, str]:
    """Each result section's text by its key ("estimate", "floor", …), runs of white space
    as one space (a table row reads "label value")."""
    found = re.findall(r'<section class="result" id="d1-([\w-]+)">(.*?)</section>', page, re.S)
    return {key: re.sub(r"\s+", " ", _text(body)) for key, body in found}


@pytest.mark.slow
def test_a_cli_files_provenance_is_on_the_page_and_an_old_files_is_said_missing(page, digits):
    """The floor and the schedule, written by the CLI here, show the torch version, the
    command and the CPU; the committed estimate (written before provenance) says it lacks them."""
    import shlex

    import torch

    sections = _sections(page)
    floor = Floor.load(digits["floor"]).provenance
    assert floor is not None
    words = shlex.split(floor["command"])
    assert words[:2] == ["lossfloor", "floor"]
    assert words[words.index("--out") + 1] == str(digits["floor"])
    for key in ("floor", "schedule"):
        text = sections[key]
        assert f"torch {torch.__version__}" in text, key
        assert f"command lossfloor {key} " in text, key
        assert floor["cpu"] in text, key
        assert "torch version, CPU/GPU, command" not in text, key
    assert floor["command"] in sections["floor"]
    assert "torch version, CPU/GPU, command not recorded in the file" in sections["estimate"]


@pytest.mark.slow
def test_sigma_star_is_the_schedules_rule(digits):
    """The report's σ* of the curve is the one the optimal-loss schedule resolved from it."""
    curve, schedule = Curve.load(digits["curve"]), ScheduleTable.load(digits["schedule"])
    star = sigma_star(curve.sigmas, curve.values, curve.data_variance)
    assert star == pytest.approx(schedule.params["resolved"]["sigma_star"], rel=1e-12)


def test_sigma_star_interpolates_log_linearly():
    """Closed form: J* = 1e-3, 1e-1 at σ = 1, 4 and the level 1e-2 half way in ln J*, so σ* is
    half way in ln σ: 2; a level reached at the first point gives that point; none: None."""
    s, v = np.array([1.0, 4.0]), np.array([1e-3, 1e-1])
    assert sigma_star(s, v, 1.0) == pytest.approx(2.0, rel=1e-12)
    assert sigma_star(s, v, 1e-1) == 1.0
    assert sigma_star(s, v, 100.0) is None


def test_sigma_list_reads_few_and_many():
    assert sigma_list([2.0, 0.5]) == "σ = 0.5 and 2"
    assert sigma_list([1, 2, 3, 4, 5]) == "σ = 1 to 5 (5 levels)"


@pytest.mark.slow
def test_the_page_references_nothing_outside_itself(page):
    assert not re.search(r"https?:", page)
    assert re.findall(r'src="([^"]*)"', page) and all(
        s.startswith("data:image/png;base64,") for s in re.findall(r'src="([^"]*)"', page)
    )
    for outside in ("<script", "<link", "@import", "url(", "@font-face", "<iframe"):
        assert outside not in page, outside
    hrefs = re.findall(r'href="([^"]*)"', page)
    assert hrefs and all(h.startswith("#") for h in hrefs)  # the contents' links only
    ids = set(re.findall(r'id="([^"]*)"', page))
    assert {h[1:] for h in hrefs} <= ids


@pytest.mark.slow
def test_a_floor_reading_is_said_per_sigma():
    """The Fashion-MNIST reading (docs/results): each reading with its σ, the model named."""
    path = RESULTS / "fmnist-floor-reading.json"
    text = _text(build_report([str(path)]))
    d = Diagnosis.load(path)
    by: dict[str, list[float]] = {}
    for p in d.points:
        assert p.reading is not None
        by.setdefault(p.reading, []).append(p.sigma)
    for reading, sigmas in by.items():
        assert f"{reading.capitalize()} at {sigma_list(sigmas)}:" in text
    assert "Model 1 (edm-s0)" in text


@pytest.mark.slow
def test_results_of_other_data_are_other_groups_and_a_run_directory_joins_its_data(tmp_path):
    """A run directory (config.json's data, stats.jsonl) is drawn with the results of its data;
    Fashion-MNIST's estimate is a group of its own; a scaling fit records no data."""
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(DATA / "train-stats-0.1.0.jsonl", run / "stats.jsonl")
    digits = Curve.load(CURVE).dataset
    (run / "config.json").write_text(json.dumps({"data": digits, "steps": 30}))
    page = build_report([str(CURVE), str(RESULTS / "fmnist-full.json"), str(run),
                         str(RESULTS / "scaling" / "fit-flops.json")])  # fmt: skip
    headings = re.findall(r"<h2[^>]*>([^<]*)</h2>", page)
    assert [h.split(",")[0] for h in headings] == [
        "Data: digits", "Data: fashion-mnist", "Results whose files record no dataset"
    ]  # fmt: skip
    assert 'id="d1-training-1"' in page and 'id="d3-scaling-1"' in page
    last = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()][-1]
    assert f"up to step {last['step']:,}" in _text(page)


@pytest.mark.parametrize(
    ("content", "says"),
    [
        ('{"a": 1}', "not a lossfloor result"),
        ("[1, 2]", "not an object"),
        ('{"format": "lossfloor-other", "version": 1}', "no result the report reads"),
        ("{not json", "not valid JSON"),
        (None, "no such file"),
        (b"\x89PNG\xff\xfe", "not text"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, content, says):
    """A JSON that is no result, another kind of file, a missing path: one line, exit 2, and
    no page written."""
    path = tmp_path / "x.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    out = tmp_path / "r.html"
    assert main(["report", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and says in err, err
    assert not out.exists()


def test_a_folder_without_stats_is_refused(tmp_path, capsys):
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "r.html")]) == 2
    assert "no run directory" in capsys.readouterr().err


def test_cli_writes_the_page_with_its_title(tmp_path, capsys):
    out = tmp_path / "r.html"
    argv = ["report", str(RESULTS / "fmnist-full.json"), "--out", str(out), "--title", "T & t"]
    assert main(argv) == 0
    html = out.read_text(encoding="utf-8")
    assert "<title>T &amp; t</title>" in html and "lossfloor report" in html  # the command
    assert str(out) in capsys.readouterr().out


# --- headless Chromium ----------------------------------------------------------------------

#: Appended to a copy of the page (the page itself has no scripts): counts the page's error
#: events (capture phase: failed loads and uncaught errors), images that did not decode, and
#: whether the page is wider than the window, into an attribute that --dump-dom shows.
CHECK = """<script>
let errors = 0;
addEventListener("error", () => { errors += 1; }, true);
addEventListener("load", () => {
  const broken = [...document.images].filter(i => !i.complete || i.naturalWidth === 0).length;
  const wide = document.documentElement.scrollWidth > window.innerWidth;
  document.body.setAttribute("data-check", `errors=${errors} broken=${broken} wide=${wide}`);
});
</script>"""


def _chromium(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("chromium")
    if exe is None:
        pytest.skip("no chromium (Debian's package; .ci/run installs it)")
    argv = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            "--enable-logging=stderr", "--v=0", *args]  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)


def _console(stderr: str) -> list[str]:
    """Chromium's console lines (console.log/error, uncaught exceptions) in its log."""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


@pytest.mark.slow
def test_the_page_renders_in_headless_chromium(page, tmp_path):
    """The page in Chromium: no console line, no error event, every image decoded, no
    horizontal scrolling on a phone-wide window (390 px), and a screenshot with varied pixels."""
    from PIL import Image

    html = tmp_path / "report.html"
    html.write_text(page, encoding="utf-8")
    checked = tmp_path / "checked.html"
    checked.write_text(page.replace("</body>", CHECK + "</body>"), encoding="utf-8")
    dom = _chromium("--window-size=390,844", "--virtual-time-budget=10000", "--dump-dom",
                    checked.as_uri())  # fmt: skip
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert 'data-check="errors=0 broken=0 wide=false"' in dom.stdout
    assert not _console(dom.stderr)
    shot = tmp_path / "shot.png"
    run = _chromium(f"--screenshot={shot}", "--window-size=1000,2400", html.as_uri())
    assert run.returncode == 0, run.stderr[-2000:]
    assert not _console(run.stderr)
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert pixels.shape == (2400, 1000)
    assert pixels.std() > 10 and len(np.unique(pixels)) > 50  # text and figures, not blank
    assert (pixels < 128).mean() > 0.01  # dark ink on a good share of the screen


@pytest.mark.slow
def test_unresolved_points_are_said_and_not_zeros(tmp_path):
    """Points the draws do not resolve (low ESS) are named as unresolved, with their σ."""
    obj = json.loads(CURVE.read_text())
    for p in obj["points"][:3]:
        p["resolved"], p["ess"] = False, 1.5
    path = tmp_path / "curve.json"
    path.write_text(json.dumps(obj))
    text = _text(build_report([str(path)]))
    sigmas = [p["sigma"] for p in obj["points"][:3]]
    assert f"3 of {len(obj['points'])} points are unresolved" in text
    assert f"too few effective draws: {sigma_list(sigmas)})" in text and "not zeros" in text


def test_a_model_within_two_standard_errors_is_said_so(tmp_path):
    """A gap within 2 s.e. of zero at σ = 0.1 (the committed diagnosis with that point's gap
    set to 1.5 s.e.): that σ is named as nothing left to learn; the peak stays at the largest
    gap."""
    obj = json.loads(DIAGNOSIS.read_text())
    first = obj["points"][0]
    first["gap"] = 1.5 * first["gap_stderr"]
    path = tmp_path / "diagnosis.json"
    path.write_text(json.dumps(obj))
    text = _text(build_report([str(path)]))
    assert "within 2 s.e. of J* at σ = 0.1: nothing is left to learn there" in text
    peak = max(obj["points"], key=lambda p: p["gap"])
    assert f"The gap peaks at σ ≈ {g(peak['sigma'])} ({g(peak['gap'])}" in text
