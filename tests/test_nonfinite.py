"""Non-finite guidance and images: counted, skipped or redrawn, never stored (no Ray)."""

import pytest
import torch
from test_sampler import pixel_parts
from test_unclip import make_generator

from ray_lt.config import SynthesisConfig
from ray_lt.generate.actor import sample_finite
from ray_lt.generate.criteria import CriterionScorer
from ray_lt.generate.sampler import Guidance
from ray_lt.testing import tiny_unclip_components

SEEDS = [3, 4, 5, 6]


def _settings(**overrides) -> SynthesisConfig:
    return SynthesisConfig(num_steps=6, cfg_scale=2.0, batch_size=4, **overrides)


def test_a_classifier_with_a_nan_head_guides_nothing_and_every_step_is_counted():
    generator, scorer = pixel_parts()
    broken = scorer.classifier
    with torch.no_grad():
        broken.head.weight[3] = float("nan")  # one NaN logit makes every criterion NaN
    nan_scorer = CriterionScorer(broken, ["entropy", "loss"])
    ids = torch.zeros(len(SEEDS), dtype=torch.long)
    guidance = Guidance(scale=0.5, every=2)
    out, images, redrawn = sample_finite(generator, nan_scorer, 2, -1, ids, SEEDS, _settings(),
                                         guidance, "test")
    unguided, plain, _ = sample_finite(generator, None, 2, -1, ids, SEEDS, _settings(),
                                       Guidance(scale=0.0), "test")
    assert out.nonfinite_steps.tolist() == [3] * len(SEEDS)  # 6 steps, guided every 2nd
    assert torch.isfinite(images).all() and not redrawn.any()
    # Zeroed gradients change nothing: the samples are the unguided ones, bit for bit.
    torch.testing.assert_close(images, plain, rtol=0, atol=0)


def _overflowing_fp16_unclip():
    """A tiny unCLIP whose VAE overflows in float16 (activations above 65504) but not in
    float32: the decoder's first convolution scaled up."""
    components = tiny_unclip_components()
    with torch.no_grad():
        components["vae"].post_quant_conv.weight.mul_(3e4)
    return make_generator(components, dtype=torch.float16, embedding_dropout=0.0)


def test_an_fp16_overflow_in_the_decode_is_redrawn_in_float32_from_its_seed(caplog):
    generator = _overflowing_fp16_unclip()
    ids = torch.zeros(2, dtype=torch.long)
    guidance = Guidance(scale=0.0)
    with torch.no_grad():
        z = torch.randn(2, *generator.latent_shape(), generator=torch.Generator().manual_seed(0))
        assert not torch.isfinite(generator.decode_output(z)).all()  # the overflow is real
        assert torch.isfinite(generator.decode_output(z, upcast=True)).all()
    with caplog.at_level("WARNING", logger="ray_lt"):
        out, images, redrawn = sample_finite(generator, None, 0, 0, ids, SEEDS[:2], _settings(),
                                             guidance, "shard 7")
    assert redrawn.tolist() == [True, True]
    assert torch.isfinite(images).all() and images.std() > 0  # neither NaN nor black
    assert "shard 7: 2 sample(s) were not finite" in caplog.text
    assert generator.vae.dtype == torch.float16  # the VAE is back in its own dtype
    # Redrawn from the same seeds: the float32 decode of the same latents.
    with torch.no_grad():
        expected = generator.decode_output(out.latents, upcast=True).float()
    torch.testing.assert_close(images, expected)


def test_a_sample_still_not_finite_in_float32_fails_its_shard_by_name():
    components = tiny_unclip_components()
    with torch.no_grad():
        components["vae"].post_quant_conv.weight[0, 0] = float("nan")
    generator = make_generator(components, embedding_dropout=0.0)
    with pytest.raises(FloatingPointError, match=r"shard 9: seeds \[3, 4\] decode to non-finite"):
        sample_finite(generator, None, 0, 0, torch.zeros(2, dtype=torch.long), SEEDS[:2],
                      _settings(), Guidance(scale=0.0), "shard 9")
