"""Feedback criteria, their statistics and the epistemic head (no Ray)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal
from sklearn.covariance import LedoitWolf

from ray_lt.generate.criteria import (
    CRITERIA,
    ClassStatistics,
    CriterionScorer,
    EpistemicHead,
    draw_criteria,
    entropy,
    fit_class_statistics,
    fit_epistemic_head,
    group_entropy,
    hardness,
    loss,
    target_group,
    total_uncertainty,
)
from ray_lt.train.models import build_model

NUM_CLASSES = 3
NUM_CONTEXTS = 2


@pytest.fixture(scope="module")
def classifier():
    torch.manual_seed(0)
    return build_model("small_cnn", num_classes=NUM_CLASSES, in_channels=1, width=4).eval()


@pytest.fixture(scope="module")
def pieces(classifier):
    """Class statistics, an epistemic head and a context head fitted on the classifier's
    embeddings of noise."""
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(60, 1, 8, 8, generator=gen)
    labels = torch.arange(60) % NUM_CLASSES
    with torch.no_grad():
        features = classifier.embed(images).numpy()
    stats = fit_class_statistics(features, labels.numpy(), NUM_CLASSES)
    head = fit_epistemic_head(features, labels.numpy(), NUM_CLASSES, k=3, epochs=5, seed=0)
    contexts = fit_epistemic_head(features, (labels.numpy() // 2) % NUM_CONTEXTS, NUM_CONTEXTS,
                                  k=1, epochs=5, seed=0)
    return stats, head, contexts


def _scorer(classifier, names, pieces, **kwargs):
    stats, head, contexts = pieces
    return CriterionScorer(classifier, names, stats, head, context_head=contexts, **kwargs)


def _groups(labels: torch.Tensor) -> torch.Tensor:
    """Class x context group ids, ``label * NUM_CONTEXTS + context``, contexts alternating."""
    return labels * NUM_CONTEXTS + torch.arange(len(labels)) % NUM_CONTEXTS


def _images(n: int, seed: int = 2) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_entropy_hand_computed_values():
    c = 7
    assert entropy(torch.zeros(2, c)) == pytest.approx([math.log(c)] * 2, abs=1e-6)
    assert entropy(torch.tensor([[50.0, 0.0, 0.0]])).item() == pytest.approx(0.0, abs=1e-6)
    p = torch.tensor([[0.5, 0.25, 0.25]])
    assert entropy(p.log() + 3.0).item() == pytest.approx(1.5 * math.log(2), abs=1e-6)


def test_loss_is_negative_log_probability_of_the_label():
    logits = torch.randn(5, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    labels = torch.tensor([0, 3, 1, 1, 2])
    z = logits.numpy()
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    expected = -np.log(p[np.arange(5), labels.numpy()])
    np.testing.assert_allclose(loss(logits, labels).numpy(), expected, rtol=1e-10)


def test_hardness_is_negative_gaussian_log_likelihood():
    rng = np.random.default_rng(0)
    c, d, b = 3, 5, 8
    means = rng.normal(size=(c, d))
    covs = []
    for _ in range(c):
        a = rng.normal(size=(d, d))
        covs.append(a @ a.T + 0.5 * np.eye(d))
    stats = ClassStatistics(torch.tensor(means),
                            torch.tensor(np.stack([np.linalg.inv(s) for s in covs])),
                            torch.tensor([np.linalg.slogdet(s)[1] for s in covs]))
    x = rng.normal(size=(b, d))
    y = rng.integers(0, c, size=b)
    got = hardness(torch.tensor(x), torch.tensor(y), stats).numpy()
    expected = [-multivariate_normal.logpdf(x[i], means[y[i]], covs[y[i]]) for i in range(b)]
    np.testing.assert_allclose(got, expected, rtol=1e-9)


def test_total_uncertainty_is_entropy_of_mean_prediction():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(4, 6, 5)) * 3
    p = np.exp(z) / np.exp(z).sum(axis=-1, keepdims=True)
    mean = p.mean(axis=0)
    expected = -(mean * np.log(mean)).sum(axis=-1)
    np.testing.assert_allclose(total_uncertainty(torch.tensor(z)).numpy(), expected, rtol=1e-10)
    one = torch.tensor(z[:1])
    torch.testing.assert_close(total_uncertainty(one), entropy(one[0]))


@pytest.mark.parametrize("name", sorted(CRITERIA))
def test_gradients_reach_the_images(classifier, pieces, name):
    scorer = _scorer(classifier, [name], pieces)
    images, labels = _images(4).requires_grad_(), torch.tensor([0, 1, 2, 0])
    values = scorer(images, labels, torch.zeros(4, dtype=torch.long), _groups(labels))
    assert values.shape == (4,)
    values.sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0


def test_mixture_routes_each_sample_to_its_criterion(classifier, pieces):
    names = sorted(CRITERIA)
    mixture = _scorer(classifier, names, pieces)
    images, labels = _images(12), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2])
    ids = torch.tensor([0, 1, 2, 3, 4, 5, 5, 4, 3, 2, 1, 0])
    got = mixture(images, labels, ids, _groups(labels))
    for j, name in enumerate(names):
        single = _scorer(classifier, [name], pieces)
        expected = single(images, labels, torch.zeros(12, dtype=torch.long), _groups(labels))
        torch.testing.assert_close(got[ids == j], expected[ids == j])
    assert not torch.allclose(got, got[ids == 0][0].expand(12))


def test_scorer_embeds_each_batch_once(classifier, pieces, monkeypatch):
    scorer = _scorer(classifier, sorted(CRITERIA), pieces)
    calls = []
    embed = classifier.embed
    monkeypatch.setattr(classifier, "embed", lambda x: calls.append(1) or embed(x))
    labels = torch.tensor([0, 1, 2])
    scorer(_images(3), labels, torch.tensor([0, 4, 5]), _groups(labels))
    assert len(calls) == 1


def test_scorer_on_features_matches_scorer_on_images(classifier, pieces):
    images, labels, ids = _images(6), torch.tensor([0, 1, 2, 0, 1, 2]), torch.arange(6)
    on_images = _scorer(classifier, sorted(CRITERIA), pieces)
    on_features = _scorer(classifier, sorted(CRITERIA), pieces, inputs="features")
    with torch.no_grad():
        torch.testing.assert_close(
            on_features(classifier.embed(images), labels, ids, _groups(labels)),
            on_images(images, labels, ids, _groups(labels)))


def test_scorer_stays_in_eval_mode(classifier):
    scorer = CriterionScorer(classifier, ["entropy"]).train()
    assert not scorer.training and not classifier.training


def test_scorer_names_the_missing_piece(classifier, pieces):
    stats, head, contexts = pieces
    with pytest.raises(ValueError, match="'hardness' needs statistics"):
        CriterionScorer(classifier, ["entropy", "hardness"], epistemic_head=head)
    with pytest.raises(ValueError, match="'total_uncertainty' needs epistemic_head"):
        CriterionScorer(classifier, ["total_uncertainty"], statistics=stats)
    with pytest.raises(ValueError, match="distinct names"):
        CriterionScorer(classifier, ["entropy", "confidence"])
    with pytest.raises(ValueError, match="'target_group' needs context_head"):
        CriterionScorer(classifier, ["entropy", "target_group"], stats, head)
    scorer = CriterionScorer(classifier, ["group_entropy"], context_head=contexts)
    with pytest.raises(ValueError, match=r"\['group_entropy'\] need the class x context group"):
        scorer(_images(2), torch.tensor([0, 1]), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="need the class x context group"):
        scorer(_images(2), torch.tensor([0, 1]), torch.zeros(2, dtype=torch.long),
               torch.tensor([-1, 2]))


def test_group_criteria_hand_computed_values():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    context_logits = torch.tensor([[0.0, 3.0], [1.0, 1.0]], dtype=torch.float64)
    labels, contexts = torch.tensor([0, 2]), torch.tensor([1, 0])
    p_class = [math.exp(2) / (math.exp(2) + 2), 1 / 3]
    p_context = [math.exp(3) / (math.exp(3) + 1), 0.5]
    expected = [math.log(p_class[i]) + math.log(p_context[i]) for i in range(2)]
    np.testing.assert_allclose(target_group(logits, labels, context_logits, contexts).numpy(),
                               expected, rtol=1e-12)
    np.testing.assert_allclose(group_entropy(logits, context_logits, contexts).numpy(),
                               entropy(logits).numpy() + np.log(p_context), rtol=1e-12)


def test_target_group_guidance_moves_the_context_toward_the_one_asked(classifier, pieces):
    """One gradient step on target_group raises the context head's probability of the group's
    context (the direction guidance takes)."""
    stats, head, contexts = pieces
    scorer = _scorer(classifier, ["target_group"], pieces)
    images, labels = _images(6).requires_grad_(), torch.tensor([0, 1, 2, 0, 1, 2])
    groups = _groups(labels)
    scorer(images, labels, torch.zeros(6, dtype=torch.long), groups).sum().backward()
    moved = (images + 0.5 * images.grad / images.grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1))

    def p_context(x):
        with torch.no_grad():
            logits = contexts(classifier.embed(x))[0].log_softmax(1)
        return logits[torch.arange(6), groups % NUM_CONTEXTS].exp()

    assert (p_context(moved) > p_context(images.detach())).all()


def test_criterion_names_in_the_config_are_those_the_scorer_knows():
    from ray_lt.config import CRITERION_NAMES, GROUP_CRITERION_NAMES

    assert set(CRITERION_NAMES) == set(CRITERIA)
    assert set(GROUP_CRITERION_NAMES) == {n for n, c in CRITERIA.items()
                                          if c.needs == "context_head"}


def test_draw_criteria_matches_probabilities_and_seed():
    names, probabilities = ["entropy", "loss", "hardness", "total_uncertainty"], [.5, .3, .2, 0]
    ids = draw_criteria(names, probabilities, 20000, torch.Generator().manual_seed(0))
    assert ids.dtype == torch.long and ids.shape == (20000,)
    frequencies = torch.bincount(ids, minlength=4).double() / 20000
    np.testing.assert_allclose(frequencies.numpy(), probabilities, atol=0.015)
    assert (ids != 3).all()
    again = draw_criteria(names, probabilities, 20000, torch.Generator().manual_seed(0))
    assert torch.equal(ids, again)


@pytest.mark.parametrize(("names", "probabilities", "message"), [
    (["entropy", "loss"], [1.2, -0.2], "non-negative"),
    (["entropy", "loss"], [0.5, 0.4], "sum to 1"),
    (["entropy", "loss"], [1.0], "need 2 values"),
    (["entropy", "sharpness"], [0.5, 0.5], "distinct names"),
])
def test_draw_criteria_rejects_bad_probabilities(names, probabilities, message):
    with pytest.raises(ValueError, match=message):
        draw_criteria(names, probabilities, 10, torch.Generator().manual_seed(0))


def test_statistics_of_tiny_classes_are_finite_and_positive_definite():
    rng = np.random.default_rng(0)
    d = 6
    features = np.concatenate([rng.normal(size=(50, d)), rng.normal(size=(1, d)) + 3,
                               rng.normal(size=(2, d)) - 3])
    labels = np.array([0] * 50 + [1] + [2] * 2)
    stats = fit_class_statistics(features, labels, 3)
    assert stats.means.shape == (3, d) and stats.precisions.shape == (3, d, d)
    np.testing.assert_allclose(stats.means[1].numpy(), features[50], rtol=1e-6)
    np.testing.assert_allclose(stats.means[2].numpy(), features[51:].mean(0), rtol=1e-6)
    for c in range(3):
        precision = stats.precisions[c].double()
        assert torch.isfinite(precision).all() and torch.isfinite(stats.logdets[c])
        assert torch.linalg.eigvalsh(precision).min() > 0
        cov_logdet = -torch.linalg.slogdet(precision)[1]
        assert stats.logdets[c].item() == pytest.approx(cov_logdet.item(), abs=1e-3)
    cov_one = torch.linalg.inv(stats.precisions[1].double())
    squares = ((features[:50] - features[:50].mean(0)) ** 2).sum() + (
        (features[51:] - features[51:].mean(0)) ** 2).sum()
    pooled = squares / ((49 + 1) * d)
    torch.testing.assert_close(cov_one, (1 + 1e-3) * pooled * torch.eye(d, dtype=torch.float64),
                               rtol=1e-5, atol=1e-6)
    values = hardness(torch.tensor(features, dtype=torch.float32), torch.tensor(labels), stats)
    assert torch.isfinite(values).all()


def test_statistics_of_a_large_class_are_ledoit_wolf():
    rng = np.random.default_rng(1)
    features = rng.normal(size=(200, 4)) * [1, 2, 3, 4]
    labels = np.zeros(200, dtype=np.int64)
    stats = fit_class_statistics(features, labels, 1, variance_floor=0.0)
    expected = LedoitWolf().fit(features).covariance_
    np.testing.assert_allclose(torch.linalg.inv(stats.precisions[0].double()).numpy(), expected,
                               rtol=1e-5)


def test_statistics_reject_an_empty_class():
    with pytest.raises(ValueError, match=r"classes \[1\] have no training samples"):
        fit_class_statistics(np.zeros((3, 2)), np.array([0, 0, 2]), 3)


def test_save_and_load_round_trip_exactly(tmp_path, pieces):
    stats, head, _ = pieces
    stats.save(tmp_path / "stats.safetensors")
    loaded = ClassStatistics.load(tmp_path / "stats.safetensors")
    for field in ("means", "precisions", "logdets"):
        assert torch.equal(getattr(loaded, field), getattr(stats, field))
    head.save(tmp_path / "head.safetensors")
    loaded_head = EpistemicHead.load(tmp_path / "head.safetensors")
    assert loaded_head.weight.shape == head.weight.shape
    assert torch.equal(loaded_head.weight, head.weight) and torch.equal(loaded_head.bias, head.bias)
    with pytest.raises(ValueError, match="missing tensors"):
        ClassStatistics.load(tmp_path / "head.safetensors")
    with pytest.raises(FileNotFoundError, match="absent.safetensors"):
        EpistemicHead.load(tmp_path / "absent.safetensors")


def test_epistemic_head_learns_and_is_deterministic():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 16)) * 3
    labels = rng.integers(0, 4, size=1000)
    features = (centres[labels] + rng.normal(size=(1000, 16))).astype(np.float32)
    head = fit_epistemic_head(features, labels, 4, k=5, epochs=10, seed=0)
    logits = head(torch.from_numpy(features))
    assert logits.shape == (5, 1000, 4)
    accuracy = (logits.softmax(-1).mean(0).argmax(-1).numpy() == labels).mean()
    assert accuracy > 0.9
    assert not torch.allclose(head.weight[0], head.weight[1])
    same = fit_epistemic_head(features, labels, 4, k=5, epochs=10, seed=0)
    other = fit_epistemic_head(features, labels, 4, k=5, epochs=10, seed=1)
    assert torch.equal(head.weight, same.weight) and torch.equal(head.bias, same.bias)
    assert not torch.equal(head.weight, other.weight)


def test_epistemic_heads_train_on_bootstrap_resamples():
    """With one-hot features and one row per class, a head only learns the rows in its resample
    (about 63% of them); trained on all rows, every head would fit every row."""
    n = 20
    head = fit_epistemic_head(np.eye(n, dtype=np.float32), np.arange(n), n, k=5, epochs=100,
                              lr=0.1, seed=0)
    per_head = (head(torch.eye(n)).argmax(-1) == torch.arange(n)).double().mean(1)
    assert (per_head < 0.9).all() and (per_head > 0.4).all()
