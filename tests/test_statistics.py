"""Class statistics (full and tied) and the epistemic head fitted by streaming over batches and
over the training-feature Parquet files (no Ray)."""

from __future__ import annotations

from itertools import pairwise
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import save_file
from scipy.stats import multivariate_normal
from sklearn.covariance import LedoitWolf

from ray_lt.generate.criteria import (
    ClassStatistics,
    CriterionScorer,
    bootstrap_weights,
    fit_class_statistics,
    fit_class_statistics_streamed,
    fit_epistemic_head_streamed,
    hardness,
    ledoit_wolf,
)
from ray_lt.generate.statistics import (
    CONTEXT_HEAD_FILE,
    FEATURES_DIR,
    HEAD_FILE,
    STATISTICS_FILE,
    feature_batches,
    feature_table,
    fit_criterion_support,
    load_context_head,
    load_training_features,
)
from ray_lt.train.models import build_model


def _data(seed: int = 0, n: int = 300, d: int = 6, classes: int = 4):
    """Gaussian classes of different sizes and shapes, far from the origin; class 3 has one
    sample."""
    rng = np.random.default_rng(seed)
    labels = np.concatenate([rng.integers(0, classes - 1, size=n - 1), [classes - 1]])
    centres = rng.normal(size=(classes, d)) * 5 + 20
    scales = rng.uniform(0.5, 3, size=(classes, d))
    return (centres[labels] + rng.normal(size=(n, d)) * scales[labels]).astype(np.float32), labels


def _in_batches(features: np.ndarray, labels: np.ndarray, sizes=(1, 50, 7, 100)):
    edges = np.cumsum([0, *sizes])
    edges = [e for e in edges if e < len(labels)] + [len(labels)]
    return lambda: [(features[a:b], labels[a:b]) for a, b in pairwise(edges)]


def _fit_before(features: np.ndarray, labels: np.ndarray, num_classes: int,
                variance_floor: float = 1e-3) -> ClassStatistics:
    """The in-memory per-class fit that the streamed ``full`` form replaces."""
    x, y = np.asarray(features, dtype=np.float64), np.asarray(labels).astype(np.int64)
    counts = np.bincount(y, minlength=num_classes)
    d = x.shape[1]
    rows = [x[y == c] for c in range(num_classes)]
    means = np.stack([r.mean(axis=0) for r in rows])
    squares = sum(((r - m) ** 2).sum() for r, m in zip(rows, means, strict=True))
    dof = int((counts - 1).sum())
    pooled = squares / (dof * d) if dof > 0 else float(x.var(axis=0).mean())
    precisions, logdets = [], []
    for r in rows:
        cov = LedoitWolf().fit(r).covariance_ if len(r) > 1 else pooled * np.eye(d)
        chol = torch.linalg.cholesky(torch.from_numpy(cov + variance_floor * pooled * np.eye(d)))
        precisions.append(torch.cholesky_inverse(chol).float())
        logdets.append(2 * torch.log(torch.diagonal(chol)).sum())
    return ClassStatistics(torch.from_numpy(means).float(), torch.stack(precisions),
                           torch.stack(logdets).float())


def _write_features(folder, features: np.ndarray, labels: np.ndarray, files: int = 3,
                    groups: np.ndarray | None = None) -> None:
    (folder / FEATURES_DIR).mkdir(parents=True)
    groups = np.full(len(labels), -1) if groups is None else groups
    for i, rows in enumerate(np.array_split(np.arange(len(labels)), files)):
        table = feature_table({"features": features[rows], "label": labels[rows],
                               "group": groups[rows]})
        pq.write_table(table, folder / FEATURES_DIR / f"part_{i:03d}.parquet")


def test_ledoit_wolf_from_moments_is_sklearns():
    rng = np.random.default_rng(3)
    for n, d in ((40, 5), (8, 30), (200, 1)):
        r = rng.normal(size=(n, d)) * rng.uniform(0.1, 4, size=d)
        scatter, fourth = r.T @ r, float(((r**2).sum(axis=1) ** 2).sum())
        expected = LedoitWolf(assume_centered=True).fit(r).covariance_
        np.testing.assert_allclose(ledoit_wolf(scatter, fourth, n), expected, rtol=1e-10,
                                   atol=1e-12)


def test_tied_form_is_sklearn_on_the_within_class_residuals():
    features, labels = _data()
    stats = fit_class_statistics_streamed(_in_batches(features, labels), 4, covariance="tied")
    x = features.astype(np.float64)
    counts = np.bincount(labels, minlength=4)
    means = np.stack([x[labels == c].mean(axis=0) for c in range(4)])
    centred = x - means[labels]
    pooled = (centred**2).sum() / ((len(x) - 4) * x.shape[1])
    expected = (LedoitWolf(assume_centered=True).fit(centred).covariance_
                + 1e-3 * pooled * np.eye(x.shape[1]))
    assert stats.covariance == "tied" and counts[3] == 1
    assert stats.precisions.shape == (6, 6) and stats.logdets.shape == (1,)
    np.testing.assert_allclose(stats.means.numpy(), means, rtol=1e-6)
    covariance = torch.linalg.inv(stats.precisions.double()).numpy()
    np.testing.assert_allclose(covariance, expected, rtol=1e-6, atol=1e-6 * expected.max())
    assert stats.logdets.item() == pytest.approx(np.linalg.slogdet(expected)[1], abs=1e-5)


@pytest.mark.parametrize("kind", ["mixed", "singletons"])
def test_full_form_is_the_in_memory_fit(kind):
    features, labels = _data(seed=1)
    if kind == "singletons":
        features, labels = features[:5], np.arange(5)
    classes = int(labels.max()) + 1
    expected = _fit_before(features, labels, classes)
    for got in (fit_class_statistics(features, labels, classes),
                fit_class_statistics_streamed(_in_batches(features, labels), classes)):
        assert got.covariance == "full"
        for field in ("means", "precisions", "logdets"):
            torch.testing.assert_close(getattr(got, field), getattr(expected, field),
                                       rtol=1e-5, atol=1e-6)


def test_full_form_above_two_gib_is_refused_before_fitting():
    def batches():
        yield np.zeros((2, 1024), np.float32), np.array([0, 1])
        raise AssertionError("read past the first batch")

    with pytest.raises(ValueError, match=r"synthesis.hardness_covariance: 'full' stores 600 "
                                         r"precisions of 1024 x 1024 float32 = 2.3 GiB.*tied"):
        fit_class_statistics_streamed(batches, 600, covariance="full")
    with pytest.raises(ValueError, match="have no training samples"):
        fit_class_statistics(np.zeros((2, 1024)), np.array([0, 1]), 600, covariance="tied")


@pytest.mark.parametrize("covariance", ["full", "tied"])
def test_save_and_load_keep_the_form(tmp_path, covariance):
    features, labels = _data()
    stats = fit_class_statistics(features, labels, 4, covariance=covariance)
    path = tmp_path / "stats.safetensors"
    assert ClassStatistics.stored_covariance(path) is None
    stats.save(path)
    assert ClassStatistics.stored_covariance(path) == covariance
    loaded = ClassStatistics.load(path)
    assert loaded.covariance == covariance
    for field in ("means", "precisions", "logdets"):
        assert torch.equal(getattr(loaded, field), getattr(stats, field))


def test_files_without_a_form_are_full_and_a_wrong_form_is_named(tmp_path):
    stats = fit_class_statistics(*_data(), 4)
    tensors = {"means": stats.means, "precisions": stats.precisions, "logdets": stats.logdets}
    save_file(tensors, str(tmp_path / "old.safetensors"))
    assert ClassStatistics.stored_covariance(tmp_path / "old.safetensors") == "full"
    assert ClassStatistics.load(tmp_path / "old.safetensors").covariance == "full"
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata={"covariance": "tied"})
    with pytest.raises(ValueError, match="metadata says covariance 'tied'"):
        ClassStatistics.load(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match=r"precisions \(4, 6, 6\) and logdets \(4,\) \(full\)"):
        ClassStatistics(stats.means, stats.precisions[0], stats.logdets)


def test_tied_hardness_is_the_shared_gaussian_negative_log_likelihood():
    rng = np.random.default_rng(0)
    c, d, b = 5, 4, 9
    means = rng.normal(size=(c, d))
    a = rng.normal(size=(d, d))
    cov = a @ a.T + 0.5 * np.eye(d)
    stats = ClassStatistics(torch.tensor(means), torch.tensor(np.linalg.inv(cov)),
                            torch.tensor([np.linalg.slogdet(cov)[1]]))
    x, y = rng.normal(size=(b, d)), rng.integers(0, c, size=b)
    got = hardness(torch.tensor(x), torch.tensor(y), stats).numpy()
    expected = [-multivariate_normal.logpdf(x[i], means[y[i]], cov) for i in range(b)]
    np.testing.assert_allclose(got, expected, rtol=1e-9)


def test_scorer_holds_the_tied_form():
    torch.manual_seed(0)
    classifier = build_model("small_cnn", num_classes=3, in_channels=1, width=4).eval()
    images, labels = torch.rand(30, 1, 8, 8), torch.arange(30) % 3
    with torch.no_grad():
        features = classifier.embed(images)
    stats = fit_class_statistics(features.numpy(), labels.numpy(), 3, covariance="tied")
    scorer = CriterionScorer(classifier, ["hardness"], stats)
    assert scorer.precisions.shape == (8, 8) and scorer.logdets.shape == (1,)
    got = scorer(images, labels, torch.zeros(30, dtype=torch.long))
    torch.testing.assert_close(got, hardness(features, labels, stats))


def test_bootstrap_weights_are_poisson_and_a_function_of_the_row():
    w = bootstrap_weights(7, np.arange(200_000), 3)
    assert w.shape == (200_000, 3) and w.dtype == np.float32
    assert w.mean() == pytest.approx(1.0, abs=0.01) and w.var() == pytest.approx(1.0, abs=0.02)
    assert (w == 0).mean() == pytest.approx(np.exp(-1), abs=0.005)
    np.testing.assert_array_equal(bootstrap_weights(7, np.arange(1000, 1010), 3), w[1000:1010])
    assert not np.array_equal(bootstrap_weights(8, np.arange(1000), 3), w[:1000])


def test_streamed_head_learns_and_is_deterministic_by_seed(tmp_path):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 16)) * 3
    labels = rng.integers(0, 4, size=1000)
    features = (centres[labels] + rng.normal(size=(1000, 16))).astype(np.float32)
    _write_features(tmp_path, features, labels)
    batches = feature_batches(tmp_path, rows=100)

    def fit(seed: int):
        return fit_epistemic_head_streamed(batches, 4, k=3, epochs=5, seed=seed, batch_size=64,
                                           buffer_rows=300)

    head, same, other = fit(0), fit(0), fit(1)
    assert torch.equal(head.weight, same.weight) and torch.equal(head.bias, same.bias)
    assert not torch.equal(head.weight, other.weight)
    accuracy = (head(torch.from_numpy(features)).softmax(-1).mean(0).argmax(-1).numpy()
                == labels).mean()
    assert accuracy > 0.9


def test_support_streams_the_feature_files_and_refits_a_changed_form(tmp_path):
    features, labels = _data(n=200)
    _write_features(tmp_path, features, labels)
    loaded, loaded_labels = load_training_features(tmp_path)
    np.testing.assert_array_equal(loaded, features)
    np.testing.assert_array_equal(loaded_labels, labels)
    data = SimpleNamespace(num_classes=4, num_groups=0, context_names=[])
    fit_criterion_support(tmp_path, data, 2, None, seed=0, covariance="tied")
    assert not (tmp_path / CONTEXT_HEAD_FILE).exists()  # no groups, no context head
    tied = ClassStatistics.load(tmp_path / STATISTICS_FILE)
    assert tied.covariance == "tied"
    torch.testing.assert_close(tied.precisions, fit_class_statistics(
        features, labels, 4, covariance="tied").precisions)
    head_time = (tmp_path / HEAD_FILE).stat().st_mtime_ns
    fit_criterion_support(tmp_path, data, 2, None, seed=0, covariance="full")
    full = ClassStatistics.load(tmp_path / STATISTICS_FILE)
    assert full.covariance == "full"
    torch.testing.assert_close(full.precisions, _fit_before(features, labels, 4).precisions,
                               rtol=1e-5, atol=1e-6)
    assert (tmp_path / HEAD_FILE).stat().st_mtime_ns == head_time
    stats_time = (tmp_path / STATISTICS_FILE).stat().st_mtime_ns
    fit_criterion_support(tmp_path, data, 2, None, seed=0, covariance="full")
    assert (tmp_path / STATISTICS_FILE).stat().st_mtime_ns == stats_time


def test_a_data_set_with_groups_gets_a_context_head_that_reads_the_context(tmp_path, caplog):
    """The context (group % contexts) is what the context head learns, from every class."""
    rng = np.random.default_rng(1)
    n, contexts = 600, 3
    labels = rng.integers(0, 4, size=n)
    context = rng.integers(0, contexts, size=n)
    centres = rng.normal(size=(contexts, 8)) * 3
    features = (centres[context] + rng.normal(size=(n, 8))).astype(np.float32)
    _write_features(tmp_path, features, labels, groups=labels * contexts + context)
    data = SimpleNamespace(num_classes=4, num_groups=4 * contexts,
                           context_names=["a", "b", "c"])
    caplog.set_level("INFO", logger="ray_lt")
    fit_criterion_support(tmp_path, data, 2, None, seed=0, covariance="tied")
    head = load_context_head(tmp_path)
    assert head.weight.shape == (1, contexts, 8)
    predicted = head(torch.from_numpy(features))[0].argmax(-1).numpy()
    assert (predicted == context).mean() > 0.9
    logged = float(caplog.text.split("context head of")[1].split(": ")[1].split(" of")[0])
    assert logged == pytest.approx((predicted == context).mean(), abs=1e-3)
    written = (tmp_path / CONTEXT_HEAD_FILE).stat().st_mtime_ns
    fit_criterion_support(tmp_path, data, 2, None, seed=0, covariance="tied")
    assert (tmp_path / CONTEXT_HEAD_FILE).stat().st_mtime_ns == written
    assert load_context_head(tmp_path / "elsewhere") is None


def test_only_the_support_a_criterion_needs_is_fitted_and_a_later_need_fits_it(tmp_path):
    """At ImageNet-LT's shape the epistemic head (K heads of d x C) is the costly piece: a run
    whose criteria do not use it never fits it; a rerun that adds total_uncertainty does."""
    from ray_lt.config import load_config
    from ray_lt.generate.statistics import missing_support, support_pieces
    from ray_lt.pipeline import scoring_criteria, support_task_options

    features, labels = _data(n=200)
    _write_features(tmp_path, features, labels)
    data = SimpleNamespace(num_classes=4, num_groups=0, context_names=[])
    assert support_pieces(["entropy", "loss"]) == set()
    assert support_pieces(["hardness", "total_uncertainty", "target_group"]) == {
        "statistics", "epistemic_head", "context_head"}
    fit_criterion_support(tmp_path, data, 2, None, seed=0, covariance="tied",
                          needs=support_pieces(["entropy", "hardness"]))
    assert (tmp_path / STATISTICS_FILE).is_file() and not (tmp_path / HEAD_FILE).exists()
    assert missing_support(tmp_path, data, {"statistics", "epistemic_head"}, "tied") == {
        "epistemic_head"}
    stats_time = (tmp_path / STATISTICS_FILE).stat().st_mtime_ns
    fit_criterion_support(tmp_path, data, 2, None, seed=0, covariance="tied",
                          needs=support_pieces(["total_uncertainty", "hardness"]))
    assert (tmp_path / HEAD_FILE).is_file()
    assert (tmp_path / STATISTICS_FILE).stat().st_mtime_ns == stats_time
    assert missing_support(tmp_path, data, {"context_head"}, "tied") == set()  # no groups
    with pytest.raises(ValueError, match="unknown criterion support 'heads'"):
        missing_support(tmp_path, data, {"heads"}, "tied")
    # What a config scores with: synthesis, the search's mixture, the grid's rows when drawn.
    cfg = load_config("configs/digits_lt.yaml", ["synthesis.criteria={entropy: 1.0}",
                                                 "report.grid=false"])
    assert scoring_criteria(cfg) == {"entropy"}
    grid = load_config("configs/digits_lt.yaml", ["synthesis.criteria={entropy: 1.0}"])
    assert scoring_criteria(grid) == {"entropy", "loss", "hardness", "total_uncertainty"}
    # The fits run as a Ray task placed like one prediction actor: a GPU where a config
    # gives the prediction actors one, so the heads do not train on the head node's CPU.
    assert support_task_options(cfg) == {"num_cpus": 0.5, "num_gpus": 0.0}
    imagenet = load_config("configs/imagenet_lt.yaml", ["evaluate.cpus_per_actor=2"])
    assert support_task_options(imagenet) == {"num_cpus": 2.0, "num_gpus": 0.25}
