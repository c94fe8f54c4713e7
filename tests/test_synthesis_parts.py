"""The pieces of synthesis that run without a cluster: reference choice, the plan and its
manifest, the sampler-to-writer hand-off and the stage records with their timings."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch

from ray_lt.errors import ConfigError
from ray_lt.generate.codec import decode_png, from_ipc, to_ipc
from ray_lt.generate.plan import (
    MANIFEST_FILE,
    check_counts,
    finished_shards,
    store_plan,
    unlisted_shards,
)
from ray_lt.generate.quota import plan_shards
from ray_lt.generate.references import References, choose_references
from ray_lt.generate.writer import encode_images, write_shards
from ray_lt.pipeline import STAGES
from ray_lt.stages import STAGES_FILE, StageMeter, record_stage, record_timing, timings


def test_references_are_chosen_per_class_and_group_by_seed():
    labels = np.repeat(np.arange(4), [50, 10, 3, 1])
    groups = labels * 2 + np.arange(len(labels)) % 2
    groups[labels == 3] = -1
    chosen = choose_references(labels, groups, per_group=4, seed=0)
    per_class = chosen[chosen["for_class"]].groupby("label").size().to_dict()
    assert per_class == {0: 4, 1: 4, 2: 3, 3: 1}
    per_group = chosen[chosen["for_group"]].groupby("group").size().to_dict()
    assert per_group == {0: 4, 1: 4, 2: 4, 3: 4, 4: 2, 5: 1}
    assert (labels[chosen["row"]] == chosen["label"]).all()
    assert chosen["row"].is_monotonic_increasing and chosen["row"].is_unique
    again = choose_references(labels, groups, per_group=4, seed=0)
    other = choose_references(labels, groups, per_group=4, seed=1)
    pd.testing.assert_frame_equal(chosen, again)
    assert set(other["row"]) != set(chosen["row"])


def test_references_table_gives_pools_of_positions():
    table = pd.DataFrame({"row": [9, 2, 5], "label": [1, 0, 1], "group": [3, 0, 2],
                          "for_class": [True, True, False], "for_group": [False, True, True],
                          "embedding": [np.full(3, 9.0), np.full(3, 2.0), np.full(3, 5.0)]})
    refs = References.from_table(table)
    assert refs.embeds[:, 0].tolist() == [2.0, 5.0, 9.0]  # sorted by row
    assert refs.by_class == {0: [0], 1: [2]}
    assert refs.by_group == {0: [0], 2: [1]}


def test_stored_references_condition_like_the_images_they_came_from():
    from ray_lt.generate.unclip import UnCLIPGenerator
    from ray_lt.testing import tiny_unclip_components

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (20, 20, 3), dtype=np.uint8) for _ in range(3)]
    kwargs = dict(class_names=["cat", "dog"], embedding_dropout=0.3, noise_level=10,
                  image_size=24)
    from_images = UnCLIPGenerator(**tiny_unclip_components(), **kwargs,
                                  reference_images={"class": {0: images[:2], 1: images[2:]}})
    embeds = from_images._image_embeds([0, 1, 2])
    table = pd.DataFrame({"row": [0, 1, 2], "label": [0, 0, 1], "group": [-1, -1, -1],
                          "for_class": True, "for_group": False, "embedding": list(embeds.numpy())})
    stored = UnCLIPGenerator(**tiny_unclip_components(), **kwargs,
                             references=References.from_table(table))
    labels, groups, seeds = torch.tensor([0, 1, 0]), torch.tensor([-1, -1, -1]), [3, 4, 5]
    a = from_images.condition(labels, groups, seeds).inputs
    b = stored.condition(labels, groups, seeds).inputs
    assert torch.equal(a["reference"], b["reference"])
    torch.testing.assert_close(a["image_embeds"], b["image_embeds"])
    with pytest.raises(ValueError, match="not both"):
        UnCLIPGenerator(**tiny_unclip_components(), **kwargs)


def _shard_table(shard: dict, shape=(4, 4, 3)) -> pa.Table:
    n = shard["n"]
    pixels = np.arange(n * int(np.prod(shape)), dtype=np.uint8).reshape(n, *shape)
    table = pa.table({"pixels": pa.array([p.tobytes() for p in pixels], type=pa.binary()),
                      "label": [shard["label"]] * n, "group": [shard["group"]] * n,
                      "seed": list(range(n)), "shard_id": [shard["shard_id"]] * n})
    return table.replace_schema_metadata({"shape": ",".join(map(str, shape))})


def test_writer_encodes_png_and_writes_each_shard_atomically(tmp_path):
    shard = {"shard_id": 7, "label": 2, "group": -1, "n": 3}
    table = _shard_table(shard)
    assert from_ipc(to_ipc(table)).equals(table)
    encoded = encode_images(table)
    assert encoded.column_names[0] == "image" and "pixels" not in encoded.column_names
    first = decode_png(encoded.column("image")[0].as_py(), 3)
    assert first.shape == (4, 4, 3) and first.ravel().tolist() == list(range(48))
    manifest = write_shards(pd.DataFrame([{"shard_id": 7, "seconds": 1.5,
                                           "payload": to_ipc(table)}]), str(tmp_path))
    assert manifest.to_dict("records")[0]["file"] == "shard_000007.parquet"
    assert [p.name for p in tmp_path.iterdir()] == ["shard_000007.parquet"]
    assert pd.read_parquet(tmp_path / "shard_000007.parquet")["seed"].tolist() == [0, 1, 2]


def test_plan_manifest_and_counts(tmp_path):
    shards = plan_shards(np.array([5, 0, 3]), 2, seed=0, by_group=False)
    store_plan(tmp_path, shards)
    store_plan(tmp_path, shards)  # the same plan again is fine
    with pytest.raises(ConfigError, match="plan.json.*other synthesis"):
        store_plan(tmp_path, shards[:-1])
    for shard in shards:
        write_shards(pd.DataFrame([{"shard_id": shard["shard_id"], "seconds": 0.0,
                                    "payload": to_ipc(_shard_table(shard))}]), str(tmp_path))
    lines = [json.dumps({"shard_id": s["shard_id"], "n": s["n"]}) for s in shards[:3]]
    (tmp_path / MANIFEST_FILE).write_text("\n".join(lines) + '\n{"shard_id": 4, "n"')
    assert finished_shards(tmp_path) == {0, 1, 2}  # the cut last line is not trusted
    # Complete files the manifest does not list are taken back; a short one is removed.
    short = shards[3]
    assert short["n"] == 2
    write_shards(pd.DataFrame([{"shard_id": 3, "seconds": 0.0,
                                "payload": to_ipc(_shard_table(short).slice(0, 1))}]),
                 str(tmp_path))
    recovered = unlisted_shards(tmp_path, shards, {0, 1, 2})
    assert recovered == [{"shard_id": 4, "n": shards[4]["n"], "file": "shard_000004.parquet"}]
    assert not (tmp_path / "shard_000003.parquet").exists()
    write_shards(pd.DataFrame([{"shard_id": 3, "seconds": 0.0,
                                "payload": to_ipc(_shard_table(short))}]), str(tmp_path))
    counts = check_counts(tmp_path, shards)
    assert counts[["label", "planned", "written"]].values.tolist() == [[0, 5, 5], [2, 3, 3]]
    (tmp_path / "shard_000004.parquet").unlink()
    with pytest.raises(RuntimeError, match="differ from the plan"):
        check_counts(tmp_path, shards)


def test_plan_at_imagenet_lt_size():
    counts = np.maximum(5, (1280 * np.linspace(1, 0, 1000) ** 3).astype(int))
    quotas = np.maximum(1300 - counts, 1)
    shards = plan_shards(quotas, 64, seed=0, by_group=False)
    assert len(shards) == int(np.ceil(quotas / 64).sum()) > 15_000
    assert sum(s["n"] for s in shards) == int(quotas.sum()) > 900_000
    assert [s["shard_id"] for s in shards] == list(range(len(shards)))
    assert len({s["seed"] for s in shards}) == len(shards)


def test_stage_records_keep_config_and_timings(tmp_path):
    from ray_lt.config import load_config
    from ray_lt.stages import stage_matches

    cfg = load_config("configs/digits_lt.yaml")
    (tmp_path / STAGES_FILE).write_text(json.dumps({"classifier": {"seed": 0}}))
    assert not stage_matches(cfg, tmp_path, STAGES["classifier"])  # the first format still reads
    record_stage(cfg, tmp_path, STAGES["classifier"])
    assert stage_matches(cfg, tmp_path, STAGES["classifier"])
    with StageMeter(every=0.01) as meter:
        block = np.ones(64 * 2**20 // 8)  # 64 MB
        block.sum()
    del block
    record_timing(tmp_path, "classifier", meter.seconds, meter.peak_rss_mb)
    record_timing(tmp_path, "classifier", 1.0, 2.0)
    history = timings(tmp_path)["classifier"]
    assert len(history) == 2 and history[1]["seconds"] == 1.0
    assert history[0]["driver_peak_rss_mb"] >= 64
    assert stage_matches(cfg, tmp_path, STAGES["classifier"])


def test_round_summary_counts_times_criteria_and_guides_per_round(tmp_path):
    """rounds.csv from the plan, the manifest, the shards' criterion columns and each guide's
    history; the report shows it with its plot."""
    import pyarrow.parquet as pq

    from ray_lt.config import load_config
    from ray_lt.generate.rounds import round_guide, shards_up_to, write_round_summary
    from ray_lt.generate.synthetic import shard_file
    from ray_lt.report import rounds_blocks, to_markdown

    out = tmp_path / "synthetic"
    out.mkdir()
    shards = [{"shard_id": 0, "label": 0, "group": -1, "n": 2, "seed": 1, "round": 1},
              {"shard_id": 1, "label": 1, "group": -1, "n": 1, "seed": 2, "round": 1},
              {"shard_id": 2, "label": 0, "group": -1, "n": 3, "seed": 3, "round": 2}]
    (out / "plan.json").write_text(json.dumps(shards))
    (out / "manifest.jsonl").write_text("".join(
        json.dumps({"shard_id": i, "seconds": s}) + "\n" for i, s in ((0, 1.5), (1, 2.0), (2, 4.0)))
        + '{"shard_id": 2, "secon')  # a line cut short by a killed driver is skipped
    values = {0: ([0.5, 1.5], [1.0, 2.0]), 1: ([1.0], [3.0]), 2: ([2.0, 2.0, 5.0], [4.0, 4.0, 7.0])}
    for i, (before, after) in values.items():
        pq.write_table(pa.table({"criterion_before": before, "criterion_after": after}),
                       shard_file(out, i))
    for index, acc in ((1, 0.5), (2, 0.75)):
        folder = round_guide(tmp_path, index)
        folder.mkdir(parents=True)
        pd.DataFrame({"epoch": [0, 1], "val_acc": [0.1, acc], "val_few": [0.0, acc / 2]}
                     ).to_csv(folder / "history.csv", index=False)
    assert shards_up_to(tmp_path, 1) == [0, 1] and shards_up_to(tmp_path, 2) == [0, 1, 2]
    table = write_round_summary(tmp_path, 2)
    assert table["samples"].tolist() == [3, 3] and table["shards"].tolist() == [2, 1]
    assert table["sampler_seconds"].tolist() == [3.5, 4.0]
    np.testing.assert_allclose(table["criterion_before"], [1.0, 3.0])
    np.testing.assert_allclose(table["criterion_after"], [2.0, 5.0])
    assert table["val_acc"].tolist() == [0.5, 0.75] and table["val_few"].tolist() == [0.25, 0.375]
    assert table["guide"].tolist() == ["classifier", "rounds/round1/classifier"]
    assert (tmp_path / "rounds" / "rounds.png").stat().st_size > 10_000
    cfg = load_config("configs/digits_lt.yaml", ["rounds.count=2"])
    text = to_markdown(rounds_blocks(cfg, tmp_path))
    assert "## Rounds" in text and "rounds/round1/classifier" in text
    assert "![guide and samples per round](rounds/rounds.png)" in text
    assert rounds_blocks(load_config("configs/digits_lt.yaml"), tmp_path) == []
    with pytest.raises(ValueError, match="rounds are numbered from 1"):
        round_guide(tmp_path, 0)


def test_a_rerun_with_other_fine_tune_settings_is_refused_mid_rounds(tmp_path):
    """The synthesis stage's record is written when every round is done; until then the
    fine-tune records of the rounds begun refuse other epochs or learning rate."""
    from ray_lt.config import load_config
    from ray_lt.generate.rounds import (
        FINE_TUNE_FILE,
        check_fine_tunes,
        fine_tune_settings,
        record_fine_tune,
        round_dir,
    )

    base = load_config("configs/digits_lt.yaml", ["rounds.count=3", "rounds.epochs=5",
                                                  "train.lr=0.01"])
    settings = fine_tune_settings(base)  # rounds.lr null: train.lr
    check_fine_tunes(tmp_path, 3, settings)  # nothing begun: nothing to refuse
    record_fine_tune(tmp_path, 1, settings)
    assert json.loads((round_dir(tmp_path, 1) / FINE_TUNE_FILE).read_text()) == {
        "rounds.epochs": 5, "rounds.lr": 0.01}
    same = load_config("configs/digits_lt.yaml", ["rounds.count=3", "rounds.epochs=5",
                                                  "rounds.lr=0.01", "train.lr=0.2"])
    check_fine_tunes(tmp_path, 3, fine_tune_settings(same))
    other = load_config("configs/digits_lt.yaml", ["rounds.count=3", "rounds.epochs=3",
                                                   "train.lr=0.02"])
    with pytest.raises(ConfigError, match=r"after round 1 was fine-tuned with other settings: "
                                          r"rounds.epochs: 5 -> 3; rounds.lr: 0.01 -> 0.02"):
        check_fine_tunes(tmp_path, 3, fine_tune_settings(other))
    # a round not yet begun does not bind: only round 1's record is read
    check_fine_tunes(tmp_path, 1, fine_tune_settings(other))


def test_saturated_pixels_are_counted_per_sample_and_per_shard(tmp_path):
    from ray_lt.generate.actor import saturated_fraction
    from ray_lt.generate.writer import write_shards

    pixels = np.full((2, 4, 4, 1), 128, np.uint8)
    pixels[0, :2] = 255  # half of the first image is white
    pixels[1, 0, 0] = 0  # one value of sixteen is black
    saturated = saturated_fraction(pixels)
    assert saturated.tolist() == [0.5, 1 / 16]
    table = pa.table({"pixels": pa.array([p.tobytes() for p in pixels], type=pa.binary()),
                      "saturated": saturated, "label": [3, 3]}).replace_schema_metadata(
        {"shape": "4,4,1"})
    rows = write_shards(pd.DataFrame([{"shard_id": 7, "payload": to_ipc(table),
                                       "seconds": 0.1}]), str(tmp_path))
    assert rows["saturated"].iloc[0] == pytest.approx((0.5 + 1 / 16) / 2)
    assert pd.read_parquet(tmp_path / "shard_000007.parquet")["saturated"].tolist() == \
        pytest.approx([0.5, 1 / 16])
