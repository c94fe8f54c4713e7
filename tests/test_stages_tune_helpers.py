"""Stage records, the tuning search space, mixtures, trial configs and the Pareto front."""

import json

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT

from ray_lt.config import config_from_dict, load_config
from ray_lt.data import load_dataset
from ray_lt.errors import ConfigError
from ray_lt.generate.plan import plan
from ray_lt.pipeline import STAGES
from ray_lt.stages import (
    check_stage,
    check_stages,
    default_value,
    record_stage,
    stage_keys,
    stage_matches,
)
from ray_lt.tune.search import (
    check_trial_quota,
    mixture,
    objective_metrics,
    pareto_front,
    results_table,
    search_space,
    trial_config,
    write_best_config,
)

CONFIG = ROOT / "configs" / "digits_lt.yaml"


def test_stage_keys_leave_out_resources_and_sampling_time_settings():
    cfg = load_config(CONFIG)
    keys = stage_keys(cfg, STAGES["synthesis"])
    assert keys["synthesis.guidance_scale"] == 0.03
    assert keys["synthesis.criteria.entropy"] == 1.0
    assert "synthesis.num_actors" not in keys and "synthesis.filter.enabled" not in keys
    assert "train.epochs" not in keys
    generator = stage_keys(cfg, STAGES["generator"])
    assert "generator.train_steps" in generator
    assert "generator.embedding_dropout" not in generator
    # More sampler actors make the same samples: no conflict.
    more = load_config(CONFIG, ["synthesis.num_actors=4"])
    assert stage_keys(more, STAGES["synthesis"]) == keys


def test_a_changed_config_is_refused_naming_key_and_folder(tmp_path):
    cfg = load_config(CONFIG)
    record_stage(cfg, tmp_path, STAGES["synthesis"])
    check_stage(cfg, tmp_path, STAGES["synthesis"], tmp_path / "synthetic")  # same config: fine
    changed = load_config(CONFIG, ["synthesis.guidance_scale=0.1"])
    assert not stage_matches(changed, tmp_path, STAGES["synthesis"])
    with pytest.raises(ConfigError) as err:
        check_stage(changed, tmp_path, STAGES["synthesis"], tmp_path / "synthetic")
    message = str(err.value)
    assert "synthesis.guidance_scale: 0.03 -> 0.1" in message
    assert str(tmp_path / "synthetic") in message
    # check_stages looks only at stages whose output exists.
    check_stages(changed, tmp_path, [STAGES["synthesis"]])
    (tmp_path / "synthetic").mkdir()
    with pytest.raises(ConfigError, match="its synthesis stage"):
        check_stages(changed, tmp_path, [STAGES["synthesis"]])


def test_a_record_older_than_a_config_key_matches_at_its_default(tmp_path):
    """A run directory recorded before train.group_objective existed resumes; setting the
    new key to anything but its default is a change."""
    cfg = load_config(CONFIG)
    record_stage(cfg, tmp_path, STAGES["classifier"])
    doc = json.loads((tmp_path / "stages.json").read_text())
    for key in ("train.group_objective", "train.dro_step_size"):
        del doc["config"]["classifier"][key]
    (tmp_path / "stages.json").write_text(json.dumps(doc))
    check_stage(cfg, tmp_path, STAGES["classifier"], tmp_path / "classifier")
    assert stage_matches(cfg, tmp_path, STAGES["classifier"])
    # a key the record has but the config lost is a change, as is a new key off its default
    with pytest.raises(ConfigError, match="train.dro_step_size: None -> 0.5"):
        check_stage(load_config(CONFIG, ["train.dro_step_size=0.5"]), tmp_path,
                    STAGES["classifier"],
                    tmp_path / "classifier")
    doc["config"]["classifier"]["train.retired_key"] = 1
    (tmp_path / "stages.json").write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match="train.retired_key: 1 -> None"):
        check_stage(cfg, tmp_path, STAGES["classifier"], tmp_path / "classifier")
    assert default_value("train.group_objective") == "erm"
    assert default_value("synthesis.criteria") == {"entropy": 1.0}
    assert default_value("train.augment.resized_crop_scale") is None


def test_the_final_stage_depends_on_the_synthetic_data():
    a = stage_keys(load_config(CONFIG), STAGES["final"])
    b = stage_keys(load_config(CONFIG, ["synthesis.criteria={loss: 1.0}"]), STAGES["final"])
    assert a != b


def test_mixture_normalises_weights():
    assert mixture({"entropy": 1.0, "loss": 3.0}) == {"entropy": 0.25, "loss": 0.75}
    assert mixture({"entropy": 0.0, "loss": 0.0}) == {"entropy": 0.5, "loss": 0.5}
    probs = mixture({"entropy": 0.1, "loss": 0.2, "hardness": 0.4})
    assert sum(probs.values()) == pytest.approx(1.0, abs=1e-9)


def test_trial_config_applies_params_and_scales_the_quota():
    base = load_config(CONFIG, ["synthesis.quota_scale=0.5"]).model_dump(mode="json")
    raw = trial_config(base, {"synthesis": {"guidance_scale": 0.07},
                              "mixture": {"entropy": 1.0, "hardness": 1.0},
                              "train": {"synthetic_weight": 0.4}}, quota_scale=0.5)
    cfg = config_from_dict(raw)
    assert cfg.synthesis.guidance_scale == 0.07
    assert cfg.synthesis.criteria == {"entropy": 0.5, "hardness": 0.5}
    assert cfg.train.synthetic_weight == 0.4
    assert cfg.synthesis.quota_scale == 0.25
    assert base["synthesis"]["guidance_scale"] == 0.03  # the base is not modified


def test_search_space_from_config_and_its_errors():
    from ray.tune.search.sample import Float

    cfg = load_config(CONFIG, ["tune.space.criteria=[entropy, loss, hardness]",
                               "tune.space.balanced_softmax_weight=[0.5, 1.0]"])
    space = search_space(cfg)
    assert isinstance(space["synthesis"]["guidance_scale"], Float)
    assert space["synthesis"]["guidance_scale"].lower == 0.003
    assert set(space["mixture"]) == {"entropy", "loss", "hardness"}
    assert space["final"]["balanced_softmax_weight"].upper == 1.0
    with pytest.raises(ConfigError, match="tune.space.embedding_dropout"):
        search_space(load_config(CONFIG, ["tune.space.embedding_dropout=[0.1, 0.9]"]))
    with pytest.raises(ConfigError, match="guidance_scale: Value error, searched on a log"):
        load_config(CONFIG, ["tune.space.guidance_scale=[0, 0.1]"])
    with pytest.raises(ConfigError, match="space.synthetic_weight: Value error, the range must"):
        load_config(CONFIG, ["tune.space.synthetic_weight=[1.0, 0.5]"])
    with pytest.raises(ConfigError, match="tune.space.scale_slope: synthesis.scale_by is 'none'"):
        search_space(load_config(CONFIG, ["tune.space.scale_slope=[0, 1]"]))
    slope = search_space(load_config(CONFIG, ["tune.space.scale_slope=[0, 1.5]",
                                              "synthesis.scale_by=count"]))
    assert (slope["synthesis"]["scale_slope"].lower, slope["synthesis"]["scale_slope"].upper) == (
        0.0, 1.5)
    grouped = search_space(load_config(
        ROOT / "configs" / "digits_groups.yaml",
        ["tune.space.rounds=[1, 3, 2, 3]", "tune.space.final_group_objective=[dro, erm]",
         "tune.space.criteria=[entropy, target_group]"]))
    assert sorted(grouped["rounds"]["count"].categories) == [1, 2, 3]
    assert sorted(grouped["final"]["group_objective"].categories) == ["dro", "erm"]
    assert set(grouped["mixture"]) == {"entropy", "target_group"}
    with pytest.raises(ConfigError, match="tune.space.rounds.0: Input should be greater"):
        load_config(CONFIG, ["tune.space.rounds=[0, 2]"])
    raw = trial_config(load_config(CONFIG).model_dump(mode="json"),
                       {"rounds": {"count": 3}}, quota_scale=1.0)
    assert config_from_dict(raw).rounds.count == 3


def test_objectives_need_what_the_data_set_has():
    cfg = load_config(CONFIG, ["tune.objective=both"])
    assert objective_metrics(cfg, has_groups=True, has_few=True) == ["val_few",
                                                                     "val_worst_group"]
    with pytest.raises(ConfigError, match="tune.objective: 'both' needs worst-group"):
        objective_metrics(cfg, has_groups=False, has_few=True)
    with pytest.raises(ConfigError, match="needs Few classes"):
        objective_metrics(load_config(CONFIG), has_groups=False, has_few=False)


def test_pareto_front():
    table = pd.DataFrame({"a": [0.9, 0.5, 0.7, 0.7, np.nan, 0.2],
                          "b": [0.1, 0.6, 0.5, 0.4, 0.9, 0.1]})
    # row 3 is beaten by row 2; row 5 by everything; row 4 has no value.
    assert pareto_front(table, ["a", "b"]).tolist() == [True, True, True, False, False, False]
    assert pareto_front(table, ["a"]).tolist() == [True, False, False, False, False, False]


def test_best_config_validates_and_keeps_the_full_quota(tmp_path):
    cfg = load_config(CONFIG, ["tune.quota_scale=0.25"])
    best = pd.Series({"trial_id": "abc", "val_few": 0.8,
                      "config/synthesis/guidance_scale": 0.05,
                      "config/mixture/entropy": 0.3, "config/mixture/loss": 0.1})
    path = tmp_path / "best_config.yaml"
    write_best_config(cfg, best, ["val_few"], path)
    assert path.read_text().startswith("# Best trial abc")
    again = load_config(path)
    assert again.synthesis.guidance_scale == 0.05
    assert again.synthesis.criteria == {"entropy": 0.75, "loss": 0.25}
    assert again.synthesis.quota_scale == cfg.synthesis.quota_scale


def test_worst_group_search_ranks_by_it_and_writes_its_winner(tmp_path):
    groups = ROOT / "configs" / "digits_groups.yaml"
    cfg = load_config(groups, ["tune.objective=worst_group"])
    metrics = objective_metrics(cfg, has_groups=True, has_few=False)
    assert metrics == ["val_worst_group"]
    frame = pd.DataFrame({"trial_id": ["a", "b", "c"], "val_worst_group": [0.4, 0.7, 0.55],
                          "val_acc": [0.9, 0.8, 0.85], "test_worst_group": [0.3, 0.6, 0.5],
                          "config/synthesis/guidance_scale": [0.01, 0.2, 0.05],
                          "other": [1, 2, 3]})
    table = results_table(frame, metrics)
    assert table["trial_id"].tolist() == ["b", "c", "a"] and "other" not in table
    assert table["pareto"].tolist() == [True, False, False]
    write_best_config(cfg, table.iloc[0], metrics, tmp_path / "best.yaml")
    best = load_config(tmp_path / "best.yaml")
    assert best.synthesis.guidance_scale == 0.2 and best.tune.objective == "worst_group"
    assert "val_worst_group 0.7000" in (tmp_path / "best.yaml").read_text()


def test_an_empty_quota_is_refused_naming_the_keys(ray_session):
    groups = ROOT / "configs" / "digits_groups.yaml"
    cfg = load_config(groups, ["synthesis.target=4", "synthesis.quota_scale=0.2"])
    data = load_dataset(cfg.dataset, cfg.seed)
    # 0.2 of (4 - 0) rounds to 1 image for each empty group: a plan
    shards = plan(cfg, data)
    assert sum(sh["n"] for sh in shards) == int((data.group_counts == 0).sum())
    # tune.quota_scale 0.5 makes it 0.1 of 4, which rounds to 0 everywhere
    with pytest.raises(ConfigError, match=r"tune.quota_scale: 0.5 times synthesis.quota_scale "
                                          r"0.2 .*quota is 0 for every group"):
        check_trial_quota(cfg.model_copy(update={"tune": cfg.tune.model_copy(
            update={"quota_scale": 0.5})}), data)
    check_trial_quota(load_config(groups, ["synthesis.target=4", "synthesis.quota_scale=0.2",
                                           "tune.quota_scale=1"]), data)
    lt = load_config(CONFIG, ["synthesis.target=1"])  # every class already has 1 image
    with pytest.raises(ConfigError, match=r"quota is 0 for every class \(synthesis.target 1, "
                                          r"quota_scale 1"):
        plan(lt, load_dataset(lt.dataset, lt.seed))


def test_unseen_group_search_keeps_chosen_values_and_needs_empty_groups(tmp_path):
    groups = ROOT / "configs" / "digits_groups.yaml"
    cfg = load_config(groups)  # its search: the empty groups, worst-group beside them
    metrics = objective_metrics(cfg, has_groups=True, has_few=False, has_unseen=True)
    assert metrics == ["val_unseen_groups", "val_worst_group"]
    with pytest.raises(ConfigError, match="tune.objective: 'unseen_groups' needs class x "
                                          "context groups with no training image, but "
                                          "digits_groups has none"):
        objective_metrics(cfg, has_groups=True, has_few=False, has_unseen=False)
    frame = pd.DataFrame({"trial_id": ["a", "b", "c"], "val_unseen_groups": [0.7, 0.9, 0.8],
                          "val_worst_group": [0.6, 0.4, 0.6],
                          "config/synthesis/guidance_scale": [0.01, 0.2, 0.05],
                          "config/final/group_objective": ["erm", "dro", "dro"],
                          "config/rounds/count": [1, 3, 2],
                          "config/mixture/target_group": [0.2, 0.9, 0.5],
                          "config/mixture/entropy": [0.8, 0.1, 0.5]})
    table = results_table(frame, metrics)
    # a is beaten by c on both; b and c trade unseen-group against worst-group accuracy
    assert table["trial_id"].tolist() == ["b", "c", "a"]
    assert table["pareto"].tolist() == [True, True, False]
    write_best_config(cfg, table.iloc[1], metrics, tmp_path / "best.yaml")
    best = load_config(tmp_path / "best.yaml")
    assert best.final.group_objective == "dro" and best.rounds.count == 2
    assert best.synthesis.criteria == {"target_group": 0.5, "entropy": 0.5}
    assert "val_unseen_groups 0.8000, val_worst_group 0.6000" in \
        (tmp_path / "best.yaml").read_text()


def test_the_search_plot_marks_searched_choices(tmp_path):
    from ray_lt.tune.plots import marker_column, plot_search

    table = pd.DataFrame({"config/synthesis/guidance_scale": [0.01, 0.05, 0.2],
                          "config/mixture/entropy": [0.1, 0.5, 0.9],
                          "config/rounds/count": [1, 3, 3],
                          "val_unseen_groups": [0.9, 0.8, 0.7], "pareto": [True, False, False]})
    assert marker_column(table) == "config/rounds/count"
    assert marker_column(table.drop(columns="config/rounds/count")) is None
    path = plot_search(table, ["val_unseen_groups"], tmp_path / "search.png")
    assert path.stat().st_size > 3000
