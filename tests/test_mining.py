"""Generative data mining's parts without Ray: the two sets from written shards, keyword
scores on hand-written descriptions with a known answer, template and language-model prompts,
the tiny vision-language and language models through the real loading code, the prompt file
a mining writes read back as a per-class prompt file, and the refusals."""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT
from PIL import Image

from ray_lt.config import load_config
from ray_lt.errors import ConfigError
from ray_lt.generate.mining import (
    PROMPT_START,
    Describer,
    PromptWriter,
    as_template,
    check_models,
    keyword_scores,
    next_round_prompts,
    pick_sets,
    template_prompts,
    terms,
    top_keywords,
)
from ray_lt.generate.prompts import Prompts, read_prompts_file
from ray_lt.testing import save_tiny_llm, save_tiny_vlm

HARD = ["a seven with a thick stroke on a dark background",
        "thick stroke, slanted seven, dark background",
        "a slanted seven drawn with a thick stroke",
        "a seven on a dark background, slightly blurry"]
EASY = ["a thin seven on a white background",
        "a clean thin seven, upright",
        "an upright seven with a thin stroke on white",
        "a seven drawn with a thick stroke on white"]


def test_keywords_mark_the_hard_descriptions_against_the_easy_ones():
    table = keyword_scores(HARD, EASY, exclude=["seven"])
    scores = table.set_index("term")["score"]
    # "dark background": in 3 of 4 hard, 0 of 4 easy descriptions; "thick stroke": in 3 of 4
    # hard and 1 of 4 easy; so the pair that only the hard set has scores highest.
    assert table["term"].iloc[0] in ("dark", "dark background", "background dark")
    assert scores["dark background"] > scores["thick stroke"] > 0
    assert scores["slanted"] > 0 and "thin" not in scores and "white" not in scores
    # log-odds z of "dark background": counts 3.5, 1.5 | 0.5, 4.5
    expected = (np.log(3.5 / 1.5) - np.log(0.5 / 4.5)) / np.sqrt(1 / 3.5 + 1 / 1.5 + 1 / 0.5
                                                                 + 1 / 4.5)
    assert scores["dark background"] == pytest.approx(expected, abs=1e-4)
    assert "seven" not in " ".join(table["term"])  # the class's own name is no keyword
    assert "blurry" not in scores  # in one hard description only (min_count 2)
    assert (table["score"].diff().dropna() <= 0).all()
    # a word said by a better pair is not repeated; the pair's words stay out of later pairs
    chosen = top_keywords(table, 3)
    assert chosen[0] == "dark background" and "dark" not in chosen and "background" not in \
        chosen and len(chosen) == 3
    assert keyword_scores(["a b"], ["a b"]).empty


def test_terms_drop_stopwords_and_the_class_name():
    assert terms("A photo of a Goldfish in a dark-blue bowl!", exclude=["goldfish"]) == \
        {"dark-blue", "bowl", "dark-blue bowl"}


def test_template_prompts_are_distinct_fillable_and_start_alike():
    prompts = template_prompts(["dark background", "thick stroke", "slanted"], 40)
    # 3 singles + 3 pairs + 1 triple, in three phrasings each: 21 distinct
    assert len(prompts) == len(set(prompts)) == 21
    assert all(p.startswith(PROMPT_START + " ") for p in prompts)
    assert prompts[0] == "a photo of a {class_name} that shows dark background"
    assert "a photo of a {class_name} that has dark background and thick stroke" in prompts
    filled = Prompts(["x {class_name}"], ["seven"], per_class={0: prompts}).draw(
        [0] * 50, [-1] * 50, list(range(50)))
    assert all(f.startswith("a photo of a seven that ") for f in filled)
    assert len(set(filled)) > 10
    assert template_prompts([], 40) == []
    assert template_prompts(["{odd}"], 1) == ["a photo of a {class_name} that shows {{odd}}"]


def test_a_language_model_reply_becomes_a_template():
    assert as_template("A photo of goldfish that swims near {weeds}. It is orange.",
                       "goldfish") == "a photo of a {class_name} that swims near {{weeds}}"
    assert as_template("", "goldfish") == ""


def _shard(path, label, criterion, values, seeds, shard_id):
    rows = pd.DataFrame({"label": label, "group": -1, "criterion": criterion,
                         "criterion_after": values, "seed": seeds, "shard_id": shard_id,
                         "image": [b"png"] * len(values)})
    rows.to_parquet(path)
    return path


def test_pick_sets_ranks_each_criterion_on_its_own_scale(tmp_path):
    # class 3: entropy values around 2, loss values around 100; class 5: 3 rows only.
    shards = [
        _shard(tmp_path / "a.parquet", 3, "entropy", [2.0, 2.5, 1.5, 2.1], [0, 1, 2, 3], 0),
        _shard(tmp_path / "b.parquet", 3, "loss", [100.0, 130.0, 70.0, 101.0], [4, 5, 6, 7], 1),
        _shard(tmp_path / "c.parquet", 5, "entropy", [1.0, 3.0, 2.0], [8, 9, 10], 2)]
    sets = pick_sets(shards, [3, 5], k=2)
    three = sets[sets["label"] == 3]
    # loss 130 and entropy 2.5 are each 1.5 SD... the highest z in each criterion
    assert sorted(three.loc[three["set"] == "hard", "seed"]) == [1, 5]
    assert sorted(three.loc[three["set"] == "easy", "seed"]) == [2, 6]
    assert three.loc[three["set"] == "hard", "rank"].tolist() == [0, 1]
    five = sets[sets["label"] == 5]  # 3 rows: one each, never the same
    assert five.loc[five["set"] == "hard", "seed"].tolist() == [9]
    assert five.loc[five["set"] == "easy", "seed"].tolist() == [8]
    # streamed over shards in another order, the same sets
    again = pick_sets(shards[::-1], [3, 5], k=2)
    key = ["label", "set", "rank"]
    pd.testing.assert_frame_equal(sets.sort_values(key).reset_index(drop=True)[key + ["seed"]],
                                  again.sort_values(key).reset_index(drop=True)[key + ["seed"]])
    # equal scores: the two sets still share no sample
    flat = [_shard(tmp_path / "d.parquet", 1, "entropy", [1.0] * 6, list(range(20, 26)), 3)]
    tied = pick_sets(flat, [1], k=3)
    assert not set(tied.loc[tied["set"] == "hard", "seed"]) & set(
        tied.loc[tied["set"] == "easy", "seed"])
    assert pick_sets(shards, [7], k=2).empty


def _png(seed: int) -> bytes:
    buffer = io.BytesIO()
    pixels = (np.random.default_rng(seed).random((16, 16, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    base = tmp_path_factory.mktemp("models")
    return save_tiny_vlm(base / "vlm"), save_tiny_llm(base / "llm")


def test_tiny_models_load_offline_and_answer_the_same_way_twice(tiny_models):
    vlm, llm = tiny_models
    batch = {"rows": np.array([[0, 1, 2]]), "images": [[_png(0), _png(1), _png(2)]]}
    first = Describer(str(vlm), "Describe this image in one sentence.", 12, False)(batch)
    second = Describer(str(vlm), "Describe this image in one sentence.", 12, False)(batch)
    assert first["row"].tolist() == [0, 1, 2]
    assert first["text"].tolist() == second["text"].tolist()
    assert all(isinstance(t, str) and t for t in first["text"])
    writer = PromptWriter(str(llm), 8, False)
    request = {"index": np.array([0]), "request": np.array(["thick stroke"], dtype=object),
               "start": np.array(["A photo of seven that"], dtype=object)}
    assert writer(request)["text"].tolist() == writer(request)["text"].tolist()


def _mining_config(tmp_path, tiny_models, *extra):
    vlm, llm = tiny_models
    return load_config(ROOT / "configs" / "imagenet_lt_sd.yaml", [
        f"dataset.root={tmp_path}", "generator.pretrained=/nowhere", "mining.enabled=true",
        f"mining.vlm={vlm}", f"mining.llm={llm}", *extra])


def test_mining_refuses_generators_without_prompts_and_bad_model_folders(tmp_path,
                                                                         tiny_models):
    vlm, llm = tiny_models
    with pytest.raises(ConfigError, match=r"mining.enabled: .* generator.kind 'pixel' takes "
                                          r"none; use a kind that takes prompts \(unclip, sd, "
                                          r"sdxl\)"):
        load_config(ROOT / "configs" / "digits_lt.yaml", ["mining.enabled=true",
                                                          "rounds.count=2"])
    with pytest.raises(ConfigError, match="mining runs between rounds, and rounds.count is 1"):
        _mining_config(tmp_path, tiny_models, "rounds.count=1")
    with pytest.raises(ConfigError, match="mining.vlm: mining.enabled needs"):
        _mining_config(tmp_path, tiny_models, "mining.vlm=null")
    cfg = _mining_config(tmp_path, tiny_models)
    check_models(cfg)  # the tiny models pass
    for key, value, message in (
            ("mining.vlm", tmp_path / "none", "model folder .*none does not exist"),
            ("mining.vlm", tmp_path, "holds no config.json"),
            ("mining.vlm", llm, r"holds a 'llama' model, which AutoModelForImageTextToText "
                                r"\(a vision-language model\) does not load"),
            ("mining.llm", vlm, r"holds a 'llava' model, which AutoModelForCausalLM \(a "
                                r"language model\) does not load")):
        with pytest.raises(ConfigError, match=f"{key}: .*{message}"):
            check_models(_mining_config(tmp_path, tiny_models, f"{key}={value}"))
    bare = tmp_path / "bare"
    save_tiny_llm(bare)
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(ConfigError, match="mining.llm: .*bare: its tokenizer has no chat "
                                          "template"):
        check_models(_mining_config(tmp_path, tiny_models, f"mining.llm={bare}"))
    from ray_lt.tune.search import search_space

    with pytest.raises(ConfigError, match=r"tune.space.rounds: \[1, 3\] holds 1 round, and "
                                          r"mining.enabled mines between rounds"):
        search_space(_mining_config(tmp_path, tiny_models, "rounds.count=3",
                                    "tune.space.rounds=[3, 1]"))
    digits = load_config(ROOT / "configs" / "digits_lt.yaml")
    with pytest.raises(ConfigError, match="generator.kind: mining writes prompts, and "
                                          "generator.kind 'pixel' takes none"):
        check_models(digits, key="generator.kind")


def test_a_mined_prompt_file_is_a_prompt_file_and_overrides_the_users(tmp_path, tiny_models):
    folder = tmp_path / "run" / "mining" / "round1"
    folder.mkdir(parents=True)
    mined = {"class": "seven", "prompts": template_prompts(["thick stroke"], 3),
             "keywords": [["thick stroke", 1.7]], "hard": [1, 2], "easy": [3, 4]}
    (folder / "prompts.jsonl").write_text(json.dumps(mined) + "\n")
    assert read_prompts_file(folder / "prompts.jsonl", ["six", "seven"]) == \
        {1: mined["prompts"]}
    users = tmp_path / "users.jsonl"
    users.write_text(json.dumps({"class": "six", "prompts": ["a six"]}) + "\n"
                     + json.dumps({"class": 1, "prompts": ["a seven"]}) + "\n")
    cfg = _mining_config(tmp_path, tiny_models, "rounds.count=2",
                         f"generator.prompts_file={users}")
    merged = read_prompts_file(next_round_prompts(cfg, tmp_path / "run", 1, ["six", "seven"]),
                               ["six", "seven"])
    assert merged == {0: ["a six"], 1: mined["prompts"]}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({**mined, "notes": "x"}) + "\n")
    with pytest.raises(ConfigError, match=r"bad.jsonl:1: expected .* \(a mined file may add "
                                          r"keywords, hard, easy\)"):
        read_prompts_file(bad, ["six", "seven"])
