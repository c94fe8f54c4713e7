"""The generator kinds' registry and the refusals of settings a kind cannot honour: each names
its key and the fix, before Ray starts."""

from __future__ import annotations

import re

import pytest
from conftest import ROOT

from ray_lt.config import GENERATOR_SECTIONS, config_from_dict, load_config
from ray_lt.errors import ConfigError
from ray_lt.generate.kinds import KINDS
from ray_lt.generate.prompts import read_prompts_file

DIGITS = ROOT / "configs" / "digits_lt.yaml"
BRANCH = re.compile(r"(generator|\bg)\.kind\s*(==|!=|in\b|not in\b)")


def test_every_section_has_its_hooks_and_nothing_outside_branches_on_a_kind():
    assert list(KINDS) == list(GENERATOR_SECTIONS)
    assert all(kind.name == name for name, kind in KINDS.items())
    branches = [f"{path.relative_to(ROOT)}:{number}"
                for path in sorted((ROOT / "ray_lt").rglob("*.py"))
                for number, line in enumerate(path.read_text().splitlines(), start=1)
                if BRANCH.search(line)]
    assert branches == []


@pytest.mark.parametrize("overrides, message", [
    (["synthesis.strength=0.5"],
     "synthesis: Value error, strength: 0.5 starts from a noised real image; set synthesis.init: "
     "real"),
    (["synthesis.init=real", "synthesis.strength=0.01"], "strength: 0.01 x num_steps 30 leaves "
                                                         "no denoising step"),
    (["synthesis.strength=1.5"], "synthesis.strength: Input should be less than or equal to 1"),
    (["synthesis.init=real", "generator.kind=feature"],
     "synthesis.init: 'real' starts from a real image, and generator.kind 'feature' samples "
     "feature vectors"),
    (["generator.kind=sd", "generator.prompts=['a {class_name} in {context}']"],
     "generator.prompts: {context} needs a data set with contexts"),
    (["generator.kind=sd", "generator.prompts=['a {label}']"],
     "generator.prompts: Value error, 'a {label}' is not a template"),
    (["generator.kind=sd", "generator.prompts=[]"], "generator.prompts: List should have at least"),
    (["generator.kind=sdxl", "dataset.channels=1"],
     "dataset.channels: 1, but generator.kind 'sdxl' makes RGB images for the classifier"),
])
def test_settings_a_kind_cannot_honour_are_refused_by_key(overrides, message):
    import yaml

    raw = {"dataset": {"kind": "digits_lt", "channels": 3}, "synthesis": {}, "generator": {}}
    for item in overrides:
        key, value = item.split("=", 1)
        section, name = key.split(".")
        raw[section][name] = yaml.safe_load(value)
    with pytest.raises(ConfigError, match=re.escape(message)):
        config_from_dict(raw)


def test_a_pretrained_kind_without_weights_is_refused_before_ray(tmp_path):
    from ray_lt import commands
    from ray_lt.pipeline import check_run_config

    cfg = load_config(DIGITS, ["generator.kind=sdxl", "dataset.channels=3"])
    with pytest.raises(ConfigError, match="generator.pretrained: set the local folder .* of a "
                                          "StableDiffusionXLPipeline"):
        check_run_config(cfg)
    cfg = load_config(DIGITS, ["generator.kind=sd", f"generator.pretrained={tmp_path / 'no'}",
                               "dataset.channels=3"])
    with pytest.raises(ConfigError, match="does not exist; weights are never downloaded, give a "
                                          "local folder laid out like stable-diffusion-v1-5"):
        check_run_config(cfg)
    with pytest.raises(ConfigError, match="generator.kind: 'sd' is not trained by "
                                          "train-generator"):
        commands.train_generator(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_the_prompts_file_names_its_line(tmp_path):
    names = ["goldfish", "tench", "dog"]
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"class": "goldfish", "prompts": ["a {class_name} in a bowl", "a fish"]}\n'
                    '\n{"class": 2, "prompts": ["a {class_name} on grass"]}\n')
    assert read_prompts_file(path, names) == {0: ["a {class_name} in a bowl", "a fish"],
                                              2: ["a {class_name} on grass"]}
    for line, message in [
        ('{"class": "shark", "prompts": ["x"]}', "class 'shark' is not a class of the data set"),
        ('{"class": 0, "prompts": []}', "prompts must be a non-empty list of strings"),
        ('{"class": 0, "prompts": ["a {colour}"]}', "'a {colour}' uses an unknown field 'colour'"),
        ('{"class": 0}', 'expected {"class": NAME or INDEX'),
        ("not json", "not a JSON object"),
    ]:
        path.write_text('{"class": 1, "prompts": ["a {class_name}"]}\n' + line + "\n")
        with pytest.raises(ConfigError, match=re.escape(f"{path}:2: {message}")):
            read_prompts_file(path, names)
    path.write_bytes(b'{"class": 1, "prompts": ["caf\xe9"]}\n')
    with pytest.raises(ConfigError, match=f"{path} is not UTF-8 text"):
        read_prompts_file(path, names)
