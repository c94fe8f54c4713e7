from pathlib import Path

import pytest

from ray_lt.config import load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["digits_lt", "digits_groups", "imagenet_lt", "places_lt",
                                  "nico_pp"])
def test_shipped_configs_validate(name):
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    assert cfg.dataset.kind == name


def test_real_data_configs_carry_the_papers_settings():
    imagenet = load_config(ROOT / "configs" / "imagenet_lt.yaml")
    s = imagenet.synthesis
    assert (imagenet.model.name, imagenet.generator.kind) == ("resnext50_32x4d", "unclip")
    assert (s.target, s.criteria, s.guidance_scale, s.num_steps, s.cfg_scale,
            s.guidance_every) == (1300, {"entropy": 1.0}, 0.03, 30, 3.0, 5)
    assert imagenet.generator.embedding_dropout == 0.5
    places = load_config(ROOT / "configs" / "places_lt.yaml")
    assert (places.model.name, places.synthesis.target, places.train.lr) == \
        ("resnet152", 4980, 0.0028)
    nico = load_config(ROOT / "configs" / "nico_pp.yaml")
    assert (nico.model.name, nico.synthesis.balance, nico.synthesis.target) == \
        ("resnet50", "group", 811)
    assert nico.tune.objective == "worst_group"
    assert "{context}" in nico.generator.prompt_template


@pytest.mark.parametrize("name", ["imagenet_lt", "places_lt", "nico_pp"])
def test_real_data_runs_fail_clearly_without_weights_or_data(name, tmp_path):
    from conftest import run_cli

    from ray_lt.generate.unclip import save_components, tiny_unclip_components

    out = tmp_path / "run"
    data = tmp_path / "data"
    data.mkdir()
    weights = tmp_path / "unclip"
    save_components(tiny_unclip_components(), weights)
    checkpoint = tmp_path / "backbone.pth"
    cases = [  # (overrides, expected message): one missing input at a time
        ([f"dataset.root={tmp_path / 'no_data'}"],
         f"dataset.root: data folder {tmp_path / 'no_data'} does not exist"),
        ([f"dataset.root={data}", f"model.checkpoint={checkpoint}"],
         f"model.checkpoint: file {checkpoint} does not exist"),
        ([f"dataset.root={data}", "model.checkpoint=null",
          f"generator.pretrained={tmp_path / 'nothing'}"],
         f"generator.pretrained: folder {tmp_path / 'nothing'} does not exist"),
        ([f"dataset.root={data}", "model.checkpoint=null"],  # a hub id not in the cache
         "'stabilityai/stable-diffusion-2-1-unclip' is neither a folder nor in the local "
         "Hugging Face cache"),
    ]
    for overrides, message in cases:
        done = run_cli("run", f"configs/{name}.yaml", "--out", str(out), "--set", *overrides)
        assert done.returncode == 2
        assert message in done.stderr, done.stderr
    assert not out.exists()  # refused before anything was written
    if name != "imagenet_lt":
        return  # the data stage's own check (below) starts Ray: once is enough
    # Everything there but the data: the data stage names the missing list file.
    done = run_cli("run", f"configs/{name}.yaml", "--out", str(out), "--set",
                   f"dataset.root={data}", "model.checkpoint=null",
                   f"generator.pretrained={weights}")
    assert done.returncode == 2
    assert str(data / "ImageNet_LT_train.txt") in done.stderr, done.stderr[-2000:]
