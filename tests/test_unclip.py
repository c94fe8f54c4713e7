"""The unCLIP generator on tiny random components: offline loading, conditioning (reference
images, embedding dropout, prompts), guided noise prediction, differentiable decoding."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from ray_lt.errors import ConfigError
from ray_lt.generate.base import sample_generators
from ray_lt.generate.unclip import UnCLIPGenerator, load_components, save_components
from ray_lt.testing import tiny_unclip_components

CLASSES = ["cat", "dog"]
CONTEXTS = ["snow", "grass"]  # group = label * 2 + context


def _image(value: int, channels: int = 3) -> np.ndarray:
    rng = np.random.default_rng(value)
    return rng.integers(0, 256, size=(20, 20, channels), dtype=np.uint8)


def reference_images() -> dict:
    """Class 0 has 3 images (group 0 has 2 of them, group 1 none); class 1 is grayscale, with
    group 2 holding one image of its own and group 3 none."""
    cat = [_image(0), _image(1), _image(2)]
    dog = [_image(10, 1), _image(11, 1)]
    return {"class": {0: cat, 1: dog}, "group": {0: cat[:2], 2: [_image(12, 1)]}}


def make_generator(components: dict | None = None, **overrides) -> UnCLIPGenerator:
    """A tiny generator with contexts; ``overrides`` replace constructor arguments."""
    kwargs = dict(class_names=CLASSES, context_names=CONTEXTS, reference_images=reference_images(),
                  prompts=["a photo of a {class_name} in {context}"],
                  embedding_dropout=0.5, noise_level=100, image_size=24)
    kwargs.update(overrides)
    return UnCLIPGenerator(**(components or tiny_unclip_components()), **kwargs)


LABELS, GROUPS, SEEDS = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 2, 3]), [7, 8, 9, 10]


def test_from_pretrained_round_trip(tmp_path):
    components = tiny_unclip_components()
    save_components(components, tmp_path / "unclip")
    direct = make_generator(components)
    loaded = UnCLIPGenerator.from_pretrained(
        tmp_path / "unclip", class_names=CLASSES, context_names=CONTEXTS,
        reference_images=reference_images(), prompts=direct.prompts.templates,
        embedding_dropout=0.5, noise_level=100, image_size=24)
    assert loaded.scheduler.config.prediction_type == "epsilon"
    assert loaded.prediction_type == "v_prediction"
    z = torch.randn(4, *direct.latent_shape(), generator=torch.Generator().manual_seed(0))
    eps = [g.predict_noise(z, torch.tensor(500), g.condition(LABELS, GROUPS, SEEDS), 3.0)
           for g in (direct, loaded)]
    torch.testing.assert_close(eps[0], eps[1])


def test_hub_id_resolves_from_local_cache_only(tmp_path, monkeypatch):
    import huggingface_hub.constants

    commit = "0" * 40
    repo = tmp_path / "hub" / "models--tiny--unclip"
    save_components(tiny_unclip_components(), repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert set(load_components("tiny/unclip")) >= {"unet", "vae", "image_normalizer"}
    with pytest.raises(ConfigError, match="not-cached/unclip.*never downloaded"):
        load_components("not-cached/unclip")


def test_missing_folder_or_component_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=f"{tmp_path / 'absent'}.*never downloaded"):
        load_components(tmp_path / "absent")
    save_components(tiny_unclip_components(), tmp_path / "unclip")
    (tmp_path / "unclip" / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"\0" * 8)
    with pytest.raises(ConfigError, match="component 'vae'"):
        load_components(tmp_path / "unclip")
    shutil.rmtree(tmp_path / "unclip" / "image_encoder")
    with pytest.raises(ConfigError, match="image_encoder"):
        UnCLIPGenerator.from_pretrained(tmp_path / "unclip", class_names=CLASSES,
                                        reference_images=reference_images(),
                                        embedding_dropout=0.5, noise_level=0)


def test_bad_settings_are_config_errors():
    with pytest.raises(ConfigError, match="noise_level"):
        make_generator(noise_level=1000)
    with pytest.raises(ConfigError, match="generator.prompts"):
        make_generator(context_names=[])
    with pytest.raises(ConfigError, match="embedding_dropout"):
        make_generator(embedding_dropout=1.5)
    with pytest.raises(ConfigError, match="height/width"):
        make_generator(height=33)


def test_condition_is_deterministic_per_seed_and_fills_prompts():
    gen = make_generator()
    a, b = gen.condition(LABELS, GROUPS, SEEDS), make_generator().condition(LABELS, GROUPS, SEEDS)
    for key in ("text_embeds", "uncond_text_embeds", "image_embeds", "reference", "dropped"):
        assert torch.equal(a.inputs[key], b.inputs[key]), key
    assert a.inputs["prompts"] == ["a photo of a cat in snow", "a photo of a cat in grass",
                                   "a photo of a dog in snow", "a photo of a dog in grass"]
    assert a.inputs["image_embeds"].shape == (4, 64)
    assert not a.inputs["uncond_image_embeds"].any()
    # A sample depends on its seed only, not on its batch.
    alone = gen.condition(LABELS[2:3], GROUPS[2:3], SEEDS[2:3])
    torch.testing.assert_close(alone.inputs["image_embeds"][0], a.inputs["image_embeds"][2])
    other = gen.condition(LABELS, GROUPS, [s + 100 for s in SEEDS])
    assert not torch.equal(other.inputs["image_embeds"], a.inputs["image_embeds"])


def test_reference_images_come_from_the_group_else_the_class():
    gen = make_generator(embedding_dropout=0.0)
    seeds = list(range(40))
    for group, label, allowed in ((0, 0, {0, 1}), (1, 0, {0, 1, 2}), (2, 1, {5}), (3, 1, {3, 4})):
        cond = gen.condition(torch.full((40,), label), torch.full((40,), group), seeds)
        assert set(cond.inputs["reference"].tolist()) == allowed, group
    no_groups = make_generator(context_names=[], prompts=["a photo of a {class_name}"])
    cond = no_groups.condition(torch.tensor([1]), torch.tensor([-1]), [0])
    assert cond.inputs["prompts"] == ["a photo of a dog"]


def test_embedding_dropout_zeroes_the_image_embedding_before_noising():
    dropped = make_generator(embedding_dropout=1.0)
    cond = dropped.condition(LABELS, GROUPS, SEEDS)
    assert cond.inputs["dropped"].all()
    # Redraw each sample's embedding noise: reference index, dropout coin, then the noise.
    noise = []
    for gen in sample_generators(SEEDS, stream=1):
        torch.randint(3, (1,), generator=gen), torch.rand((), generator=gen)
        noise.append(torch.randn(32, generator=gen))
    expected = dropped.noise_image_embeds(torch.zeros(4, 32), torch.stack(noise))
    torch.testing.assert_close(cond.inputs["image_embeds"], expected)
    # Other reference images change nothing once dropped, but do when kept.
    refs = {"class": {0: [_image(50)], 1: [_image(51)]}}
    other = make_generator(embedding_dropout=1.0, reference_images=refs)
    torch.testing.assert_close(other.condition(LABELS, GROUPS, SEEDS).inputs["image_embeds"],
                               expected)
    kept = make_generator(embedding_dropout=0.0).condition(LABELS, GROUPS, SEEDS)
    assert not kept.inputs["dropped"].any()
    assert not torch.allclose(kept.inputs["image_embeds"][:, :32], expected[:, :32])
    torch.testing.assert_close(kept.inputs["image_embeds"][:, 32:], expected[:, 32:])


def test_predict_noise_guidance_and_v_to_epsilon():
    gen = make_generator()
    cond = gen.condition(LABELS, GROUPS, SEEDS)
    z = torch.randn(4, *gen.latent_shape(), generator=torch.Generator().manual_seed(1))
    t = torch.tensor(600)
    eps1, eps3 = gen.predict_noise(z, t, cond, 1.0), gen.predict_noise(z, t, cond, 3.0)
    assert eps1.shape == z.shape == (4, 4, 16, 16) and eps1.dtype == torch.float32
    assert not torch.allclose(eps1, eps3)
    with torch.no_grad():
        v = gen.unet(z, t, encoder_hidden_states=cond.inputs["text_embeds"],
                     class_labels=cond.inputs["image_embeds"]).sample
    abar = gen.scheduler.alphas_cumprod[600]
    torch.testing.assert_close(eps1, abar.sqrt() * v + (1 - abar).sqrt() * z)
    per_sample_t = gen.predict_noise(z, torch.full((4,), 600), cond, 3.0)
    torch.testing.assert_close(per_sample_t, eps3)


def test_decode_is_differentiable_and_in_unit_range():
    gen = make_generator()
    z = torch.randn(2, *gen.latent_shape(), requires_grad=True)
    x = gen.decode(z)
    assert x.shape == (2, 3, 24, 24) and x.min() >= 0 and x.max() <= 1
    x.sum().backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    out = gen.decode_output(z)
    assert out.shape == (2, 3, 24, 24) and out.min() >= 0 and out.max() <= 1
    assert not out.requires_grad


def test_manual_ddim_loop_gives_finite_images():
    gen = make_generator()
    cond = gen.condition(LABELS, GROUPS, SEEDS)
    z = torch.randn(4, *gen.latent_shape(), generator=torch.Generator().manual_seed(2))
    gen.scheduler.set_timesteps(3)
    with torch.no_grad():
        for t in gen.scheduler.timesteps:
            z = gen.scheduler.step(gen.predict_noise(z, t, cond, 3.0), t, z).prev_sample
    images = gen.decode_output(z)
    assert images.shape == (4, 3, 24, 24) and torch.isfinite(images).all()


@pytest.mark.parametrize("criterion", ["entropy", "loss", "hardness", "total_uncertainty"])
def test_guided_loop_moves_each_criterion_up_on_tiny_unclip(criterion):
    from ray_lt.generate.criteria import (
        CriterionScorer,
        fit_class_statistics,
        fit_epistemic_head,
    )
    from ray_lt.generate.sampler import Guidance, guided_sample
    from ray_lt.train.models import build_model

    torch.manual_seed(0)
    generator = make_generator()
    classifier = build_model("small_cnn", num_classes=2, in_channels=3, width=8).eval()
    with torch.no_grad():
        classifier.head.weight.mul_(40)
        real = torch.rand(24, 3, generator.image_size, generator.image_size)
        features = classifier.embed(real).numpy()
    labels = np.arange(24) % 2
    scorer = CriterionScorer(classifier, [criterion],
                             fit_class_statistics(features, labels, 2),
                             fit_epistemic_head(features, labels, 2, k=3, epochs=5))
    n = 4
    runs = {}
    for scale in (0.0, 0.3):
        runs[scale] = guided_sample(generator, scorer, torch.arange(n) % 2,
                                    torch.full((n,), -1), torch.zeros(n, dtype=torch.long),
                                    list(range(n)), num_steps=4, cfg_scale=2.0,
                                    guidance=Guidance(scale=scale, every=1))
    assert torch.isfinite(runs[0.3].latents).all()
    assert (runs[0.3].nonfinite_steps == 0).all()
    assert runs[0.3].criterion_after.mean() > runs[0.0].criterion_after.mean()


def test_img2img_from_a_real_image_on_unclip():
    from test_stable_diffusion import sources

    from ray_lt.generate.sampler import Guidance, guided_sample

    def draw(generator, strength):
        return guided_sample(generator, None, LABELS, GROUPS, torch.zeros(4, dtype=torch.long),
                             SEEDS, num_steps=4, cfg_scale=2.0, guidance=Guidance(scale=0.0),
                             strength=strength)

    text, real = make_generator(), make_generator(sources=sources())
    t2i, full = draw(text, 1.0), draw(real, 1.0)
    torch.testing.assert_close(full.latents, t2i.latents, atol=0, rtol=0)
    low = draw(real, 0.5)
    start = real.sources(LABELS.tolist(), GROUPS.tolist(), SEEDS)[0]
    assert low.record["source_row"] == full.record["source_row"]
    assert ((low.latents - start).flatten(1).norm(dim=1) <
            (t2i.latents - start).flatten(1).norm(dim=1)).all()
