import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ray_lt.train.losses import (
    GroupDRO,
    balanced_softmax_loss,
    classification_loss,
    group_weights,
    log_prior,
)


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


def test_group_weights_balance_the_groups_in_expectation():
    counts = [6, 2, 0, 4]
    weights = group_weights(counts)
    np.testing.assert_allclose(weights.numpy(), [12 / 18, 12 / 6, 0.0, 12 / 12])
    per_row = np.repeat(weights.numpy(), counts)
    assert per_row.mean() == pytest.approx(1.0)
    # every non-empty group carries the same total weight
    np.testing.assert_allclose((weights * torch.tensor(counts)).numpy()[[0, 1, 3]], [4.0] * 3)
    with pytest.raises(ValueError, match="no group has a training row"):
        group_weights([0, 0])


def test_group_dro_updates_q_and_weights_the_group_means():
    dro = GroupDRO(3, step_size=0.5)
    losses = torch.tensor([1.0, 3.0, 2.0, 2.0], requires_grad=True)
    groups = torch.tensor([0, 0, 2, 2])
    value = dro.loss(losses, groups)
    means = np.array([2.0, 0.0, 2.0])  # group 1 has no row in the batch
    q = np.exp(0.5 * means) / np.exp(0.5 * means).sum()
    np.testing.assert_allclose(dro.q.numpy(), q, rtol=1e-6)
    assert float(value) == pytest.approx(q[0] * 2.0 + q[2] * 2.0, rel=1e-6)
    value.backward()
    np.testing.assert_allclose(losses.grad.numpy(), [q[0] / 2, q[0] / 2, q[2] / 2, q[2] / 2],
                               rtol=1e-6)
    # the worse group gains weight step by step
    for _ in range(5):
        dro.loss(torch.tensor([0.1, 3.0]), torch.tensor([0, 2]))
    assert dro.q[2] > 0.9
    restored = GroupDRO(3, 0.5)
    restored.load_state_dict(dro.state_dict())
    assert torch.equal(restored.q, dro.q)
    with pytest.raises(ValueError, match=r"group ids must lie in \[0, 3\)"):
        dro.loss(torch.ones(2), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="2 groups saved"):
        GroupDRO(4, 0.5).load_state_dict(GroupDRO(2, 0.5).state_dict())


def test_the_learning_rate_schedule_is_diffusers_cosine_with_warm_up():
    """The loop's own schedule (no diffusers import in the training workers) gives the same
    rates as ``diffusers.optimization.get_cosine_schedule_with_warmup``."""
    import torch
    from diffusers.optimization import get_cosine_schedule_with_warmup

    from ray_lt.train.loop import cosine_with_warmup

    rates = []
    for build in (cosine_with_warmup, get_cosine_schedule_with_warmup):
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.05)
        schedule = build(optimizer, 5, 40)
        seen = []
        for _ in range(45):
            seen.append(schedule.get_last_lr()[0])
            optimizer.step()
            schedule.step()
        rates.append(seen)
    assert rates[0] == rates[1]
    assert rates[0][0] == 0.0 and rates[0][5] == 0.05 and rates[0][40] == 0.0
