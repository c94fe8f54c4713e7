"""The headline-table bench: setting names, cell folders and paired differences."""

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT

spec = importlib.util.spec_from_file_location("digits_table", ROOT / "bench" / "digits_table.py")
table_bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(table_bench)


def test_settings_and_their_folders(tmp_path):
    rows = table_bench.synthetic_rows(["entropy", "total_uncertainty"], [0.1], round_two=True)
    assert list(rows) == ["+ unguided synthetic", "+ FG entropy @ 0.1, round 2",
                          "+ FG total uncertainty @ 0.1, round 2"]
    assert rows["+ FG entropy @ 0.1, round 2"] == ["synthesis.criteria={entropy: 1.0}",
                                                   "synthesis.guidance_scale=0.1"]
    folder = table_bench.cell_dir(tmp_path, "digits_groups", 2, "+ FG entropy @ 0.1, round 2")
    assert folder == tmp_path / "digits_groups" / "seed2" / "FG_entropy_s0.1_round2"
    plain = table_bench.synthetic_rows(["loss"], None)
    assert list(plain) == ["+ unguided synthetic", "+ FG loss"]
    sloped = table_bench.synthetic_rows(["loss"], None, slopes=[0.5])
    assert sloped["+ FG loss, per class s=0.5"] == [
        "synthesis.criteria={loss: 1.0}", "synthesis.scale_by=count", "synthesis.scale_slope=0.5"]
    folder = table_bench.cell_dir(tmp_path, "digits_lt", 0, "+ FG loss, per class s=0.5")
    assert folder.parent == tmp_path / "digits_lt" / "seed0" and "=" not in folder.name
    rounds = table_bench.synthetic_rows(["entropy"], None, rounds=[3])
    assert rounds["+ FG entropy, 3 rounds"] == ["synthesis.criteria={entropy: 1.0}",
                                                "rounds.count=3"]
    assert table_bench.cell_dir(tmp_path, "digits_lt", 0, "+ FG entropy, 3 rounds").name == \
        "FG_entropy_3_rounds"


def test_group_rows_name_distinct_folders_and_validate_on_digits_groups(tmp_path):
    from ray_lt.config import final_train_config, load_config

    folders = {table_bench.cell_dir(tmp_path, "digits_groups", 0, name).name
               for name in table_bench.GROUP_ROWS}
    assert len(folders) == len(table_bench.GROUP_ROWS)
    assert "FG_entropy_DRO_guide" in folders and all("," not in f for f in folders)
    for name, overrides in table_bench.GROUP_ROWS.items():
        extra = table_bench.DRO if name.endswith(table_bench.DRO_GUIDE) else []
        cfg = load_config(ROOT / "configs" / "digits_groups.yaml", [*overrides, *extra])
        guide, final = cfg.train.group_objective, final_train_config(cfg).group_objective
        assert (guide, final) == (("dro", "erm") if extra else
                                  ("erm", "dro") if "DRO final" in name else ("erm", "erm"))
    assert list(table_bench.group_rows(["target group", "unguided synthetic, DRO"])) == [
        "+ FG target group", "+ unguided synthetic, DRO final", "+ FG target group, DRO final"]
    assert table_bench.group_rows(None) == table_bench.GROUP_ROWS
    with pytest.raises(SystemExit, match="no group row matches"):
        table_bench.group_rows(["nothing like it"])


def test_paired_differences_without_few_classes():
    table = pd.DataFrame({
        "dataset": "digits_groups", "seed": [0, 0, 1, 1],
        "setting": ["+ unguided synthetic", "+ FG entropy"] * 2,
        "few": [None] * 4, "worst_group": [0.5, 0.6, 0.3, 0.2],
        "empty_groups": [0.80, 0.83, 0.70, 0.71], "overall": [0.9, 0.91, 0.88, 0.87]})
    diffs = table_bench.paired(table).loc[("digits_groups", "+ FG entropy")]
    assert diffs["seeds"] == 2 and np.isnan(diffs["few"])
    assert diffs["worst_group"] == pytest.approx(0.0)
    assert diffs["worst_group_wins"] == 1 and diffs["empty_groups_wins"] == 2
    assert diffs["empty_groups"] == pytest.approx(0.02)


def test_own_rows_take_overrides_and_refuse_taken_names():
    rows = table_bench.own_rows([["+ tuned", "synthesis.guidance_scale=0.05",
                                  "final.group_objective=dro"]])
    assert rows == {"+ tuned": ["synthesis.guidance_scale=0.05", "final.group_objective=dro"]}
    with pytest.raises(SystemExit, match="'\\+ unguided synthetic': that name is taken"):
        table_bench.own_rows([["+ unguided synthetic", "synthesis.guidance_scale=0"]])
    with pytest.raises(SystemExit, match="give KEY=VALUE overrides after the name"):
        table_bench.own_rows([["+ tuned"]])
    folder = table_bench.cell_dir(Path("out"), "digits_groups", 1, "+ tuned: FG mix @ 0.03, DRO")
    assert folder.name == "tuned_FG_mix_s0.03_DRO"
