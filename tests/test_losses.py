import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ray_lt.train.losses import balanced_softmax_loss, classification_loss, log_prior


def test_balanced_softmax_matches_its_formula():
    # BS(z, y) = -log( n_y exp(z_y) / sum_k n_k exp(z_k) )
    counts = np.array([100, 10, 1])
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
    labels = torch.tensor([1, 2])
    got = balanced_softmax_loss(logits, labels, log_prior(counts))
    n = torch.tensor(counts, dtype=torch.float32)
    expect = []
    for z, y in zip(logits, labels, strict=True):
        weighted = n * torch.exp(z)
        expect.append(-torch.log(weighted[y] / weighted.sum()))
    assert torch.allclose(got, torch.stack(expect), atol=1e-6)


def test_mixing_weight_interpolates_ce_and_bs():
    counts = np.array([50, 5])
    logits = torch.randn(6, 2, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 0, 1, 1, 0])
    prior = log_prior(counts)
    ce = F.cross_entropy(logits, labels)
    bs = balanced_softmax_loss(logits, labels, prior).mean()
    assert classification_loss(logits, labels, prior, 0.0) == pytest.approx(float(ce), abs=1e-6)
    assert classification_loss(logits, labels, prior, 1.0) == pytest.approx(float(bs), abs=1e-6)
    mixed = classification_loss(logits, labels, prior, 0.25)
    assert mixed == pytest.approx(0.75 * float(ce) + 0.25 * float(bs), abs=1e-6)


def test_sample_weights_scale_each_term():
    logits = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([1, 1])
    prior = log_prior([1, 1])
    per = F.cross_entropy(logits, labels, reduction="none")
    got = classification_loss(logits, labels, prior, 0.0, torch.tensor([1.0, 0.5]))
    assert got == pytest.approx(float((per[0] + 0.5 * per[1]) / 2), abs=1e-6)


def test_prior_rejects_empty_class():
    with pytest.raises(ValueError, match="at least one training sample"):
        log_prior([3, 0])
