"""``ray-lt export``: a run's synthetic set (and its real training set) written as an
ImageFolder tree, WebDataset shards and Parquet on the session's Ray, read back with
torchvision's ``ImageFolder`` and Ray Data's ``read_webdataset``, every row counted; a rerun
skips what is written, and filtered rows stay out unless asked."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import SYNTHESIZED_ROWS

from ray_lt import commands
from ray_lt.cli import main
from ray_lt.errors import ConfigError
from ray_lt.export import class_folders

REAL_ROWS = 276  # the digits' long-tailed training split


def test_imagefolder_with_the_real_set_is_a_balanced_copy_torchvision_reads(
        synthesized, tmp_path, ray_session):
    from torchvision.datasets import ImageFolder

    to = tmp_path / "folder"
    done = commands.export(synthesized, to, "imagefolder", with_real=True)
    assert done["rows"] == done["written"] == SYNTHESIZED_ROWS + REAL_ROWS
    folder = ImageFolder(str(to))
    assert len(folder) == SYNTHESIZED_ROWS + REAL_ROWS
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    assert folder.classes == class_folders(names) == [f"{i}_{n}" for i, n in enumerate(names)]
    counts = np.bincount([label for _, label in folder.samples], minlength=10)
    manifest = pd.read_csv(to / "manifest.csv")
    assert counts.tolist() == manifest.groupby("label").size().tolist()
    # real + synthetic: the quota is 0.1 of each class's gap to 100
    real = np.array([100, 64, 41, 27, 17, 11, 7, 4, 3, 2])
    assert (counts == real + np.round(0.1 * (100 - real))).all()
    image, label = folder[0]
    assert image.size == (16, 16) and label == 0
    synthetic = manifest[manifest["origin"] == "synthetic"]
    assert len(synthetic) == SYNTHESIZED_ROWS and synthetic["seed"].is_unique
    assert (synthetic["guidance_scale"] == 0.03).all()
    assert synthetic["source"].str.match(r"synthetic/shard_\d{6}\.parquet").all()
    assert set(synthetic["criterion"]) <= {"entropy", "hardness", "total_uncertainty"}
    assert (manifest["class_name"] == [names[i] for i in manifest["label"]]).all()
    assert all((to / f).is_file() for f in manifest["file"])

    # A rerun writes nothing; a unit whose part is gone is written again, the same bytes.
    again = commands.export(synthesized, to, "imagefolder", with_real=True)
    assert again["written"] == 0 and again["skipped_units"] > 0
    journal = (to / ".ray-lt-export.jsonl").read_text().splitlines()
    assert len(journal) == again["skipped_units"]
    # As if the driver had died before journalling unit 3, and in the middle of unit 5's line.
    (to / ".ray-lt-export.jsonl").write_text(
        "\n".join(journal[:3] + journal[4:5] + journal[6:]) + "\n" + journal[5][:20])
    redo = [row["file"] for i in (3, 5) for row in json.loads(journal[i])["rows"]]
    before = {f: (to / f).read_bytes() for f in redo}
    third = commands.export(synthesized, to, "imagefolder", with_real=True)
    assert third["written"] == len(redo) and third["skipped_units"] == len(journal) - 2
    assert {f: (to / f).read_bytes() for f in redo} == before
    pd.testing.assert_frame_equal(pd.read_csv(to / "manifest.csv"), manifest)

    with pytest.raises(ConfigError, match="holds an export made with other options "
                                          r"\(format: 'imagefolder' -> 'parquet'"):
        commands.export(synthesized, to, "parquet", with_real=True)


def test_webdataset_shards_read_back_with_ray_data(synthesized, tmp_path, ray_session):
    import ray

    to = tmp_path / "wds"
    code = main(["export", str(synthesized), "--to", str(to), "--format", "webdataset"])
    assert code == 0
    tars = sorted(to.glob("shard_*.tar"))
    assert len(tars) == len(list((synthesized / "synthetic").glob("shard_*.parquet")))
    rows = ray.data.read_webdataset([str(t) for t in tars]).take_all()
    assert len(rows) == SYNTHESIZED_ROWS
    first = rows[0]
    assert first["png"].shape[:2] == (16, 16) and first["cls"] == first["json"]["label"]
    assert {r["__key__"] for r in rows} == set(pd.read_csv(to / "manifest.csv")["key"])


def test_parquet_leaves_filtered_rows_out_unless_asked(synthesized, tmp_path, ray_session):
    run = tmp_path / "run"
    shutil.copytree(synthesized, run)
    ids = pd.concat(pd.read_parquet(p, columns=["shard_id", "seed"])
                    for p in sorted((run / "synthetic").glob("shard_*.parquet")))
    keep = np.ones(len(ids), bool)
    keep[::4] = False
    reasons = np.where(keep, "", "confidently_other_class")
    pd.DataFrame({"shard_id": ids["shard_id"], "seed": ids["seed"], "keep": keep,
                  "reason": reasons}).to_parquet(run / "synthetic" / "filter.parquet")
    kept = commands.export(run, tmp_path / "kept", "parquet")
    assert kept["rows"] == int(keep.sum())
    table = pd.concat(pd.read_parquet(p) for p in sorted((tmp_path / "kept").glob("*.parquet")))
    assert len(table) == keep.sum() and (table["filter_reason"] == "").all()
    assert {"image", "label", "class_name", "seed", "criterion", "source"} <= set(table.columns)
    every = commands.export(run, tmp_path / "all", "parquet", include_filtered=True)
    assert every["rows"] == len(ids)
    manifest = pd.read_csv(tmp_path / "all" / "manifest.csv", keep_default_na=False)
    assert (manifest["filter_reason"] == "confidently_other_class").sum() == (~keep).sum()
    assert sum(pq.ParquetFile(p).metadata.num_rows
               for p in (tmp_path / "all").glob("*.parquet")) == len(ids)


def test_export_refuses_a_folder_that_holds_something_else(synthesized, tmp_path, capsys):
    to = tmp_path / "busy"
    to.mkdir()
    (to / "mine.txt").write_text("keep me")
    code = main(["export", str(synthesized), "--to", str(to), "--format", "parquet"])
    assert code == 2
    assert f"--to {to}: is not empty and holds no ray-lt export" in capsys.readouterr().err
    assert (to / "mine.txt").read_text() == "keep me"
    code = main(["export", str(tmp_path / "nowhere"), "--to", str(to), "--format", "parquet"])
    assert code == 2 and "not a ray-lt run directory" in capsys.readouterr().err
