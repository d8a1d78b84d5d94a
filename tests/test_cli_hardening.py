"""Hostile input through the CLI (issue 14): one line on stderr and exit 2 before any work, or
a correct value; never a traceback or a NaN."""

from __future__ import annotations

import json
import math

import pytest
from tolerances import sum_rtol

from lossfloor.cli import main

EST = ["estimate", "--data", "digits", "--limit", "100", "--quiet"]


def one_line_error(capsys, argv: list[str]) -> str:
    """Run ``argv``; assert exit 2 and a single stderr line; return it."""
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lossfloor: error: "), err
    return lines[0]


def _commands(out: str) -> list[list[str]]:
    """Each command with one output path set to ``out`` (and inputs that would fail later)."""
    return [
        [*EST, "--sigmas", "1", "--out", out],
        [*EST, "--sigmas", "1", "--plot", out],
        ["diagnose", "--model", "missing-run", "--data", "digits", "--out", out],
        ["sample", "--run", "missing-run", "--n", "1", "--out-grid", out],
        ["sample", "--run", "missing-run", "--n", "1", "--out-npz", out],
        ["fid", "--samples", "missing.npz", "--data", "digits", "--out", out],
        ["data", "--data", "digits", "--json", out],
    ]


@pytest.mark.parametrize("case", range(7))
@pytest.mark.parametrize("kind", ["folder", "under-a-file"])
def test_bad_output_path_is_refused_before_any_work(tmp_path, capsys, case, kind):
    (tmp_path / "file").write_text("x")
    out = tmp_path if kind == "folder" else tmp_path / "file" / "out.json"
    argv = _commands(str(out))[case]
    line = one_line_error(capsys, argv)
    option = next(a for a in argv if a in {"--out", "--plot", "--out-grid", "--out-npz", "--json"})
    assert option in line and ("folder" in line or "is a file" in line)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # nothing written


def test_a_failing_plot_still_writes_the_json(tmp_path, capsys, monkeypatch):
    import lossfloor.plots

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(lossfloor.plots, "plot_optimal_loss", fail)
    out, png = tmp_path / "j.json", tmp_path / "j.png"
    line = one_line_error(capsys, [*EST, "--sigmas", "1", "--out", str(out), "--plot", str(png)])
    assert "--plot" in line and str(out) in line
    assert len(json.loads(out.read_text())["points"]) == 1 and not png.exists()


@pytest.mark.parametrize(
    ("args", "option", "words"),
    [
        (["--sigmas", "1e300"], "--sigmas", "must lie in"),
        (["--sigmas", "1e-200"], "--sigmas", "must lie in"),
        (["--sigmas", "2,1,1", "--total", "edm"], "--sigmas 1.0", "twice"),
        (["--sigmas", "1", "--seed", "-1"], "--seed -1", "≥ 0"),
        (["--sigmas", "1", "--tile-mb", "nan"], "--tile-mb nan", "finite"),
        (["--sigmas", "1", "--outer", "1000000000000"], "--outer", "memory"),
        (["--sigmas", "1e-30", "--dtype", "float32"], "--sigmas 1e-30", "float64"),
        (["--sigmas", "1", "--limit", "1"], "--outer:", "the dataset has 1 item"),
    ],
)
def test_extreme_estimate_options_are_one_line(tmp_path, capsys, args, option, words):
    out = tmp_path / "e.json"
    line = one_line_error(capsys, [*EST, *args, "--out", str(out)])
    assert option in line and words in line
    assert not out.exists() and not (tmp_path / "e.json.partial").exists()


@pytest.mark.parametrize("sigmas", ["1e-300", "1e400", "1e300"])
def test_diagnose_refuses_sigmas_beyond_the_float_range(tmp_path, capsys, sigmas):
    argv = ["diagnose", "--model", "optimal", "--data", "digits", "--limit", "50",
            "--sigmas", sigmas, "--out", str(tmp_path / "d.json")]  # fmt: skip
    assert "--sigmas" in one_line_error(capsys, argv)


@pytest.mark.numerics
def test_huge_and_tiny_sigma_give_the_limits_not_nan(tmp_path, capsys):
    """J*(σ → ∞) is the data variance; J*(σ → 0) is 0 (float32 overflows at 1e50: auto uses
    float64 there)."""
    out = tmp_path / "e.json"
    assert main([*EST, "--sigmas", "1e-100,1e50,1e100", "--out", str(out)]) == 0
    rec = json.loads(out.read_text())
    tiny, big, huge = (p["optimal_loss"] for p in rec["points"])
    assert tiny == 0
    # A/D from the draws' forms (sums over the M draws and D elements) against the data's
    # variance (sums over the N rows): each to its sums' rounding (sum_rtol)
    n, d, m = rec["dataset"]["n"], math.prod(rec["dataset"]["shape"]), rec["estimator"]["outer"]
    rtol = sum_rtol(m + n + 2 * d)
    assert big == pytest.approx(rec["data_variance"], rel=rtol)
    assert huge == pytest.approx(rec["data_variance"], rel=rtol)


def test_data_near_the_float32_range_is_computed_in_float64(tmp_path, capsys):
    import numpy as np

    x = np.random.default_rng(0).standard_normal((40, 4)).astype(np.float32) * 1e19
    np.save(tmp_path / "big.npy", x)
    out = tmp_path / "e.json"
    argv = ["estimate", "--data", str(tmp_path / "big.npy"), "--sigmas", "1e25", "--quiet"]
    assert main([*argv, "--out", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert rec["points"][0]["dtype"] == "float64"
    assert rec["points"][0]["optimal_loss"] == pytest.approx(rec["data_variance"], rel=1e-9)


def test_argparse_errors_carry_one_prefix(capsys):
    line = one_line_error(capsys, [*EST, "--sigmas"])
    assert line.count("lossfloor") == 2 and "lossfloor estimate --help" in line
    assert not line.startswith("lossfloor: error: lossfloor")


def interrupted_after_first_sigma(monkeypatch, run):
    """``run()`` with the second σ's per-sample values interrupted (KeyboardInterrupt; the
    first σ's checkpoint remains); its result."""
    import lossfloor.optimal.estimate as estimate_module

    real, calls = estimate_module.per_sample_values, {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(estimate_module, "per_sample_values", flaky)
    try:
        return run()
    finally:
        monkeypatch.setattr(estimate_module, "per_sample_values", real)


def _partial_of(capsys, tmp_path, monkeypatch, args: list[str]):
    """Interrupt an estimate with ``args`` after its first σ; return its --out path."""
    out = tmp_path / "run.json"
    rc = interrupted_after_first_sigma(monkeypatch, lambda: main([*EST, *args, "--out", str(out)]))
    assert rc == 130
    capsys.readouterr()
    return out


@pytest.mark.slow
def test_a_partial_of_other_options_is_refused_unless_restart(tmp_path, capsys, monkeypatch):
    out = _partial_of(capsys, tmp_path, monkeypatch, ["--sigmas", "0.5,2", "--seed", "1"])
    partial = out.with_name("run.json.partial")
    before = partial.read_text()
    line = one_line_error(capsys, [*EST, "--sigmas", "0.5,2", "--seed", "2", "--out", str(out)])
    assert "other data or options" in line and "or set --restart to discard them" in line
    assert partial.read_text() == before and not out.exists()
    assert main([*EST, "--sigmas", "0.5,2", "--seed", "2", "--restart", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["estimator"]["seed"] == 2 and not partial.exists()


def test_resume_matches_sigma_within_a_relative_tolerance(tmp_path, capsys, monkeypatch):
    out = _partial_of(capsys, tmp_path, monkeypatch, ["--sigmas", "0.1,2"])
    rc = main(["estimate", "--data", "digits", "--limit", "100", "--sigmas",
               "0.10000000000000002,2", "--out", str(out)])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 0
    assert "resuming: 1 of 2 σ already computed" in err and "σ = 0.1)" in err


def test_a_malformed_partial_is_one_line(tmp_path, capsys):
    out = tmp_path / "run.json"
    out.with_name("run.json.partial").write_text('["not", "a", "checkpoint"]')
    line = one_line_error(capsys, [*EST, "--sigmas", "1", "--out", str(out)])
    assert "is not a checkpoint" in line and "or set --restart to overwrite it" in line


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 2-step tiny run on the first 24 digits."""
    run_dir = tmp_path_factory.mktemp("run") / "r"
    argv = ["train", "--data", "digits", "--limit", "24", "--run-dir", str(run_dir),
            "--steps", "2", "--batch", "8", "--model", "tiny", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    return run_dir


@pytest.mark.slow
def test_diagnose_on_other_data_warns(tmp_path, capsys, monkeypatch, tiny_run):
    monkeypatch.setenv("LOSSFLOOR_CACHE", str(tmp_path / "cache"))
    base = ["diagnose", "--model", str(tiny_run), "--data", "digits", "--sigmas", "1",
            "--outer", "16", "--quiet", "--out", str(tmp_path / "d.json")]  # fmt: skip
    capsys.readouterr()
    assert main([*base, "--limit", "24"]) == 0
    assert "warning" not in capsys.readouterr().err
    assert main([*base, "--limit", "30"]) == 0
    err = capsys.readouterr().err
    assert "warning" in err and "trained on other data" in err


@pytest.mark.slow
def test_a_checkpoint_whose_weights_do_not_fit_its_config_is_one_line(tmp_path, capsys, tiny_run):
    import torch

    ckpt = torch.load(tiny_run / "checkpoint-latest.pt", weights_only=True)
    name = next(iter(ckpt["ema"]))
    ckpt["ema"][name] = torch.zeros(3, 1)
    bad = tmp_path / "bad.pt"
    torch.save(ckpt, bad)
    argv = ["sample", "--run", str(bad), "--n", "1", "--out-npz", str(tmp_path / "s.npz")]
    assert "do not fit the model its config describes" in one_line_error(capsys, argv)
    assert not (tmp_path / "s.npz").exists()


def _read_only_folder(tmp_path) -> str:
    """A folder this process cannot write in: a chmod 555 one, or (as root, whom chmod does not
    stop) /proc/1, which even root cannot write; skip where neither exists."""
    import os

    if os.geteuid() != 0:
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o555)
        return str(folder)
    if os.path.isdir("/proc/1") and not os.access("/proc/1", os.W_OK):
        return "/proc/1"
    pytest.skip("running as root without a folder root cannot write in (no /proc/1)")


# --- outputs: each refused before any work when it is an input, another output, or unwritable --

#: Each command with its inputs ({name} stands for a file or folder ``_inputs`` makes) and
#: its outputs (option → suffix; "" for a folder); an output marked required is always given.
COMMANDS: dict[str, tuple[list[str], dict[str, str], str | None]] = {
    "data": (["data", "--data", "{data}"], {"--json": ".json"}, None),
    "estimators": (["estimators"], {"--json": ".json"}, None),
    "estimate": (
        ["estimate", "--data", "{data}", "--sources", "{held}", "--sigmas", "1", "--quiet"],
        {"--out": ".json", "--csv": ".csv", "--plot": ".png"},
        None,
    ),
    "diagnose": (
        [
            "diagnose",
            "--model",
            "{run}",
            "--data",
            "{images}",
            "--curve",
            "{curve}",
            "--heldout",
            "{held}",
            "--floor",
            "{floor}",
            "--quiet",
        ],
        {"--out": ".json", "--csv": ".csv", "--plot": ".png"},
        "--out",
    ),  # fmt: skip
    "floor": (
        ["floor", "--data", "{data}", "--heldout", "{held}", "--quiet"],
        {"--out": ".json", "--csv": ".csv", "--plot": ".png"},
        None,
    ),
    "sample": (
        ["sample", "--model", "{run}", "--n", "1"],
        {"--out-grid": ".png", "--out-npz": ".npz"},
        None,
    ),
    "fid": (["fid", "--samples", "{samples}", "--data", "{data}"], {"--out": ".json"}, None),
    "encode": (["encode", "--data", "{data}", "--vae", "{run}"], {"--out": ".zip"}, "--out"),
    "scaling-fit": (
        ["scaling", "fit", "--runs", "{runs}", "--optimal", "{curve}"],
        {"--plot": ".png", "--out": ".json", "--csv": ".csv"},
        None,
    ),
    "scaling-collect": (
        ["scaling", "collect", "{run}", "--data", "{data}"],
        {"--out": ".csv"},
        "--out",
    ),  # fmt: skip
    "report": (["report", "{curve}", "{floor}"], {"--out": ".html"}, "--out"),
    "schedule": (
        ["schedule", "--curve", "{curve}", "--gap", "{gap}"],
        {"--out": ".json", "--csv": ".csv", "--plot": ".png"},
        "--out",
    ),
    "train": (
        [
            "train",
            "--data",
            "{data}",
            "--monitor",
            "{floor}",
            "--schedule",
            "optimal",
            "--curve",
            "{curve}",
            "--gap",
            "{gap}",
            "--steps",
            "1",
            "--no-progress",
        ],  # fmt: skip
        {"--run-dir": ""},
        "--run-dir",
    ),
}
#: A file within each folder input that it is read from.
WITHIN = {"run": "checkpoint-latest.pt", "images": "a.png"}
LONG = "n" * 300  # longer than any file system's NAME_MAX (255)


def _inputs(folder) -> dict[str, str]:
    """The inputs the commands read, made in ``folder`` (their contents never matter: each
    case is refused before any is read)."""
    import numpy as np

    np.savez(folder / "data.npz", x=np.zeros((4, 1, 2, 2), np.float32))
    np.savez(folder / "held.npz", x=np.zeros((4, 1, 2, 2), np.float32))
    np.savez(folder / "samples.npz", samples=np.zeros((4, 1, 2, 2), np.float32))
    for name in ("curve", "floor", "gap"):
        (folder / f"{name}.json").write_text(f'{{"{name}": 1}}')
    (folder / "runs.csv").write_text("run,params,flops,images_seen,sigma,loss\n")
    for name in ("run", "images"):
        (folder / name).mkdir()
        (folder / name / WITHIN[name]).write_bytes(b"bytes")
    (folder / "run" / "config.json").write_text("{}")
    files = ["data.npz", "held.npz", "samples.npz", "curve.json", "floor.json", "gap.json",
             "runs.csv", "run", "images"]  # fmt: skip
    return {f.split(".")[0]: str(folder / f) for f in files}


def _cases() -> list[tuple[str, str, str]]:
    """(command, output option, where): every output of every command at every bad place."""
    cases = []
    for command, (argv, outputs, _) in COMMANDS.items():
        names = [a[1:-1] for a in argv if a.startswith("{")]
        for option in outputs:
            places = ["/proc", "/sys", "long", "read-only"] + [f"other:{o}" for o in outputs
                                                               if o != option]  # fmt: skip
            for name in names:
                places += [f"input:{name}", f"link:{name}", f"dot:{name}"]
                if name in WITHIN:
                    places.append(f"within:{name}")
            cases += [(command, option, place) for place in places]
    return cases


def _snapshot(folder) -> dict[str, bytes | None]:
    """Every path below ``folder`` with its bytes (None for a folder)."""
    return {
        str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes()
        for p in sorted(folder.rglob("*"))
    }


@pytest.mark.slow
@pytest.mark.parametrize(("command", "option", "place"), _cases())
def test_every_bad_output_is_one_line_before_any_work(
    tmp_path, capsys, monkeypatch, command, option, place
):
    """An output in /proc, /sys, under a 300-character name or in a read-only folder; one that
    is an input (as given, through a symlink, as ./NAME, or a file a folder input is read
    from); one that another output writes: exit 2 and one line naming the option, and no
    file written or changed."""
    import os

    monkeypatch.chdir(tmp_path)
    inputs = _inputs(tmp_path)
    argv, outputs, required = COMMANDS[command]
    argv = [a.format(**inputs) for a in argv]
    suffix = outputs[option]
    kind, _, name = place.partition(":")
    if kind in ("/proc", "/sys"):
        out = f"{kind}/lossfloor-x{suffix}"
    elif kind == "long":
        out = str(tmp_path / f"{LONG}{suffix}")
    elif kind == "read-only":
        out = f"{_read_only_folder(tmp_path)}/x{suffix}"
    elif kind == "input":
        out = inputs[name]
    elif kind == "link":
        os.symlink(inputs[name], tmp_path / "link")
        out = str(tmp_path / "link")
    elif kind == "dot":
        out = "./" + os.path.basename(inputs[name])
    elif kind == "within":
        out = os.path.join(inputs[name], WITHIN[name])
    else:  # another output writes the same file
        out = str(tmp_path / f"same{suffix}")
        argv = [*argv, name, out]
    argv = [*argv, option, out]
    if required is not None and required not in argv:
        argv += [required, str(tmp_path / f"required{outputs[required]}")]
    before = _snapshot(tmp_path)
    line = one_line_error(capsys, argv)
    assert option in line or (kind == "other" and name in line), line
    says = {
        "other": "writes there too",
        "input": "would overwrite the input",
        "link": "would overwrite",
        "dot": "would overwrite",
        "within": "would overwrite",
    }
    assert says.get(kind, "cannot write") in line, line  # fmt: skip
    assert _snapshot(tmp_path) == before


def test_every_command_declares_what_the_cases_above_cover():
    """Each command's ``Declared`` outputs are those of COMMANDS (so a new output, once
    declared, must join the cases), and each declared input appears in its argv."""
    import argparse

    from lossfloor.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    scaling = sub.choices["scaling"]
    actions = next(a for a in scaling._actions if isinstance(a, argparse._SubParsersAction))
    commands = {name: p for name, p in sub.choices.items() if name != "scaling"}
    commands |= {f"scaling-{name}": p for name, p in actions.choices.items()}
    assert sorted(commands) == sorted(COMMANDS)
    for name, p in commands.items():
        declared = p.get_default("declared")
        argv, outputs, _ = COMMANDS[name]
        assert sorted((*declared.outputs, *declared.folders)) == sorted(outputs), name
        given = {a for a in argv if a.startswith("--")} | {"RUN_DIR", "RESULT"}
        assert set(declared.inputs) <= given, name


def test_the_partial_checkpoint_is_tried_too(tmp_path, capsys):
    """A name whose own temporary file fits NAME_MAX (255) but whose FILE.partial's does not:
    refused where the command checkpoints to FILE.partial (estimate), written where not."""
    name = str(tmp_path / ("n" * 235 + ".json"))  # temp file .NAME.XXXXXXXX.json: 250 chars
    line = one_line_error(capsys, [*EST, "--sigmas", "1", "--outer", "16", "--out", name])
    assert "--out" in line and "file name too long" in line
    assert main(["data", "--data", "digits", "--limit", "10", "--json", name]) == 0
    with open(name) as f:
        assert json.load(f)["n"] == 10


def test_an_output_inside_a_folder_input_is_free_unless_read_from_there(tmp_path):
    """Beside a run's files and a data folder's images, other files may be written."""
    from argparse import Namespace

    from lossfloor.cli.common import Declared, check_args
    from lossfloor.errors import UserError

    inputs = _inputs(tmp_path)
    declared = Declared(inputs=("--model", "--data"), outputs=("--out",), partial=("--out",))
    for out, refused in [
        ("run/diagnosis.json", False),
        ("images/e.json", False),
        ("run/config.json", True),
        ("run/checkpoint-9.pt", True),
        ("images/sub/b.png", True),
        ("run/config.json.partial", False),
        ("config.json", False),
    ]:
        args = Namespace(declared=declared, model=inputs["run"], data=inputs["images"],
                         out=str(tmp_path / out))  # fmt: skip
        if refused:
            with pytest.raises(UserError, match="would overwrite the input"):
                check_args(args, write=False)
        else:
            check_args(args)


def test_a_run_directory_output_holding_an_input_run_file_is_refused(tmp_path, capsys):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "config.json").write_text("{}")
    argv = ["train", "--data", "digits", "--run-dir", str(tmp_path / "r"), "--steps", "1",
            "--monitor", str(tmp_path / "r" / "config.json")]  # fmt: skip
    assert "would overwrite the input --monitor" in one_line_error(capsys, argv)


def test_atomic_path_reports_a_failed_write_as_one_line(tmp_path):
    import errno

    from lossfloor.errors import UserError
    from lossfloor.io import atomic_path, write_json

    full = pytest.raises(UserError, match="cannot write .*x.json: no space left on device")
    with full, atomic_path(tmp_path / "x.json"):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert list(tmp_path.iterdir()) == []  # the temporary file is gone
    with pytest.raises(UserError, match="cannot write /proc/x.json"):
        write_json("/proc/x.json", {})


@pytest.mark.parametrize(
    ("argv", "option", "needed"),
    [
        ([*EST, "--sigmas", "1", "--chunk-mb", "8"], "--chunk-mb", "--stream"),
        ([*EST, "--sigmas", "1", "--max-outer", "8"], "--max-outer", "--target-rse"),
        ([*EST, "--sigmas", "1", "--bandwidth", "auto"], "--bandwidth", "--sources"),
        ([*EST, "--sigmas", "1", "--restart"], "--restart", "--out"),
        (["floor", "--data", "digits", "--heldout", "digits", "--restart"], "--restart", "--out"),
        (
            [
                "diagnose",
                "--model",
                "optimal",
                "--data",
                "digits",
                "--floor",
                "f.json",
                "--out",
                "d.json",
            ],
            "--floor",
            "--heldout",
        ),  # fmt: skip
    ],
)
def test_an_option_without_the_one_it_applies_under_is_one_line(
    tmp_path, capsys, monkeypatch, argv, option, needed
):
    monkeypatch.chdir(tmp_path)
    line = one_line_error(capsys, argv)
    assert line == f"lossfloor: error: {option}: applies only with {needed}; give {needed} or " \
        f"drop {option}"  # fmt: skip
    assert list(tmp_path.iterdir()) == []


# --- help and messages ---------------------------------------------------------------------------


def _help(*command: str) -> str:
    """The help of ``lossfloor COMMAND``, its whitespace collapsed (lines wrap anywhere)."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main([*command, "--help"])
    return " ".join(out.getvalue().split())


@pytest.mark.parametrize(
    ("command", "shown"),
    [
        (["estimate"], "seed of the outer draws and the random inner sets (default: 0)"),
        (["estimate"], "a number ≥ 0; default: none, no smoothed loss)"),
        (["estimate"], "in MiB (default: 256"),
        (["train"], "medium (~6.5M) (default small)"),
        (["floor"], "seed of subsets, draws and noise (default: 0)"),
        (["scaling", "collect"], "seed of the draws (sources, ε) (default: 0)"),
        (["scaling", "collect"], "RUN_DIR run directories (lossfloor train --run-dir)"),
        (["sample"], "churn only for σ ≥ S_min (default: 0.0)"),
        (["schedule"], "[-h] --curve CURVE.json"),  # required: not in brackets
    ],
)
def test_help_states_every_default(command, shown):
    assert shown in _help(*command)


def test_every_option_with_a_default_shows_it():
    """Each option of each command whose default is a value (0 and 0.0 included) says
    "default" in its help."""
    import argparse

    from lossfloor.cli import _Help, build_parser

    def parsers(parser):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    yield sub
                    yield from parsers(sub)

    missing = [
        f"{p.prog} {a.option_strings[0]}"
        for p in parsers(build_parser())
        for a in p._actions
        if a.option_strings
        and a.default is not None
        and a.default is not False
        and a.default is not argparse.SUPPRESS
        and "default" not in _Help(p.prog)._get_help_string(a)
    ]
    assert missing == []


def test_schedule_lists_no_option_of_the_online_gap():
    assert "--gap-halflife" not in _help("schedule") and "--gap-bins" not in _help("schedule")
    assert "--gap-halflife" in _help("train")


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--sigmas", "nan"], "--sigmas nan: σ is not a number; give each σ as a number > 0"),
        (["--sigmas", ""], "--sigmas '': no σ given; give a list 0.1,1,10 or min:max:count"),
        (["--sigmas", " , "], "--sigmas ',': no σ given"),
        (
            ["--sigmas", "1,2", "--total", "optimal"],
            "--total optimal: expected one of edm | ve | vp | fm | fm-logit-normal",
        ),  # fmt: skip
        (["--sigmas", "1,2", "--total", "nope"], "--total nope: expected one of edm | ve"),
    ],
)
def test_bad_sigmas_and_totals_say_what_is_wrong(capsys, args, says):
    assert one_line_error(capsys, [*EST, *args]).startswith(f"lossfloor: error: {says}")


def test_a_total_named_in_another_case_is_accepted(tmp_path):
    out = tmp_path / "e.json"
    assert main([*EST, "--sigmas", "1,2", "--total", "EDM", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["total"]["schedule"]["name"] == "edm"


def test_a_limit_beyond_the_data_says_all_items_are_used(tmp_path, capsys):
    import numpy as np

    np.save(tmp_path / "x.npy", np.zeros((50, 3), np.float32))
    assert main(["data", "--data", str(tmp_path / "x.npy"), "--limit", "1000"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "lossfloor: note: --limit 1000: the data has 50 items; using all 50\n"
    assert "items     50" in captured.out
    assert main(["data", "--data", str(tmp_path / "x.npy"), "--limit", "50"]) == 0
    assert capsys.readouterr().err == ""
