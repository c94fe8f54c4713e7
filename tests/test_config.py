from pathlib import Path

import pytest
import yaml

from ray_lt.config import load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["digits_lt", "digits_groups", "imagenet_lt", "places_lt",
                                  "nico_pp"])
def test_shipped_configs_validate(name):
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    assert cfg.dataset.kind == name


def test_custom_config_is_the_digits_pipeline_over_class_folders(tmp_path):
    cfg = load_config(ROOT / "configs" / "custom_lt.yaml", [f"dataset.root={tmp_path}"])
    assert (cfg.dataset.kind, cfg.dataset.root, cfg.dataset.contexts) == \
        ("folder", tmp_path, False)
    assert (cfg.model.name, cfg.generator.kind) == ("small_cnn", "pixel")
    listed = load_config(ROOT / "configs" / "custom_lt.yaml",
                         ["dataset.kind=manifest", f"dataset.root={tmp_path}",
                          "dataset.manifest=list.csv"])
    assert listed.dataset.manifest_path() == tmp_path / "list.csv"


def test_switching_a_kind_drops_the_keys_of_the_old_kind_and_says_which(caplog, tmp_path):
    from ray_lt.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "configs" / "digits_lt.yaml", ["dataset.kind=imagenet_lt"])
    assert "dataset.root: Field required" in str(err.value)
    assert "test_per_class" not in str(err.value)
    assert ("--set dataset.kind=imagenet_lt: dropped dataset keys imagenet_lt does not have: "
            "imbalance_factor, max_per_class, val_per_class, test_per_class") in caplog.text
    cfg = load_config(ROOT / "configs" / "digits_lt.yaml",
                      ["generator.kind=sd", f"generator.pretrained={tmp_path}",
                       "dataset.channels=3"])
    assert (cfg.generator.kind, cfg.generator.prompts) == ("sd", ["a photo of a {class_name}"])
    assert "dropped generator keys sd does not have: block_out_channels, train_steps" \
        in caplog.text
    # in a file, a key of another kind is refused, naming the kinds that have it
    raw = yaml.safe_load((ROOT / "configs" / "digits_lt.yaml").read_text())
    raw["generator"]["kind"] = "sdxl"
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "c.yaml")
    assert ("generator.train_steps: Extra inputs are not permitted (it is a key of "
            "generator.kind pixel, feature, not sdxl; remove it when switching kinds)"
            ) in str(err.value)


def test_real_data_configs_carry_the_papers_settings():
    imagenet = load_config(ROOT / "configs" / "imagenet_lt.yaml")
    s = imagenet.synthesis
    assert (imagenet.model.name, imagenet.generator.kind) == ("resnext50_32x4d", "unclip")
    assert (s.target, s.criteria, s.guidance_scale, s.num_steps, s.cfg_scale,
            s.guidance_every) == (1300, {"entropy": 1.0}, 0.03, 30, 3.0, 5)
    assert imagenet.generator.embedding_dropout == 0.5
    # the sampler's settings measured on an H100 (docs/performance.md)
    assert (imagenet.generator.height, s.batch_size, s.guidance_decoder, s.guidance_micro_batch,
            s.compile, s.precision) == (512, 32, "latent_resize", 16, True, "bf16")
    places = load_config(ROOT / "configs" / "places_lt.yaml")
    assert (places.model.name, places.synthesis.target, places.train.lr) == \
        ("resnet152", 4980, 0.0028)
    nico = load_config(ROOT / "configs" / "nico_pp.yaml")
    assert (nico.model.name, nico.synthesis.balance, nico.synthesis.target) == \
        ("resnet50", "group", 811)
    assert nico.tune.objective == "worst_group"
    assert "{context}" in nico.generator.prompts[0]


@pytest.mark.parametrize("name", ["imagenet_lt", "places_lt", "nico_pp"])
def test_real_data_runs_fail_clearly_without_weights_or_data(name, tmp_path, capsys,
                                                            monkeypatch):
    from conftest import ROOT, run_cli

    from ray_lt.cli import main
    from ray_lt.generate.unclip import save_components
    from ray_lt.testing import tiny_unclip_components

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
    monkeypatch.chdir(ROOT)
    for overrides, message in cases:  # in this process: each is refused before Ray starts
        code = main(["run", f"configs/{name}.yaml", "--out", str(out), "--set", *overrides])
        stderr = capsys.readouterr().err
        assert code == 2
        assert message in stderr, stderr
    assert not out.exists()  # refused before anything was written
    if name != "imagenet_lt":
        return  # the data stage's own check (below) starts Ray: once is enough
    # Everything there but the data, sized to this machine (the GPU cluster's settings are
    # refused by the cluster check first): the data stage names the missing list file.
    done = run_cli("run", f"configs/{name}.yaml", "--out", str(out), "--set",
                   f"dataset.root={data}", "model.checkpoint=null",
                   f"generator.pretrained={weights}", "scaling.use_gpu=false",
                   "scaling.num_workers=1", "scaling.cpus_per_worker=1",
                   "synthesis.num_actors=1", "synthesis.cpus_per_actor=0.5",
                   "synthesis.gpus_per_actor=0", "evaluate.num_actors=1",
                   "evaluate.cpus_per_actor=0.5", "evaluate.gpus_per_actor=0")
    assert done.returncode == 2
    assert str(data / "ImageNet_LT_train.txt") in done.stderr, done.stderr[-2000:]


@pytest.mark.parametrize(("override", "key"), [
    ("train.group_objective=dro", "train.group_objective: 'dro'"),
    ("final.group_objective=reweight", "final.group_objective: 'reweight'"),
    ("synthesis.criteria={target_group: 1.0}", "synthesis.criteria: ['target_group']"),
    ("tune.space.criteria=[entropy, group_entropy]", "tune.space.criteria: ['group_entropy']"),
    ("tune.space.final_group_objective=[erm, dro]", "tune.space.final_group_objective"),
])
def test_group_settings_on_a_data_set_without_groups_name_their_key(override, key):
    from ray_lt.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "configs" / "digits_lt.yaml", [override])
    assert key in str(err.value) and "'digits_lt' has no groups" in str(err.value)


def test_group_settings_validate_on_a_data_set_with_groups():
    cfg = load_config(ROOT / "configs" / "digits_groups.yaml", [
        "train.group_objective=dro", "final.group_objective=erm",
        "synthesis.criteria={target_group: 0.5, group_entropy: 0.5}",
        "tune.space.final_group_objective=[erm, reweight, dro]"])
    from ray_lt.config import final_train_config

    assert cfg.train.group_objective == "dro"
    assert final_train_config(cfg).group_objective == "erm"


def test_group_dro_on_synthetic_rows_without_groups_is_refused():
    from ray_lt.errors import ConfigError

    with pytest.raises(ConfigError, match="final.group_objective: 'dro' trains on synthetic"):
        load_config(ROOT / "configs" / "digits_groups.yaml",
                    ["synthesis.balance=class", "final.group_objective=dro"])
    with pytest.raises(ConfigError, match="train.group_objective: 'dro' trains on synthetic"):
        load_config(ROOT / "configs" / "digits_groups.yaml",
                    ["synthesis.balance=class", "train.group_objective=dro",
                     "final.group_objective=erm", "rounds.count=2"])
    # the guide alone, or reweighting (real rows only), is fine
    load_config(ROOT / "configs" / "digits_groups.yaml",
                ["synthesis.balance=class", "train.group_objective=dro",
                 "final.group_objective=reweight"])
