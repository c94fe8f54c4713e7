"""The ``sd`` and ``sdxl`` generators on tiny random components saved in the Hugging Face layout
and read by the real loading code: prompts drawn per seed, negative prompts, determinism across
batch sizes, every guidance decoder, img2img from real images, and the refusals of folders that
hold something else."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from ray_lt.errors import ConfigError
from ray_lt.generate.sampler import Guidance, guided_sample
from ray_lt.generate.sources import Sources
from ray_lt.generate.stable_diffusion import StableDiffusionGenerator, StableDiffusionXLGenerator
from ray_lt.testing import save_tiny, tiny_autoencoder

CLASSES = ["cat", "dog"]
CONTEXTS = ["snow", "grass"]
GENERATORS = {"sd": StableDiffusionGenerator, "sdxl": StableDiffusionXLGenerator}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    base = tmp_path_factory.mktemp("sd")
    return {kind: save_tiny(base / kind, kind) for kind in GENERATORS} | {
        "sd_v": save_tiny(base / "sd_v", "sd", prediction_type="v_prediction")}


def load(folders, kind, **kwargs):
    options = dict(class_names=CLASSES, context_names=CONTEXTS, image_size=24,
                   prompts=["a photo of a {class_name} in {context}"])
    options.update(kwargs)
    return GENERATORS[kind.split("_")[0]].from_pretrained(folders[kind], **options)


def sources(n_per_class: int = 3) -> Sources:
    """Embedded 16 x 16 RGB training rows: class c's images are bright in channel c."""
    rows = []
    for label in range(2):
        for i in range(n_per_class):
            image = np.full((16, 16, 3), 30, np.uint8)
            image[..., label] = 200 + 10 * i
            rows.append({"label": label, "group": label * 2 + i % 2, "image": image.tobytes()})
    table = pd.DataFrame(rows)
    table.insert(0, "row", np.arange(len(table)))
    return Sources(table, None, 16, 3)


def sample(generator, labels, groups, seeds, strength=1.0, scale=0.0, scorer=None):
    n = len(seeds)
    return guided_sample(generator, scorer, torch.as_tensor(labels), torch.as_tensor(groups),
                         torch.zeros(n, dtype=torch.long), seeds, num_steps=4, cfg_scale=2.0,
                         guidance=Guidance(scale=scale, every=1), strength=strength)


@pytest.mark.parametrize("kind", ["sd", "sdxl", "sd_v"])
def test_loaded_folder_matches_its_components_and_samples_per_seed(folders, kind):
    generator = load(folders, kind)
    assert generator.scheduler.config.prediction_type == "epsilon"
    assert generator.prediction_type == ("v_prediction" if kind == "sd_v" else "epsilon")
    assert generator.latent_shape() == (4, 16, 16) and (generator.height, generator.width) == \
        (32, 32)
    labels, groups, seeds = [0, 1, 1, 0], [0, 3, 2, 1], [5, 6, 7, 8]
    whole = sample(generator, labels, groups, seeds)
    assert whole.record["prompt"] == ["a photo of a cat in snow", "a photo of a dog in grass",
                                      "a photo of a dog in snow", "a photo of a cat in grass"]
    # A sample depends on its seed, label and group only, not on its batch.
    parts = [sample(generator, labels[i:i + 2], groups[i:i + 2], seeds[i:i + 2])
             for i in (0, 2)]
    torch.testing.assert_close(torch.cat([p.latents for p in parts]), whole.latents,
                               atol=1e-5, rtol=1e-4)
    assert not torch.allclose(sample(generator, labels, groups, [9, 6, 7, 8]).latents[0],
                              whole.latents[0])
    images = generator.decode_output(whole.latents)
    assert images.shape == (4, 3, 24, 24) and 0 <= images.min() and images.max() <= 1


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_templates_are_drawn_per_seed_and_the_negative_prompt_conditions_cfg(folders, kind):
    templates = ["a photo of a {class_name}", "a drawing of a {class_name}",
                 "a {class_name} outdoors"]
    generator = load(folders, kind, prompts=templates, context_names=[])
    seeds = list(range(30))
    drawn = generator.condition(torch.zeros(30, dtype=torch.long), torch.full((30,), -1),
                                seeds).record["prompt"]
    assert set(drawn) == {t.format(class_name="cat") for t in templates}
    alone = generator.condition(torch.tensor([0]), torch.tensor([-1]), seeds[7:8])
    assert alone.record["prompt"] == drawn[7:8]
    by_class = load(folders, kind, prompts=templates, context_names=[],
                    prompts_by_class={1: ["a close-up of a {class_name}"]})
    cond = by_class.condition(torch.tensor([1, 1, 0]), torch.tensor([-1, -1, -1]), [0, 1, 7])
    assert cond.record["prompt"] == ["a close-up of a dog"] * 2 + drawn[7:8]
    z = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    plain = by_class.predict_noise(z, torch.tensor(500), cond, 3.0)
    negative = load(folders, kind, prompts=templates, context_names=[], negative_prompt="blurry",
                    prompts_by_class={1: ["a close-up of a {class_name}"]})
    cond_n = negative.condition(torch.tensor([1, 1, 0]), torch.tensor([-1, -1, -1]), [0, 1, 7])
    torch.testing.assert_close(cond_n.inputs["text_embeds"], cond.inputs["text_embeds"])
    assert not torch.allclose(negative.predict_noise(z, torch.tensor(500), cond_n, 3.0), plain)
    # s = 1 is the conditional prediction alone: the negative prompt no longer matters
    torch.testing.assert_close(negative.predict_noise(z, torch.tensor(500), cond_n, 1.0),
                               by_class.predict_noise(z, torch.tensor(500), cond, 1.0))


def test_sdxl_conditions_on_pooled_text_and_time_ids(folders):
    generator = load(folders, "sdxl", context_names=[], prompts=["a {class_name}"])
    cond = generator.condition(torch.tensor([0, 1]), torch.tensor([-1, -1]), [0, 1])
    assert cond.inputs["text_embeds"].shape == (2, 77, 64)  # both encoders, concatenated
    assert cond.inputs["pooled"].shape == (2, 32)
    assert cond.inputs["time_ids"].tolist() == [[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]] * 2
    assert not cond.inputs["uncond_pooled"].any()  # force_zeros_for_empty_prompt
    assert not torch.allclose(cond.inputs["pooled"][0], cond.inputs["pooled"][1])


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
@pytest.mark.parametrize("decoder", ["vae", "latent_resize", "tiny"])
def test_every_guidance_decoder_guides(folders, kind, decoder):
    from ray_lt.generate.criteria import CriterionScorer
    from ray_lt.train.models import build_model

    torch.manual_seed(0)
    classifier = build_model("small_cnn", num_classes=2, in_channels=3, width=8).eval()
    with torch.no_grad():
        classifier.head.weight.mul_(40)
    scorer = CriterionScorer(classifier, ["entropy"], None, None)
    generator = load(folders, kind, guidance_decoder=decoder, image_size=8,
                     tiny_decoder=tiny_autoencoder() if decoder == "tiny" else None)
    x0 = generator.decode(torch.randn(2, 4, 16, 16))
    assert x0.shape == (2, 3, 8, 8)
    plain = sample(generator, [0, 1], [0, 2], [1, 2], scorer=scorer)
    guided = sample(generator, [0, 1], [0, 2], [1, 2], scale=0.3, scorer=scorer)
    assert (guided.guidance_norm > 0).all() and (guided.nonfinite_steps == 0).all()
    assert not torch.allclose(guided.latents, plain.latents)


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_img2img_strength_one_is_text_to_image_and_lower_stays_near_the_source(folders, kind):
    text = load(folders, kind)
    real = load(folders, kind, sources=sources())
    labels, groups, seeds = [0, 1, 0, 1], [0, 3, 1, 2], [11, 12, 13, 14]
    t2i = sample(text, labels, groups, seeds)
    full = sample(real, labels, groups, seeds, strength=1.0)
    torch.testing.assert_close(full.latents, t2i.latents, atol=0, rtol=0)
    rows = full.record["source_row"]
    # each source is a training row of the sample's group
    assert [r // 3 for r in rows] == labels and all(r % 3 % 2 == g % 2 for r, g in
                                                    zip(rows, groups, strict=True))
    low = sample(real, labels, groups, seeds, strength=0.5)
    assert low.record["source_row"] == rows
    source = real.sources(labels, groups, seeds)[0]
    near = (low.latents - source).flatten(1).norm(dim=1)
    far = (t2i.latents - source).flatten(1).norm(dim=1)
    assert (near < far).all(), (near, far)
    # the start depends on the seed only: the same sample alone
    alone = sample(real, labels[1:2], groups[1:2], seeds[1:2], strength=0.5)
    torch.testing.assert_close(alone.latents[0], low.latents[1], atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="init_latents"):
        sample(text, labels, groups, seeds, strength=0.5)


def test_a_folder_of_another_pipeline_or_missing_a_component_is_refused(folders, tmp_path):
    from ray_lt.generate.pretrained import check_folder

    with pytest.raises(ConfigError) as err:
        check_folder(folders["sdxl"], "sd")
    assert str(err.value) == (
        f"generator.pretrained: {folders['sdxl']} holds a StableDiffusionXLPipeline "
        f"(model_index.json), not the StableDiffusionPipeline that generator.kind sd reads; set "
        f"generator.kind: sdxl")
    flux = shutil.copytree(folders["sd"], tmp_path / "flux")
    index = json.loads((flux / "model_index.json").read_text())
    (flux / "model_index.json").write_text(json.dumps({**index, "_class_name": "FluxPipeline"}))
    with pytest.raises(ConfigError, match="holds a FluxPipeline .* no generator kind reads it "
                                          r"\(unclip: StableUnCLIPImg2ImgPipeline, sd: "):
        check_folder(flux, "sd")
    broken = shutil.copytree(folders["sdxl"], tmp_path / "broken")
    shutil.rmtree(broken / "text_encoder_2")
    with pytest.raises(ConfigError, match=r"lacks the component folder\(s\) \['text_encoder_2'\] "
                                          "of a StableDiffusionXLPipeline"):
        StableDiffusionXLGenerator.from_pretrained(broken, class_names=CLASSES)
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    weights.unlink()
    shutil.copytree(folders["sdxl"] / "text_encoder_2", broken / "text_encoder_2")
    with pytest.raises(ConfigError, match=f"component folder {broken / 'unet'} holds "
                                          r"config.json but no weights \(\*.safetensors"):
        check_folder(broken, "sdxl")  # offline, before Ray starts: nothing is loaded
    weights.write_bytes(b"not a safetensors file")
    with pytest.raises(ConfigError, match="component 'unet'"):
        StableDiffusionXLGenerator.from_pretrained(broken, class_names=CLASSES)
    for part in ("tokenizer", "scheduler"):  # a component folder copied empty
        for item in (broken / part).iterdir():
            item.unlink()
        with pytest.raises(ConfigError, match=f"component folder {broken / part} is empty, but "
                                              "it is a component of a "
                                              "StableDiffusionXLPipeline"):
            check_folder(broken, "sdxl")
        shutil.rmtree(broken / part)
        shutil.copytree(folders["sdxl"] / part, broken / part)


def test_pixel_img2img_starts_from_the_training_image_of_the_seed():
    from test_sampler import pixel_parts

    generator, scorer = pixel_parts()
    rows = [{"row": i, "label": i % 10, "group": -1,
             "image": np.full((16, 16, 1), 25 * (i % 10), np.uint8).tobytes()} for i in range(20)]
    real = type(generator)(generator.model, generator.scheduler, False,
                           sources=Sources(pd.DataFrame(rows), None, 16, 1))
    labels, groups, seeds = [3, 7, 3], [-1, -1, -1], [1, 2, 3]
    t2i = sample(generator, labels, groups, seeds, scale=0.1, scorer=scorer)
    full = sample(real, labels, groups, seeds, strength=1.0, scale=0.1, scorer=scorer)
    torch.testing.assert_close(full.latents, t2i.latents, atol=0, rtol=0)
    assert [r % 10 for r in full.record["source_row"]] == labels
    low = sample(real, labels, groups, seeds, strength=0.25, scale=0.1, scorer=scorer)
    source = real.sources(labels, groups, seeds)[0]
    assert ((low.latents - source).flatten(1).norm(dim=1) <
            (t2i.latents - source).flatten(1).norm(dim=1)).all()


def test_stored_sources_read_back_and_are_kept_when_unchanged(tmp_path):
    from ray_lt.generate.sources import META_FILE, SOURCES_DIR, store_sources

    images = [np.full((4, 4, 1), 10 * i, np.uint8) for i in range(5)]
    index = pd.DataFrame({"label": [0, 0, 1, 1, 1], "group": [-1] * 5, "image": images})
    folder = store_sources(index, None, 4, 1, tmp_path)
    stamp = (folder / META_FILE).stat().st_mtime_ns
    assert store_sources(index, None, 4, 1, tmp_path) == tmp_path / SOURCES_DIR
    assert (folder / META_FILE).stat().st_mtime_ns == stamp
    loaded = Sources.load(tmp_path)
    assert {k: v.tolist() for k, v in loaded.by_class.items()} == {0: [0, 1], 1: [2, 3, 4]}
    assert (loaded.image(3, 8, 8, 1) == 30).all() and loaded.image(3, 8, 8, 1).shape == (8, 8, 1)
    assert loaded.pick([1, 1], [-1, -1], [0, 1]) == loaded.pick([1], [-1], [0]) + \
        loaded.pick([1], [-1], [1])
