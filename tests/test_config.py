from pathlib import Path

import pytest

from ray_lt.config import apply_overrides, config_from_dict, dump_config, load_config
from ray_lt.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["digits_lt", "digits_groups"])
def test_shipped_configs_validate(name):
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    assert cfg.dataset.kind == name


def test_unknown_key_is_rejected_with_its_path(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("dataset:\n  kind: digits_lt\ntrain:\n  epocs: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert f"{path}: train.epocs: Extra inputs are not permitted" in str(err.value)


def test_mistyped_value_names_the_key_without_the_union_tag(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("dataset:\n  kind: digits_lt\n  imbalance_factor: lots\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "dataset.imbalance_factor:" in message
    assert "dataset.digits_lt" not in message


def test_set_overrides_parse_yaml_values(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("dataset:\n  kind: digits_lt\n")
    cfg = load_config(path, ["train.epochs=7", "train.augment.flip=true",
                             "train.augment.resized_crop_scale=[0.5, 1.0]",
                             "dataset.imbalance_factor=10"])
    assert cfg.train.epochs == 7
    assert cfg.train.augment.flip is True
    assert cfg.train.augment.resized_crop_scale == (0.5, 1.0)
    assert cfg.dataset.imbalance_factor == 10.0


def test_set_can_point_at_a_real_dataset_root(tmp_path):
    raw = apply_overrides({"dataset": {"kind": "imagenet_lt", "num_classes": 1000}},
                          ["dataset.root=/data/ImageNet_LT"])
    cfg = config_from_dict(raw)
    assert str(cfg.dataset.root) == "/data/ImageNet_LT"
    assert cfg.dataset.list_name("train") == "ImageNet_LT_train.txt"
    assert config_from_dict({"dataset": {"kind": "places_lt", "root": "/d", "num_classes": 365}}
                            ).dataset.list_name("test") == "Places_LT_test.txt"


@pytest.mark.parametrize("override, message", [
    ("train.nope=1", "train.nope: Extra inputs are not permitted"),
    ("train=3", "train: Input should be a valid dictionary"),
    ("noequals", "expected KEY.PATH=VALUE"),
    ("train.epochs.x=1", "train.epochs is a value, not a section"),
])
def test_bad_overrides(tmp_path, override, message):
    path = tmp_path / "c.yaml"
    path.write_text("dataset:\n  kind: digits_lt\ntrain:\n  epochs: 2\n")
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(path, [override])


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("dataset:\n  kind: digits_lt\ntrain: [unclosed\n")
    with pytest.raises(ConfigError, match=rf"{path}:\d+: not valid YAML"):
        load_config(path)


def test_missing_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/no/such/config.yaml")


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="rarest digit has only 174"):
        config_from_dict({"dataset": {"kind": "digits_lt", "max_per_class": 150}})
    with pytest.raises(ConfigError, match="few_threshold must not exceed many_threshold"):
        config_from_dict({"dataset": {"kind": "digits_lt"},
                          "evaluate": {"few_threshold": 50, "many_threshold": 10}})


def test_dump_round_trips(tmp_path):
    cfg = load_config(ROOT / "configs" / "digits_groups.yaml", ["train.epochs=3"])
    dump_config(cfg, tmp_path / "out.yaml")
    assert load_config(tmp_path / "out.yaml") == cfg
