"""gram's fused pass (``--fused``: ``optimal/fused.c`` through ``optimal/fused.py``): every σ's
weights, block totals and weight-proportional draws in one compiled pass over the products,
and the draws' U-statistics in one pass over their rows — against the torch passes
(``gram._torch_split``, ``Gram._forms``) and brute force, with tolerances from the rounding."""

from __future__ import annotations

import json
import math
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import lossfloor.optimal.fused as fused
import lossfloor.optimal.gram as gram
from lossfloor.cli import main
from lossfloor.data import load_dataset
from lossfloor.errors import UserError
from lossfloor.optimal import ESTIMATORS, Gram, estimate_curve, make_estimator
from lossfloor.optimal.pools import Pool, moments_from_bags

#: The tests that build the kernel need a C compiler (.ci/run installs gcc where it lacks one).
needs_cc = pytest.mark.skipif(
    shutil.which(os.environ.get("CC") or "cc") is None, reason="no C compiler: --fused cannot build"
)

#: float64 and float32 machine epsilons.
EPS64, EPS32 = float(np.finfo(np.float64).eps), float(np.finfo(np.float32).eps)
#: N not a multiple of the kernel's 256-column blocks: a partial last block.
N, D = 1000, 12


def padded(a: torch.Tensor, e: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The products as the torch passes take them: n columns padded to whole blocks (logits
    −∞, products 0); the fused pass reads the first n of any width."""
    pad = (0, gram._padded(n) - n)
    return F.pad(a, pad, value=-math.inf), F.pad(e, pad)


def products(dtype: torch.dtype, seed: int = 0, rows: int = 24):
    """(x N×D, the sources, a = x0·Xᵀ − ½‖X‖², e = ε·Xᵀ: padded) for ``rows`` draws, sources
    in the first, a middle and the last (partial) block."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g, dtype=torch.float64) * 0.6
    src = torch.randint(N, (rows,), generator=g)
    src[:3] = torch.tensor([0, 300, N - 1])
    eps = torch.randn(rows, D, generator=g, dtype=torch.float64)
    a = x[src] @ x.T - 0.5 * x.pow(2).sum(dim=1)
    return (x.to(dtype), src, *padded(a.to(dtype), (eps @ x.T).to(dtype), N))


SIGMAS = [0.02, 0.1, 0.3, 1.0, 3.0, 10.0, 50.0]


def tilt(x: torch.Tensor, rows: int, seed: int = 1):
    """Tilted draws' (products (x_c − x_s)·Xᵀ of 5 pairs, S×rows rows of them, −1: plain)."""
    g = torch.Generator().manual_seed(seed)
    pairs = torch.randint(N, (5, 2), generator=g)
    diff = x[pairs[:, 0]] - x[pairs[:, 1]]
    products = F.pad(diff @ x.T, (0, gram._padded(N) - N))
    return products, torch.randint(-1, 5, (len(SIGMAS), rows), generator=g)


def shares(own: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
    """The source's posterior weight w_s = own/(own + rest) (float64)."""
    own, rest = own.double(), rest.double()
    return own / (own + rest)


def exponent_tol(a: torch.Tensor, e: torch.Tensor, eps: float) -> float:
    """How far a weight of the two passes may differ, relatively: each exponent
    k·((a − a_s) + σ(e − e_s)) rounds in a few operations (≤ 8 ulps of its largest magnitude,
    log₂e·max|a − a_s| + σ·max|e − e_s| over σ² at the grid's smallest σ whose weights count),
    exp2 within 2 ulps, and the totals of ≤ N terms sum in other orders (N·ε)."""
    spread = float((a - a.max(dim=1, keepdim=True).values).abs().max())
    return (8 * 1.45 * spread / min(SIGMAS) ** 2 + 2 + N) * eps


@pytest.mark.numerics
@pytest.mark.parametrize("tilted", [False, True])
@needs_cc
def test_fused_split_is_the_torch_passes_in_float64(tilted):
    """The source's weight, the rest's total and every draw of the rest: the torch passes'
    (float64), σ from 0.02 (all but the source at the exponent's floor: whole blocks skipped)
    to 50, sources in the first, a middle and the partial last block."""
    x, src, a, e = products(torch.float64)
    draws = 1.0 - torch.rand(len(SIGMAS), len(src), 32, generator=torch.Generator().manual_seed(2),
                             dtype=torch.float64)  # fmt: skip
    shift = tilt(x, len(src)) if tilted else None
    own_t, rest_t, pick_t = gram._torch_split(a, e, N, src, SIGMAS, draws, shift, None)
    own_f, rest_f, pick_f = gram._fused_split(a, e, N, src, SIGMAS, draws, shift, None)
    unpadded = gram._fused_split(a[:, :N], e[:, :N], N, src, SIGMAS, draws, shift, None)
    assert all(torch.equal(p, q) for p, q in zip(unpadded, (own_f, rest_f, pick_f), strict=True))
    tol = exponent_tol(a[:, :N], e[:, :N], EPS64)
    assert tol < 1e-9
    torch.testing.assert_close(shares(own_f, rest_f), shares(own_t, rest_t), rtol=tol, atol=0)
    torch.testing.assert_close(rest_f / own_f, (rest_t / own_t).double(), rtol=tol, atol=0)
    # no draws (−1) exactly where the rest's share is at most NEGLIGIBLE_MASS (σ = 0.02 here);
    # elsewhere a uniform within ~N·ε of a column's cumulative edge may pick its neighbour:
    # none here
    made = pick_f[..., 0] >= 0
    share = (rest_t / (own_t + rest_t)).double()
    assert torch.equal(~made, share <= gram.NEGLIGIBLE_MASS) and bool((~made).any() and made.any())
    assert bool((pick_f[~made] == -1).all()) and torch.equal(pick_f[made], pick_t[made])


@pytest.mark.numerics
@needs_cc
def test_fused_split_in_float32_is_the_float64_passes_within_its_rounding():
    x, src, a, e = products(torch.float64)
    draws = 1.0 - torch.rand(len(SIGMAS), len(src), 32, generator=torch.Generator().manual_seed(3))
    own_t, rest_t, _ = gram._torch_split(a, e, N, src, SIGMAS, draws.double(), None, None)
    own_f, rest_f, pick_f = gram._fused_split(a.float(), e.float(), N, src, SIGMAS, draws, None,
                                              None)  # fmt: skip
    # the products themselves are float32 here: their rounding (|a|·ε32) enters each exponent
    a, e = a[:, :N], e[:, :N]
    tol = exponent_tol(a, e, EPS32) + 8 * 1.45 * float(a.abs().max()) / min(SIGMAS) ** 2 * EPS32
    share_f, share_t = shares(own_f, rest_f), shares(own_t, rest_t)
    assert float(((share_f - share_t).abs() / share_t).max()) <= tol
    assert bool((((pick_f >= 0) & (pick_f < N)) | (pick_f == -1)).all())  # −1: no draws


@needs_cc
def test_at_the_floor_the_rest_is_exactly_its_count_of_the_floor_weight():
    """σ so small that every point but the source sits at the exponent's floor 2^(log₂tiny + 1):
    the rest's total is exactly (N − 1)·2^−125 (float32), whole blocks skipped or not."""
    _, src, a, e = products(torch.float32)
    draws = 1.0 - torch.rand(1, len(src), 8, generator=torch.Generator().manual_seed(4))
    own, rest, _ = gram._fused_split(a, e, N, src, [1e-3], draws, None, None)
    assert torch.equal(own, torch.ones_like(own))
    assert torch.equal(rest, torch.full_like(rest, (N - 1) * 2.0**-125))
    _, rest_t, _ = gram._torch_split(a, e, N, src, [1e-3], draws, None, None)
    assert torch.equal(rest_t.double(), rest)


@needs_cc
def test_rows_far_more_probable_elsewhere_are_redone_as_the_torch_passes_redo_them():
    """A query next to another point than its source (weights ≥ 2^HIGH_EXPONENT relative to
    the source's): those rows are redone relative to their largest logit, as the torch passes
    do; the others are the kernel's."""
    x = torch.linspace(0, 1, 300, dtype=torch.float64)[:, None] * torch.ones(1, 2)
    src = torch.tensor([0, 150, 299])
    noise = torch.tensor([[20.0, 20.0], [0.1, 0.0], [0.0, 0.1]], dtype=torch.float64)
    a, e = padded(x[src] @ x.T - 0.5 * x.pow(2).sum(dim=1), noise @ x.T, 300)
    sigmas = [0.04, 1.0]
    draws = 1.0 - torch.rand(2, 3, 16, generator=torch.Generator().manual_seed(5),
                             dtype=torch.float64)  # fmt: skip
    own_t, rest_t, pick_t = gram._torch_split(a, e, 300, src, sigmas, draws, None, None)
    assert (
        float(rest_t[0, 0]) < 2.0**gram.HIGH_EXPONENT and float(rest_t[0, 0] / own_t[0, 0]) > 1e30
    )
    own_f, rest_f, pick_f = gram._fused_split(a, e, 300, src, sigmas, draws, None, None)
    torch.testing.assert_close(shares(own_f, rest_f), shares(own_t, rest_t), rtol=1e-12, atol=0)
    assert torch.equal(pick_f, pick_t)


@needs_cc
def test_the_thread_count_does_not_change_a_bit():
    """Each draw is one task's whole pass: the threads split draws, never a sum."""
    _, src, a, e = products(torch.float32)
    draws = 1.0 - torch.rand(len(SIGMAS), len(src), 32, generator=torch.Generator().manual_seed(6))
    lo = math.log2(torch.finfo(torch.float32).tiny) + 1.0
    one = fused.source_split(a, e, N, src, SIGMAS, draws, None, lo, 100.0, 2.0**-64, 1)
    three = fused.source_split(a, e, N, src, SIGMAS, draws, None, lo, 100.0, 2.0**-64, 3)
    assert all(torch.equal(p, q) for p, q in zip(one, three, strict=True))


# --- the draws' U-statistics -----------------------------------------------------------------


@pytest.mark.numerics
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@needs_cc
def test_bag_moments_against_brute_force(dtype):
    """[Σ‖x_j‖², x_c·Σx_j, ‖Σx_j‖², Σ‖x_j − x_c‖², ‖Σ(x_j − x_c)‖²] of bags of 7 rows (D = 13:
    not a multiple of the vector width), against float64 brute force: within the rounding of
    the rows (float32: Σx_j summed in float32, 7 terms) relative to the terms' magnitudes."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(50, 13, generator=g, dtype=torch.float64)
    pool = Pool.from_data(x, dtype, "cpu")
    idx = torch.randint(50, (40, 7), generator=g)
    centres = torch.randint(50, (40,), generator=g)
    rows, c = pool.x.double()[idx], pool.x.double()[centres][:, None]
    want = torch.stack([
        rows.pow(2).sum(dim=(1, 2)), (c * rows).sum(dim=(1, 2)), rows.sum(dim=1).pow(2).sum(-1),
        (rows - c).pow(2).sum(dim=(1, 2)), (rows - c).sum(dim=1).pow(2).sum(-1),
    ], dim=1)  # fmt: skip
    scale = (rows.pow(2).sum(dim=(1, 2)) + 7 * c.pow(2).sum(dim=(1, 2)))[:, None] * 7
    eps = EPS32 if dtype == torch.float32 else EPS64
    for got in (pool.bag_moments(idx, centres, threads=2), moments_from_bags(pool, idx, centres)):
        assert float(((got - want).abs() / scale).max()) <= 32 * eps


# --- the estimate ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.mark.slow
@pytest.mark.numerics
@pytest.mark.parametrize("draws", ["plain", "tilted"])
@needs_cc
def test_the_fused_curve_is_gram_s_in_float64(digits, draws):
    """digits, 6 σ, float64, the same draws: every number of each point the torch passes' to
    float64 rounding (the same draws of the rest; the U-statistics summed otherwise)."""
    sigmas = [0.2, 0.5, 1.0, 2.0, 5.0, 20.0]
    kw = {"outer": 512, "seed": 3, "progress": False, "precision": "float64", "draws": draws}
    plain = estimate_curve(digits.x, sigmas, Gram(), **kw)
    fast = estimate_curve(digits.x, sigmas, Gram(fused=True), **kw)
    np.testing.assert_allclose(fast.values, plain.values, rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(fast.stderrs, plain.stderrs, rtol=1e-7, atol=1e-15)


@pytest.mark.slow
@needs_cc
def test_the_fused_curve_in_float32_is_within_a_fraction_of_its_standard_error(digits):
    sigmas = [0.5, 1.0, 2.0, 5.0, 20.0]
    kw = {"outer": 1024, "seed": 4, "progress": False, "precision": "float32", "draws": "plain"}
    plain = estimate_curve(digits.x, sigmas, Gram(), **kw)
    fast = estimate_curve(digits.x, sigmas, Gram(fused=True), **kw)
    assert np.all(np.abs(fast.values - plain.values) <= 0.05 * plain.stderrs)


def test_config_of_fused_gram_round_trips_and_the_default_records_no_key():
    assert "fused" not in Gram().to_config()  # records written before --fused read the same
    est = Gram(inner=8, fused=True)
    assert est.to_config() == {"name": "gram", "inner": 8, "rows": 16, "fused": True}
    assert ESTIMATORS.from_config(est.to_config()) == est
    assert make_estimator("gram", 100, fused=True) == Gram(fused=True)


def test_fused_refuses_several_processes():
    _, src, a, e = products(torch.float32, rows=3)
    draws = torch.ones(1, 3, 4)
    with pytest.raises(UserError, match="one process"):
        gram._fused_split(a, e, N, src, [1.0], draws, None, object())  # type: ignore[arg-type]


# --- the CLI and the compiler ------------------------------------------------------------------


@needs_cc
def test_cli_fused_records_it_and_other_estimators_refuse_it(tmp_path, capsys):
    out = tmp_path / "g.json"
    base = ["estimate", "--data", "digits", "--sigmas", "0.5,2", "--outer", "128", "--quiet"]
    assert main([*base, "--estimator", "gram", "--fused", "--out", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert rec["estimator"]["fused"] is True and rec["estimator"]["name"] == "gram"
    assert all(p["optimal_loss"] > 0 for p in rec["points"])
    capsys.readouterr()
    bad = tmp_path / "f.json"
    assert main([*base, "--estimator", "full", "--fused", "--out", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "gram only" in err and err.count("\n") == 1 and not bad.exists(), err


@pytest.mark.parametrize(
    ("cc", "says"), [("/no/such/cc", "no C compiler"), ("false", "could not compile")]
)
def test_without_a_working_compiler_fused_is_one_line(tmp_path, capsys, monkeypatch, cc, says):
    monkeypatch.setattr(fused, "_LIBRARY", [])
    monkeypatch.setenv("CC", cc)
    monkeypatch.setenv("LOSSFLOOR_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "g.json"
    argv = ["estimate", "--data", "digits", "--sigmas", "1", "--outer", "64", "--quiet",
            "--estimator", "gram", "--fused", "--out", str(out)]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not out.exists()


@needs_cc
def test_the_kernel_is_compiled_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(fused, "_LIBRARY", [])
    monkeypatch.setenv("LOSSFLOOR_CACHE", str(tmp_path))
    fused.library()
    built = list((tmp_path / "fused").glob("gram-*.so"))
    assert len(built) == 1 and fused.compile_seconds() > 0
    monkeypatch.setattr(fused, "_LIBRARY", [])

    def no_compiling(*args):
        raise AssertionError("compiled again")

    monkeypatch.setattr(fused, "_compile", no_compiling)
    fused.library()
    assert fused.compile_seconds() == 0.0
    assert list((tmp_path / "fused").iterdir()) == built  # no temporary file left


@pytest.mark.slow
@needs_cc
def test_cli_fused_streamed_gives_the_in_memory_numbers(tmp_path, capsys):
    """--stream: the products per chunk, the draws' rows by index (``moments_from_bags``): the
    in-memory fused run's numbers to float64 rounding (plain draws: see test_gram's)."""
    argv = ["estimate", "--data", "digits", "--estimator", "gram", "--fused", "--dtype",
            "float64", "--sigmas", "0.2,1,5", "--draws", "plain", "--outer", "512",
            "--quiet"]  # fmt: skip
    curves = []
    for extra, name in [([], "memory.json"), (["--stream", "--chunk-mb", "0.5"], "stream.json")]:
        assert main([*argv, *extra, "--out", str(tmp_path / name)]) == 0, capsys.readouterr().err
        curves.append(json.loads((tmp_path / name).read_text()))
    for m, s in zip(curves[0]["points"], curves[1]["points"], strict=True):
        for key in ("optimal_loss", "stderr", "closed", "direct"):
            assert s[key] == pytest.approx(m[key], rel=1e-9, abs=1e-15), (key, m, s)
