"""Generative data mining (LTG, docs/method.md §7): what the guide's hardest samples of a class
have that its easiest lack, in words, turned into the next round's prompts.

After a round, for each mined class the ``mining.k`` samples the guide scored highest (its
criterion on the final sample, as a z-score within the class and criterion so that a mixture
of criteria ranks on one scale) form the *hard* set and the ``k`` lowest the *easy* set. A
local vision-language model describes every image of both sets (a Ray Data actor pool, a fixed
prompt, greedy decoding: the same images give the same text). The words and word pairs that
mark the hard descriptions against the easy ones are scored with a smoothed log-odds ratio
(``keyword_scores``): the class's gap in words, each with its score. ``mining.prompts`` prompts
per class, "a photo of a {class_name} that ...", are then written from the keywords, by a
local instruct language model (``mining.llm``) or by templates, into
``mining/round<r>/prompts.jsonl``, the per-class prompt file the next round samples with.

Everything a round's mining writes lies in ``mining/round<r>/``: ``sets.csv`` (the chosen
samples), ``descriptions.jsonl``, ``keywords.csv``, ``prompts.jsonl``, ``hard_easy.png`` and
``mining.json`` (settings and seconds). Nothing here loads a model at import time, and the
scoring and templates need neither Ray nor torch.
"""

from __future__ import annotations

import io
import json
import logging
import math
import re
import time
from collections import Counter
from collections.abc import Iterable
from itertools import combinations
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from ray_lt.atomic import write_text_atomic
from ray_lt.errors import ConfigError
from ray_lt.generate.plan import PLAN_FILE
from ray_lt.generate.synthetic import SYNTHETIC_DIR, shard_file

if TYPE_CHECKING:
    from ray_lt.config import Config

MINING_DIR = "mining"
SETS_FILE = "sets.csv"
DESCRIPTIONS_FILE = "descriptions.jsonl"
KEYWORDS_FILE = "keywords.csv"
PROMPTS_FILE = "prompts.jsonl"
FIGURE_FILE = "hard_easy.png"
RECORD_FILE = "mining.json"
NEXT_PROMPTS_FILE = "next_round_prompts.jsonl"
log = logging.getLogger(__name__)
PROMPT_START = "a photo of a {class_name} that"

# Words that say nothing about an image's content; never keywords, and no word pair holds one.
STOPWORDS = frozenset("""
a about above after again against all also am an and any are as at be because been before
being below between both but by can could did do does doing down during each few for from
further had has have having he her here hers herself him himself his how i if in into is it
its itself just let me more most my myself no nor not now of off on once only or other our
ours ourselves out over own same she should so some such than that the their theirs them
themselves then there these they this those through to too under until up very was we were
what when where which while who whom why will with would you your yours yourself yourselves
image picture photo photograph shows showing shown depicts depicting appears appear seems
seem there's it's can see seen visible features featuring one two three
""".split())
_WORD = re.compile(r"[^\W\d_]+(?:['-][^\W\d_]+)*")


def mining_dir(run_dir: Path, index: int) -> Path:
    """Where the mining after round ``index`` writes."""
    return Path(run_dir) / MINING_DIR / f"round{index}"


def mined(run_dir: Path, index: int) -> bool:
    """The mining after round ``index`` is complete (its prompts file is written last)."""
    return (mining_dir(run_dir, index) / PROMPTS_FILE).is_file()


# -- checks, before Ray starts -----------------------------------------------------------------

def _model_type(folder: Path, key: str) -> str:
    config = folder / "config.json"
    if not folder.is_dir():
        raise ConfigError(f"{key}: model folder {folder} does not exist (models are read from "
                          f"local folders, never downloaded)")
    if not config.is_file():
        raise ConfigError(f"{key}: {folder} holds no config.json; give the folder a "
                          f"transformers model was saved to (save_pretrained)")
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{key}: {config} is not a JSON model config ({err})") from None
    return str(model_type)


def check_models(cfg: Config, key: str = "mining.enabled") -> None:
    """What mining needs, named before Ray starts: a generator kind that takes prompts, and
    ``mining.vlm`` (and ``mining.llm``) folders whose config is of a model class that
    ``AutoModelForImageTextToText`` (``AutoModelForCausalLM``) loads, with a processor
    (tokenizer) that has a chat template. Reads configs and tokenizers, no weights."""
    from ray_lt.config import GENERATOR_SECTIONS, PretrainedSection

    if not isinstance(cfg.generator, PretrainedSection):
        kinds = [k for k, c in GENERATOR_SECTIONS.items() if issubclass(c, PretrainedSection)]
        raise ConfigError(f"{key}: mining writes prompts, and generator.kind "
                          f"{cfg.generator.kind!r} takes none; mine a run of a kind that takes "
                          f"prompts ({', '.join(kinds)})")
    m = cfg.mining
    if m.vlm is None:
        raise ConfigError("mining.vlm: set the local folder of a vision-language model "
                          "(AutoModelForImageTextToText), e.g. a LLaVA-1.6 or Qwen2-VL")
    from transformers import AutoProcessor, AutoTokenizer
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    for field, path, mapping, what, loader in (
            ("mining.vlm", m.vlm, MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
             "AutoModelForImageTextToText (a vision-language model)", AutoProcessor),
            ("mining.llm", m.llm, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
             "AutoModelForCausalLM (a language model)", AutoTokenizer)):
        if path is None:
            continue
        folder = Path(path).expanduser()
        model_type = _model_type(folder, field)
        if model_type not in mapping:
            raise ConfigError(f"{field}: {folder} holds a {model_type!r} model, which "
                              f"{what} does not load")
        try:
            reader = loader.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, TypeError) as err:
            raise ConfigError(f"{field}: {folder}: its {loader.__name__[4:].lower()} does not "
                              f"load: {str(err).splitlines()[0]}") from None
        if not getattr(reader, "chat_template", None):
            raise ConfigError(f"{field}: {folder}: its {loader.__name__[4:].lower()} has no "
                              f"chat template, so the model cannot be prompted as a chat")


# -- 1. the two sets ---------------------------------------------------------------------------

def round_shards(run_dir: Path, index: int) -> list[Path]:
    """The shard files of round ``index`` (every shard when the plan has no rounds)."""
    out = Path(run_dir) / SYNTHETIC_DIR
    plan = json.loads((out / PLAN_FILE).read_text())
    return [shard_file(out, sh["shard_id"]) for sh in plan
            if sh.get("round", 1) == index and shard_file(out, sh["shard_id"]).is_file()]


def mined_labels(cfg: Config, class_counts: np.ndarray, class_names: list[str]) -> list[int]:
    """The classes ``mining.classes`` names: ``few`` (fewer training images than
    evaluate.few_threshold), ``all``, or a list of names or indices."""
    chosen = cfg.mining.classes
    if chosen == "all":
        return list(range(len(class_counts)))
    if chosen == "few":
        return [c for c, n in enumerate(class_counts) if n < cfg.evaluate.few_threshold]
    by_name = {name: i for i, name in enumerate(class_names)}
    labels = []
    for item in chosen:
        label = item if isinstance(item, int) else by_name.get(item)
        if label is None or not 0 <= label < len(class_names):
            raise ConfigError(f"mining.classes: {item!r} is not a class of the data set "
                              f"({len(class_names)} classes, e.g. {class_names[0]!r})")
        labels.append(label)
    return sorted(set(labels))


_COLUMNS = ["label", "group", "criterion", "criterion_after", "seed", "shard_id"]


def pick_sets(shards: Iterable[Path], labels: list[int], k: int) -> pd.DataFrame:
    """The hard and easy sets of each of ``labels`` from the rows of ``shards``, read in two
    streamed passes (per-shard columns only: nothing the size of the round is gathered).

    A row's score is its ``criterion_after`` as a z-score within its (class, criterion), so
    that samples guided by different criteria of a mixture rank together. With n rows a class
    gets min(k, n // 2) of each, the highest scores hard and the lowest easy (ties by seed);
    a class with fewer than 2 rows gets none. Returns the rows (``_COLUMNS``, ``z``, ``set``
    and ``rank`` within the set, 0 the most extreme), hard before easy per class."""
    shards, wanted = list(shards), set(labels)
    moments: dict[tuple[int, str], list[float]] = {}
    for path in shards:
        frame = pq.read_table(path, columns=["label", "criterion", "criterion_after"]).to_pandas()
        frame = frame[frame["label"].isin(wanted) & np.isfinite(frame["criterion_after"])]
        for key, values in frame.groupby(["label", "criterion"])["criterion_after"]:
            m = moments.setdefault((int(key[0]), str(key[1])), [0.0, 0.0, 0.0])
            v = values.to_numpy(np.float64)
            m[0] += len(v)
            m[1] += v.sum()
            m[2] += (v * v).sum()
    stats = {}
    for key, (n, s, ss) in moments.items():
        mean = s / n
        sd = math.sqrt(max(ss / n - mean * mean, 0.0))
        stats[key] = (mean, sd if sd > 1e-12 else 1.0)
    counts = Counter()
    for (label, _), m in moments.items():
        counts[label] += int(m[0])
    kept = pd.DataFrame(columns=[*_COLUMNS, "z"])
    for path in shards:
        frame = pq.read_table(path, columns=_COLUMNS).to_pandas()
        frame = frame[frame["label"].isin(wanted) & np.isfinite(frame["criterion_after"])]
        if frame.empty:
            continue
        mean_sd = np.array([stats[(int(a), str(b))] for a, b in
                            zip(frame["label"], frame["criterion"], strict=True)])
        frame = frame.assign(z=(frame["criterion_after"] - mean_sd[:, 0]) / mean_sd[:, 1])
        both = pd.concat([kept, frame], ignore_index=True) if len(kept) else frame
        kept = pd.concat([_extreme(both, k, hard=True), _extreme(both, k, hard=False)]) \
            .drop_duplicates(subset=["seed", "shard_id"])
    parts = []
    for label in sorted(wanted):
        m = min(k, counts[label] // 2)
        if m == 0:
            continue
        rows = kept[kept["label"] == label]
        hard, easy = _extreme(rows, m, hard=True), _extreme(rows, m, hard=False)
        parts += [hard.assign(set="hard", rank=range(m)), easy.assign(set="easy", rank=range(m))]
    if not parts:
        return pd.DataFrame(columns=[*_COLUMNS, "z", "set", "rank"])
    out = pd.concat(parts, ignore_index=True)
    return out.astype({"label": int, "group": int, "seed": int, "shard_id": int,
                       "rank": int, "z": float, "criterion_after": float})


def _extreme(rows: pd.DataFrame, k: int, hard: bool) -> pd.DataFrame:
    """Per class the ``k`` rows of highest z (``hard``) or lowest, ties by seed; the easy
    order is the hard one reversed, so that the two sets of n >= 2k rows never share one."""
    order = rows.sort_values(["label", "z", "seed"], ascending=[True, not hard, hard])
    return order.groupby("label", sort=False).head(k)


def read_images(run_dir: Path, sets: pd.DataFrame) -> list[bytes]:
    """The PNG bytes of each row of ``sets``, in its order (only their shards are read)."""
    out = Path(run_dir) / SYNTHETIC_DIR
    found: dict[tuple[int, int], bytes] = {}
    for shard_id, seeds in sets.groupby("shard_id")["seed"]:
        table = pq.read_table(shard_file(out, int(shard_id)), columns=["seed", "image"])
        wanted = set(seeds.astype(int))
        for seed, image in zip(table.column("seed").to_pylist(), table.column("image").to_pylist(),
                               strict=True):
            if seed in wanted:
                found[(int(shard_id), int(seed))] = image
    return [found[(int(s), int(d))] for s, d in zip(sets["shard_id"], sets["seed"], strict=True)]


# -- 2. describe -------------------------------------------------------------------------------

def _device(use_gpu: bool) -> Any:
    import torch

    return torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")


class Describer:
    """A Ray Data actor: a local vision-language model (``AutoProcessor`` +
    ``AutoModelForImageTextToText``, loaded once, offline) that describes each image of a
    chunk with ``prompt`` by greedy decoding. One call describes one chunk (its rows are one
    batch of the model), so the batches, and with them the text, do not depend on how Ray
    Data bundles rows."""

    def __init__(self, path: str, prompt: str, max_new_tokens: int, use_gpu: bool):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.device = _device(use_gpu)
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.processor = AutoProcessor.from_pretrained(path, local_files_only=True)
        tokenizer = getattr(self.processor, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.padding_side = "left"  # generation continues every row at its end
        self.model = AutoModelForImageTextToText.from_pretrained(
            path, local_files_only=True, dtype=dtype).to(self.device).eval()
        messages = [{"role": "user", "content": [{"type": "image"},
                                                 {"type": "text", "text": prompt}]}]
        self.text = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        self.max_new_tokens = max_new_tokens

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch
        from PIL import Image

        rows, texts = [], []
        for chunk_rows, chunk_images in zip(batch["rows"], batch["images"], strict=True):
            images = [Image.open(io.BytesIO(b)).convert("RGB") for b in chunk_images]
            inputs = self.processor(images=images, text=[self.text] * len(images),
                                    return_tensors="pt", padding=True)
            # pixel values in the model's precision (bf16 on a GPU); token ids stay integers
            inputs = inputs.to(self.device, dtype=self.model.dtype)
            with torch.inference_mode():
                out = self.model.generate(**inputs, do_sample=False, num_beams=1,
                                          max_new_tokens=self.max_new_tokens)
            new = out[:, inputs["input_ids"].shape[1]:]
            rows += list(chunk_rows)
            texts += [t.strip() for t in self.processor.batch_decode(
                new, skip_special_tokens=True)]
        return {"row": np.asarray(rows, dtype=np.int64), "text": np.asarray(texts, dtype=object)}


def _chunks(images: list[bytes], size: int) -> list[dict[str, Any]]:
    """``images`` cut into chunks of ``size`` in order, one Ray Data row per chunk."""
    return [{"rows": list(range(start, min(start + size, len(images)))),
             "images": images[start:start + size]} for start in range(0, len(images), size)]


def describe(images: list[bytes], cfg: Config) -> list[str]:
    """One description per image, in order, by ``mining.vlm`` on the mining actor pool."""
    import ray.data

    m = cfg.mining
    if not images:
        return []
    chunks = _chunks(images, m.batch_size)
    pool = m.pool
    dataset = ray.data.from_items(chunks, override_num_blocks=min(len(chunks), 4 * pool.size))
    args = {**pool.map_batches_args(), "batch_size": 1}
    described = dataset.map_batches(
        Describer, fn_constructor_kwargs={"path": str(m.vlm), "prompt": m.describe_prompt,
                                          "max_new_tokens": m.max_new_tokens,
                                          "use_gpu": pool.use_gpu},
        batch_format="numpy", **args).to_pandas()
    described = described.sort_values("row")
    if described["row"].tolist() != list(range(len(images))):
        raise RuntimeError(f"mining: {len(described)} descriptions came back for "
                           f"{len(images)} images")
    return described["text"].tolist()


# -- 3. explain --------------------------------------------------------------------------------

def terms(text: str, exclude: Iterable[str] = ()) -> set[str]:
    """The words and adjacent word pairs of ``text`` (lower case), without stopwords, the
    ``exclude`` words (the class's own name) and anything they touch: what one description
    says, once each."""
    skip = STOPWORDS | {w.lower() for w in exclude}
    words = _WORD.findall(text.lower())
    out = {w for w in words if w not in skip and len(w) > 1}
    out |= {f"{a} {b}" for a, b in zip(words, words[1:], strict=False)
            if a not in skip and b not in skip and len(a) > 1 and len(b) > 1}
    return out


def keyword_scores(hard: list[str], easy: list[str], exclude: Iterable[str] = (),
                   prior: float = 0.5, min_count: int = 2) -> pd.DataFrame:
    """The terms that mark the ``hard`` descriptions against the ``easy`` ones.

    For a term in y_h of the n_h hard and y_e of the n_e easy descriptions, the log-odds
    ratio of appearing, each count smoothed by ``prior``,
    ``delta = log((y_h + a) / (n_h - y_h + a)) - log((y_e + a) / (n_e - y_e + a))``, divided
    by its standard error ``sqrt(sum of 1 / each smoothed count)``: a z-score that a term
    seen in many descriptions earns more than one seen once. Terms in at least ``min_count``
    hard descriptions with a positive score are kept, highest first (on a tie a pair before
    a word, which it says more precisely, then by term). Columns:
    ``term``, ``score``, ``hard``, ``easy`` (how many descriptions of each set hold it)."""
    exclude = list(exclude)
    hard_terms = [terms(t, exclude) for t in hard]
    easy_terms = [terms(t, exclude) for t in easy]
    y_h = Counter(t for s in hard_terms for t in s)
    y_e = Counter(t for s in easy_terms for t in s)
    n_h, n_e, a = len(hard), len(easy), prior
    rows = []
    for term, yh in y_h.items():
        if yh < min_count:
            continue
        ye = y_e.get(term, 0)
        counts = (yh + a, n_h - yh + a, ye + a, n_e - ye + a)
        delta = math.log(counts[0] / counts[1]) - math.log(counts[2] / counts[3])
        score = delta / math.sqrt(sum(1.0 / c for c in counts))
        if score > 0:
            rows.append((term, round(score, 4), yh, ye))
    table = pd.DataFrame(rows, columns=["term", "score", "hard", "easy"])
    words = table["term"].str.count(" ") + 1
    return table.assign(words=words).sort_values(
        ["score", "words", "term"], ascending=[False, False, True],
        ignore_index=True).drop(columns="words")


def top_keywords(table: pd.DataFrame, count: int) -> list[str]:
    """The ``count`` best terms of ``keyword_scores``, leaving out a word already said by a
    better pair that holds it and a pair whose words both came before ("dark" after "dark
    background" adds nothing)."""
    chosen: list[str] = []
    for term in table["term"]:
        words = set(term.split())
        said = {w for c in chosen for w in c.split()}
        if words <= said:
            continue
        chosen.append(term)
        if len(chosen) == count:
            break
    return chosen


# -- 4. address --------------------------------------------------------------------------------

_PHRASES = ("shows {}", "has {}", "is seen with {}")


def _escape(text: str) -> str:
    """``text`` as literal template text (the prompt file's templates are ``str.format``
    patterns)."""
    return text.replace("{", "{{").replace("}", "}}")


def _keyword_groups(keywords: list[str]) -> list[tuple[str, ...]]:
    """Keywords alone, then in pairs, then in threes, best first."""
    return [g for size in (1, 2, 3) for g in combinations(keywords, size)]


def template_prompts(keywords: list[str], count: int) -> list[str]:
    """``count`` distinct prompt templates "a photo of a {class_name} that ..." over the
    keywords (alone, then paired, then in threes, in score order, each with three phrasings
    in turn); none when there are no keywords."""
    groups = _keyword_groups(keywords)
    out: list[str] = []
    for i, group in enumerate(groups * len(_PHRASES)):
        said = group[0] if len(group) == 1 else ", ".join(group[:-1]) + " and " + group[-1]
        phrase = _PHRASES[(i + i // len(groups)) % len(_PHRASES)]
        prompt = f"{PROMPT_START} {phrase.format(_escape(said))}"
        if prompt not in out:
            out.append(prompt)
        if len(out) == count:
            break
    return out


def llm_requests(class_name: str, keywords: list[str], descriptions: list[str],
                 count: int) -> list[str]:
    """The instructions of the ``count`` prompts of a class (LTG's wording): each gives one
    of the hard set's descriptions (in turn) and a group of the keywords (in turn), and asks
    for one sentence that starts "A photo of <class> that"."""
    groups = _keyword_groups(keywords) or [()]
    texts = descriptions or [""]
    out = []
    for p in range(count):
        said = ", ".join(groups[p % len(groups)])
        out.append(f"{texts[p % len(texts)]}\nThe following keywords describe the key features "
                   f"of the description above: {said}. Use a complete sentence to summarize the "
                   f"key features. The sentence should start with: A photo of {class_name} "
                   f"that")
    return out


def as_template(text: str, class_name: str) -> str:
    """A language model's continuation of "A photo of <class> that" as a prompt template:
    its first line, cut at the first sentence end, braces escaped."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    line = re.split(r"(?<=[.!?])\s", line, maxsplit=1)[0].strip().rstrip(".")
    line = re.sub(rf"^(a photo of (an? )?{re.escape(class_name.lower())} that)\s*", "",
                  line, flags=re.IGNORECASE)
    return f"{PROMPT_START} {_escape(line)}".rstrip() if line else ""


class PromptWriter:
    """A Ray Data actor: a local instruct language model (``AutoTokenizer`` +
    ``AutoModelForCausalLM``, loaded once, offline) that answers each instruction with the
    reply started as "A photo of <class> that", by greedy decoding, one instruction at a
    time (no padding: the text depends on the instruction only)."""

    def __init__(self, path: str, max_new_tokens: int, use_gpu: bool):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = _device(use_gpu)
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModelForCausalLM.from_pretrained(
            path, local_files_only=True, dtype=dtype).to(self.device).eval()
        self.max_new_tokens = max_new_tokens

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        texts = []
        for request, start in zip(batch["request"], batch["start"], strict=True):
            chat = [{"role": "user", "content": str(request)}]
            prompt = self.tokenizer.apply_chat_template(chat, tokenize=False,
                                                        add_generation_prompt=True)
            ids = self.tokenizer(prompt + str(start), return_tensors="pt",
                                 add_special_tokens=False).to(self.device)
            with torch.inference_mode():
                out = self.model.generate(**ids, do_sample=False, num_beams=1,
                                          max_new_tokens=self.max_new_tokens,
                                          pad_token_id=self.tokenizer.pad_token_id
                                          or self.tokenizer.eos_token_id)
            texts.append(self.tokenizer.decode(out[0, ids["input_ids"].shape[1]:],
                                               skip_special_tokens=True))
        return {"index": batch["index"], "text": np.asarray(texts, dtype=object)}


def llm_prompts(requests: list[dict[str, Any]], cfg: Config) -> list[str]:
    """The language model's reply to each request (``request``, ``start``), in order, on the
    mining actor pool."""
    import ray.data

    m = cfg.mining
    if not requests:
        return []
    items = [{"index": i, **r} for i, r in enumerate(requests)]
    pool = m.pool
    dataset = ray.data.from_items(items, override_num_blocks=min(len(items), 4 * pool.size))
    replies = dataset.map_batches(
        PromptWriter, fn_constructor_kwargs={"path": str(m.llm),
                                             "max_new_tokens": m.max_new_tokens,
                                             "use_gpu": pool.use_gpu},
        batch_format="numpy", **pool.map_batches_args()).to_pandas().sort_values("index")
    return replies["text"].tolist()


# -- the step ----------------------------------------------------------------------------------

def write_prompts_file(path: Path, entries: list[dict[str, Any]]) -> Path:
    """``entries`` as JSON lines (written whole or not at all)."""
    write_text_atomic(path, "".join(json.dumps(e) + "\n" for e in entries))
    return path


def mine(cfg: Config, class_names: list[str], class_counts: np.ndarray, run_dir: Path,
         index: int, context_names: list[str] | None = None) -> Path:
    """The mining after round ``index`` into ``mining/round<index>/``; returns its prompts
    file. With ``context_names`` (a data set of class x context groups) every prompt ends in
    ", {context}", so that each group's samples are still prompted with their context."""
    m, started = cfg.mining, time.perf_counter()
    folder = mining_dir(run_dir, index)
    folder.mkdir(parents=True, exist_ok=True)
    labels = mined_labels(cfg, class_counts, class_names)
    sets = pick_sets(round_shards(run_dir, index), labels, m.k)
    sets.to_csv(folder / SETS_FILE, index=False)
    images = read_images(run_dir, sets)
    described = time.perf_counter()
    texts = describe(images, cfg)
    describe_seconds = time.perf_counter() - described
    sets = sets.assign(description=texts)
    write_text_atomic(folder / DESCRIPTIONS_FILE, "".join(
        json.dumps({"class": class_names[int(r.label)], "label": int(r.label), "set": r.set,
                    "rank": int(r.rank), "seed": int(r.seed), "shard_id": int(r.shard_id),
                    "criterion": r.criterion, "criterion_after": float(r.criterion_after),
                    "text": r.description}) + "\n" for r in sets.itertuples()))

    keyword_tables, chosen = [], {}
    for label, rows in sets.groupby("label", sort=True):
        name = class_names[int(label)]
        table = keyword_scores(rows.loc[rows["set"] == "hard", "description"].tolist(),
                               rows.loc[rows["set"] == "easy", "description"].tolist(),
                               exclude=_WORD.findall(name), prior=m.prior,
                               min_count=m.min_count)
        keyword_tables.append(table.assign(label=int(label), **{"class": name}))
        chosen[int(label)] = top_keywords(table, m.keywords)
    keywords = (pd.concat(keyword_tables, ignore_index=True) if keyword_tables
                else pd.DataFrame(columns=["term", "score", "hard", "easy", "label", "class"]))
    keywords.to_csv(folder / KEYWORDS_FILE, index=False)

    prompts: dict[int, list[str]] = {}
    if m.llm is not None:
        requests = []
        for label, words in chosen.items():
            name = class_names[label]
            hard = sets[(sets["label"] == label) & (sets["set"] == "hard")]["description"]
            for text in llm_requests(name, words, hard.tolist(), m.prompts):
                requests.append({"label": label, "request": text,
                                 "start": f"A photo of {name} that"})
        replies = llm_prompts(requests, cfg)
        for r, reply in zip(requests, replies, strict=True):
            template = as_template(f"A photo of {class_names[r['label']]} that {reply}",
                                   class_names[r["label"]])
            if template and template != PROMPT_START and \
                    template not in prompts.setdefault(r["label"], []):
                prompts[r["label"]].append(template)
    written = {label: len(prompts.get(label, [])) for label in chosen}
    for label, words in chosen.items():  # what the language model left short, by templates
        have = prompts.setdefault(label, [])
        have += [t for t in template_prompts(words, m.prompts) if t not in have][
            :m.prompts - len(have)]

    if context_names:
        prompts = {label: [f"{p}, {{context}}" for p in texts] for label, texts in prompts.items()}
    entries = []
    for label, words in chosen.items():
        if not prompts.get(label):
            continue
        scores = keywords[keywords["label"] == label].set_index("term")["score"]
        rows = sets[sets["label"] == label]
        entries.append({"class": class_names[label], "prompts": prompts[label],
                        "keywords": [[w, float(scores[w])] for w in words],
                        "hard": rows.loc[rows["set"] == "hard", "seed"].astype(int).tolist(),
                        "easy": rows.loc[rows["set"] == "easy", "seed"].astype(int).tolist()})
    plot_sets(sets, images, class_names, folder / FIGURE_FILE)
    seconds = time.perf_counter() - started
    record = {"round": index, "classes": [class_names[lb] for lb in labels],
              "mined": [e["class"] for e in entries], "images": len(images),
              "vlm": str(m.vlm), "llm": str(m.llm) if m.llm is not None else None,
              "prompts_by_llm": {class_names[lb]: n for lb, n in written.items()},
              "seconds": round(seconds, 2), "describe_seconds": round(describe_seconds, 2),
              "seconds_per_image": round(describe_seconds / len(images), 4) if images else None}
    write_text_atomic(folder / RECORD_FILE, json.dumps(record, indent=1))
    path = write_prompts_file(folder / PROMPTS_FILE, entries)
    left = sorted(set(labels) - {int(lb) for lb in sets["label"].unique()})
    log.info(f"mining round {index}: {len(images)} images of {len(chosen)} classes described "
             f"in {describe_seconds:.1f} s; prompts for {len(entries)} classes -> {path}"
             + (f"; {len(left)} of the classes asked for had fewer than 2 samples in the "
                f"round" if left else ""))
    return path


def read_entries(path: Path) -> list[dict[str, Any]]:
    """The entries of a mining prompts file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def next_round_prompts(cfg: Config, run_dir: Path, index: int, class_names: list[str]) -> Path:
    """The per-class prompt file round ``index + 1`` samples with: the mined prompts of round
    ``index`` over ``generator.prompts_file``'s (a class that was mined takes its mined
    prompts), written beside the mining's."""
    from ray_lt.generate.prompts import read_prompts_file

    by_label: dict[int, list[str]] = {}
    if cfg.generator.prompts_file is not None:
        by_label.update(read_prompts_file(cfg.generator.prompts_file, class_names))
    by_label.update(read_prompts_file(mining_dir(run_dir, index) / PROMPTS_FILE, class_names))
    path = mining_dir(run_dir, index) / NEXT_PROMPTS_FILE
    return write_prompts_file(path, [{"class": class_names[label], "prompts": prompts}
                                     for label, prompts in sorted(by_label.items())])


def plot_sets(sets: pd.DataFrame, images: list[bytes], class_names: list[str], path: Path,
              per_set: int = 4, max_classes: int = 12) -> Path | None:
    """Per mined class a row: its ``per_set`` hardest samples beside its ``per_set`` easiest."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    labels = sorted(sets["label"].unique())[:max_classes]
    if not labels:
        return None
    per_set = min(per_set, int(sets.groupby(["label", "set"]).size().max()))
    cols = 2 * per_set + 1
    fig, axes = plt.subplots(len(labels), cols, figsize=(cols * 0.9, len(labels) * 1.0 + 0.5),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    position = {i: n for n, i in enumerate(sets.index)}
    for row, label in enumerate(labels):
        part = sets[sets["label"] == label]
        for which, offset in (("hard", 0), ("easy", per_set + 1)):
            chosen = part[part["set"] == which].sort_values("rank").head(per_set)
            for j, i in enumerate(chosen.index):
                image = Image.open(io.BytesIO(images[position[i]])).convert("RGB")
                axes[row, offset + j].imshow(np.asarray(image))
        axes[row, 0].text(-0.15, 0.5, class_names[int(label)], transform=axes[row, 0].transAxes,
                          ha="right", va="center", fontsize=8)
    axes[0, 0].set_title("hardest", fontsize=8, loc="left")
    axes[0, per_set + 1].set_title("easiest", fontsize=8, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
