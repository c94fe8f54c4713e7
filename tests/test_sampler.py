"""The feedback-guided DDIM loop on a tiny random pixel generator and classifier (no Ray)."""

import pytest
import torch
from diffusers import DDIMScheduler

from ray_lt.generate.criteria import CriterionScorer
from ray_lt.generate.pixel import (
    ConditionedUNet,
    PixelGenerator,
    build_unet,
    training_scheduler,
)
from ray_lt.generate.sampler import Guidance, guided_sample
from ray_lt.train.models import build_model


def pixel_parts():
    """A tiny random pixel generator and a confident small CNN scoring entropy and loss."""
    torch.manual_seed(0)
    unet = build_unet(16, 1, num_conditions=10, block_out_channels=[16, 32],
                      layers_per_block=1, attention=False)
    generator = PixelGenerator(ConditionedUNet(unet, 10),
                               DDIMScheduler.from_config(training_scheduler().config),
                               by_group=False)
    classifier = build_model("small_cnn", num_classes=10, in_channels=1, width=8).eval()
    with torch.no_grad():
        classifier.head.weight.mul_(40)  # confident predictions leave room for the criteria
    return generator, CriterionScorer(classifier, ["entropy", "loss"])


@pytest.fixture(scope="module")
def parts():
    return pixel_parts()


def _sample(parts, scale, criterion=0, seeds=tuple(range(8)), **kwargs):
    generator, scorer = parts
    n = len(seeds)
    guidance = Guidance(scale=scale, every=kwargs.pop("every", 1), **kwargs)
    return guided_sample(generator, scorer, torch.arange(n) % 10, torch.full((n,), -1),
                         torch.full((n,), criterion), list(seeds), num_steps=8, cfg_scale=2.0,
                         guidance=guidance)


@pytest.mark.parametrize("criterion", [0, 1])
def test_guidance_increases_the_criterion_against_w0(parts, criterion):
    plain = _sample(parts, 0.0, criterion)
    guided = _sample(parts, 0.2, criterion)
    assert guided.criterion_after.mean() > plain.criterion_after.mean() + 1e-3
    assert (guided.guidance_norm > 0).all() and (plain.guidance_norm == 0).all()
    assert not torch.equal(guided.latents, plain.latents)


def test_eps_mode_also_ascends(parts):
    plain = _sample(parts, 0.0)
    guided = _sample(parts, 50.0, mode="eps")
    assert guided.criterion_after.mean() > plain.criterion_after.mean()


def test_same_seed_same_samples_and_batch_invariance(parts):
    first = _sample(parts, 0.1)
    again = _sample(parts, 0.1)
    assert torch.equal(first.latents, again.latents)
    alone = _sample(parts, 0.1, seeds=(3,))
    generator, scorer = parts
    # sample 3 of the batch has label 3; drawn alone it needs the same label
    single = guided_sample(generator, scorer, torch.tensor([3]), torch.tensor([-1]),
                           torch.tensor([0]), [3], 8, 2.0, Guidance(scale=0.1, every=1))
    assert torch.allclose(single.latents[0], first.latents[3], atol=1e-4)
    assert alone.latents.shape == (1, 1, 16, 16)


def test_reuse_applies_guidance_on_skipped_steps(parts):
    sparse = _sample(parts, 0.1, every=4)
    reused = _sample(parts, 0.1, every=4, reuse=True)
    assert not torch.equal(sparse.latents, reused.latents)


def test_non_finite_gradients_are_zeroed_and_counted(parts):
    generator, _ = parts

    def exploding(images, labels, ids, groups=None):
        # sample 0 gets an infinite gradient, the others a finite one
        values = images.flatten(1).sum(1)
        return values * torch.tensor([float("inf"), 1.0, 1.0])

    out = guided_sample(generator, exploding, torch.arange(3), torch.full((3,), -1),
                        torch.zeros(3, dtype=torch.long), [0, 1, 2], 6, 1.0,
                        Guidance(scale=0.1, every=2))
    assert out.nonfinite_steps.tolist() == [3, 0, 0]
    assert torch.isfinite(out.latents).all()


def test_class_context_generator_round_trips_and_composes(tmp_path):
    torch.manual_seed(0)
    unet = build_unet(8, 3, 4, [16, 32], 1, False, embedded_outside=True)
    model = ConditionedUNet(unet, num_conditions=4, num_contexts=3)
    generator = PixelGenerator(model, DDIMScheduler.from_config(training_scheduler().config),
                               by_group=False)
    cond = generator.condition(torch.tensor([0, 3]), torch.tensor([2, 11]), [0, 1])
    assert cond.inputs["cond"].tolist() == [[0, 2], [3, 2]]  # group 11 = class 3, context 2
    assert model.null(cond.inputs["cond"]).tolist() == [[4, 3], [4, 3]]
    z = torch.randn(2, 3, 8, 8)
    eps = generator.predict_noise(z, torch.tensor(500), cond, 2.0)
    generator.save_pretrained(tmp_path / "gen")
    loaded = PixelGenerator.from_pretrained(tmp_path / "gen")
    assert loaded.model.num_contexts == 3
    assert torch.allclose(loaded.predict_noise(z, torch.tensor(500), cond, 2.0), eps, atol=1e-5)
    with pytest.raises(ValueError, match="needs the group of every sample"):
        generator.condition(torch.tensor([0]), torch.tensor([-1]), [0])
