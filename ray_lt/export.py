"""``ray-lt export``: a run's synthetic set (and the real training set, for a balanced copy)
written for other training code: an image folder (torchvision's ``ImageFolder``), WebDataset
tar shards (``ray.data.read_webdataset``, ``webdataset``) or Parquet.

The work is cut into units, one per synthetic shard and one per block of real rows, written
by Ray Data tasks as they stream; the driver appends each finished unit's rows to a hidden
journal beside the images (``.ray-lt-export.jsonl``: a file, so that ``ImageFolder`` sees no
extra class), so a rerun skips every unit already written and redoes only the rest. The manifest
(``manifest.csv``) lists every exported image with its label, class name, group, origin,
criterion, guidance scale, seed and source (shard or file).
"""

from __future__ import annotations

import io
import json
import logging
import re
import tarfile
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ray_lt.atomic import write_bytes_atomic, write_text_atomic
from ray_lt.config import Config
from ray_lt.data import LongTailData
from ray_lt.errors import ConfigError
from ray_lt.generate.codec import png_bytes
from ray_lt.generate.synthetic import FILTER_FILE, SYNTHETIC_DIR, synthetic_files

log = logging.getLogger(__name__)

Format = Literal["imagefolder", "webdataset", "parquet"]
FORMATS = ("imagefolder", "webdataset", "parquet")
JOURNAL = ".ray-lt-export.jsonl"
OPTIONS = ".ray-lt-export.json"
MANIFEST = "manifest.csv"
REAL_BLOCK_ROWS = 512
MANIFEST_COLUMNS = ["file", "key", "label", "class_name", "group", "origin", "criterion",
                    "guidance_scale", "seed", "source", "filter_reason"]


def class_folders(class_names: list[str]) -> list[str]:
    """One folder name per class such that ``ImageFolder``'s sorted order is the label order:
    the class names themselves when they already sort that way and are safe file names,
    else ``<label>_<name>`` with the label zero-padded."""
    safe = [re.sub(r"[^\w.+-]+", "_", name).strip("._") or "class" for name in class_names]
    if safe == class_names and sorted(safe) == safe and len(set(safe)) == len(safe):
        return safe
    width = len(str(len(class_names) - 1))
    return [f"{label:0{width}d}_{name}" for label, name in enumerate(safe)]


def export_units(run_dir: Path, data: LongTailData | None) -> list[dict[str, Any]]:
    """The units of work: each synthetic shard file, then (with ``data``) the real training
    rows in blocks of ``REAL_BLOCK_ROWS``."""
    units: list[dict[str, Any]] = [{"unit": Path(f).stem, "kind": "synthetic", "file": f}
                                   for f in synthetic_files(run_dir)]
    if data is not None:
        table = data.tables["train"].reset_index(drop=True)
        for start in range(0, len(table), REAL_BLOCK_ROWS):
            block = table.iloc[start:start + REAL_BLOCK_ROWS]
            unit = {"unit": f"real_{start // REAL_BLOCK_ROWS:06d}", "kind": "real",
                    "start": start, "label": block["label"].tolist(),
                    "group": block["group"].tolist()}
            if data.root is not None:
                unit["path"] = block["path"].tolist()
            else:
                unit["image"] = [np.asarray(a) for a in block["image"]]
            units.append(unit)
    return units


def _dropped(run_dir: Path) -> dict[tuple[int, int], str]:
    verdicts = Path(run_dir) / SYNTHETIC_DIR / FILTER_FILE
    if not verdicts.is_file():
        return {}
    table = pd.read_parquet(verdicts).query("~keep")
    reasons = table["reason"] if "reason" in table else pd.Series(["filtered"] * len(table))
    return {(int(s), int(d)): str(r) for s, d, r in
            zip(table["shard_id"], table["seed"], reasons, strict=True)}


def _unit_rows(unit: dict[str, Any], class_names: list[str], dropped: dict[tuple[int, int], str],
               include_filtered: bool, root: str | None) -> list[dict[str, Any]]:
    """The unit's images as rows: ``key``, ``data`` (encoded bytes), ``ext`` and the manifest's
    columns."""
    rows = []
    if unit["kind"] == "synthetic":
        table = pq.read_table(unit["file"], columns=["image", "label", "group", "criterion",
                                                     "guidance_scale", "seed", "shard_id"])
        for r in table.to_pylist():
            reason = dropped.get((r["shard_id"], r["seed"]), "")
            if reason and not include_filtered:
                continue
            rows.append({"key": f"syn_{r['shard_id']:06d}_{r['seed']}", "data": r["image"],
                         "ext": "png", "label": r["label"], "group": r["group"],
                         "origin": "synthetic", "criterion": r["criterion"],
                         "guidance_scale": r["guidance_scale"], "seed": r["seed"],
                         "source": f"{SYNTHETIC_DIR}/{Path(unit['file']).name}",
                         "filter_reason": reason})
        return rows
    for i, (label, group) in enumerate(zip(unit["label"], unit["group"], strict=True)):
        index = unit["start"] + i
        if "path" in unit:
            rel = unit["path"][i]
            payload = (Path(root) / rel).read_bytes()
            ext, source = Path(rel).suffix.lstrip(".").lower() or "img", rel
        else:
            payload, ext, source = png_bytes(np.asarray(unit["image"][i])), "png", f"train[{index}]"
        rows.append({"key": f"real_{index:07d}", "data": payload, "ext": ext, "label": label,
                     "group": group, "origin": "real", "criterion": "", "guidance_scale": None,
                     "seed": None, "source": source, "filter_reason": ""})
    return rows


def write_unit(unit: dict[str, Any], to: str, fmt: str, class_names: list[str],
               folders: list[str], dropped: dict[tuple[int, int], str], include_filtered: bool,
               root: str | None) -> list[dict[str, Any]]:
    """Write one unit in ``fmt`` under ``to``; returns its manifest rows. Runs as a Ray Data
    task."""
    rows = _unit_rows(unit, class_names, dropped, include_filtered, root)
    for row in rows:
        row["class_name"] = class_names[row["label"]]
    target = Path(to)
    name = unit["unit"]
    if fmt == "imagefolder":
        for row in rows:
            rel = f"{folders[row['label']]}/{row['key']}.{row['ext']}"
            path = target / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(row["data"])
            row["file"], row["key"] = rel, rel
    elif fmt == "webdataset":
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for row in rows:
                meta = {k: row[k] for k in ("label", "class_name", "group", "origin",
                                            "criterion", "guidance_scale", "seed", "source")}
                for suffix, payload in ((row["ext"], row["data"]),
                                        ("cls", str(row["label"]).encode()),
                                        ("json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(f"{row['key']}.{suffix}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        write_bytes_atomic(target / f"{name}.tar", buffer.getvalue())
        for row in rows:
            row["file"] = f"{name}.tar"
    else:
        frame = pd.DataFrame([{k: v for k, v in row.items() if k != "ext"} for row in rows])
        frame = frame.rename(columns={"data": "image"}) if len(frame) else pd.DataFrame(
            columns=["image"])
        sink = io.BytesIO()
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), sink)
        write_bytes_atomic(target / f"{name}.parquet", sink.getvalue())
        for row in rows:
            row["file"] = f"{name}.parquet"
    return [{c: row.get(c) for c in MANIFEST_COLUMNS} for row in rows]


def _write_batch(batch: dict[str, np.ndarray], **kwargs: Any) -> dict[str, np.ndarray]:
    """Ray Data ``map_batches`` function over units."""
    units = [json.loads(u) for u in batch["unit"]]
    for unit in units:
        if "image" in unit:
            unit["image"] = [np.asarray(a, np.uint8) for a in unit["image"]]
    parts = [json.dumps(write_unit(unit, **kwargs), default=_jsonable) for unit in units]
    return {"unit": np.array([u["unit"] for u in units]), "part": np.array(parts)}


def _check_options(to: Path, options: dict[str, Any]) -> None:
    """Refuse to add to an export made with other options; record them for a new one."""
    stored = to / OPTIONS
    if stored.is_file():
        before = json.loads(stored.read_text())
        if before != options:
            changed = ", ".join(f"{k}: {before.get(k)!r} -> {v!r}" for k, v in options.items()
                                if before.get(k) != v)
            raise ConfigError(f"--to {to}: holds an export made with other options ({changed});"
                              f" choose another --to or delete {to}")
    elif to.is_dir() and any(p.name not in (OPTIONS, JOURNAL) for p in to.iterdir()):
        raise ConfigError(f"--to {to}: is not empty and holds no ray-lt export; choose an empty "
                          f"or new folder")


def export_options(run_dir: Path, fmt: str, with_real: bool, include_filtered: bool
                   ) -> dict[str, Any]:
    return {"format": fmt, "with_real": with_real, "include_filtered": include_filtered,
            "run": str(Path(run_dir).resolve())}


def check_export(run_dir: Path, to: Path, fmt: str, with_real: bool, include_filtered: bool
                 ) -> None:
    """Refuse a format that does not exist, a run without synthetic shards, or a ``to`` that
    holds something else, before Ray starts; nothing is written."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: one of {', '.join(FORMATS)}")
    synthetic_files(run_dir)
    _check_options(Path(to), export_options(run_dir, fmt, with_real, include_filtered))


def export_run(cfg: Config, run_dir: Path, to: Path, fmt: Format, with_real: bool = False,
               include_filtered: bool = False, data: LongTailData | None = None
               ) -> dict[str, Any]:
    """Export ``run_dir``'s synthetic set (and with ``with_real`` the real training set) to
    ``to`` in ``fmt`` on Ray Data; returns rows written, skipped units and seconds."""
    import time

    import ray
    from tqdm import tqdm

    check_export(run_dir, to, fmt, with_real, include_filtered)
    if cfg.generator.OUTPUTS != "images":
        raise ConfigError(f"generator.kind {cfg.generator.kind!r} makes feature vectors, not "
                          f"images: there is nothing to export as images")
    run_dir, to = Path(run_dir), Path(to)
    to.mkdir(parents=True, exist_ok=True)
    write_text_atomic(to / OPTIONS,
                      json.dumps(export_options(run_dir, fmt, with_real, include_filtered)))
    if data is None:
        from ray_lt.data import load_dataset

        data = load_dataset(cfg.dataset, cfg.seed)
    units = export_units(run_dir, data if with_real else None)
    done = read_journal(to / JOURNAL)
    pending = [u for u in units if u["unit"] not in done]
    log.info(f"export to {to} ({fmt}): {len(units)} units, {len(units) - len(pending)} already "
             f"written, {len(pending)} to go")
    started = time.perf_counter()
    written = 0
    if pending:
        items = [{"unit": json.dumps(u, default=_jsonable)} for u in pending]
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            _write_batch, batch_size=1, fn_kwargs={
                "to": str(to), "fmt": fmt, "class_names": list(data.class_names),
                "folders": class_folders(list(data.class_names)),
                "dropped": _dropped(run_dir), "include_filtered": include_filtered,
                "root": str(data.root) if data.root is not None else None})
        with tqdm(total=len(pending), desc="export", unit="unit") as bar, \
                open(to / JOURNAL, "a", encoding="utf-8") as journal:
            for batch in ds.iter_batches(batch_size=None):
                for unit, part in zip(batch["unit"], batch["part"], strict=True):
                    rows = json.loads(part)
                    journal.write(json.dumps({"unit": str(unit), "rows": rows}) + "\n")
                    journal.flush()
                    done[str(unit)] = rows
                    written += len(rows)
                bar.update(len(batch["unit"]))
    seconds = time.perf_counter() - started
    manifest = pd.DataFrame([row for u in units for row in done[u["unit"]]],
                            columns=MANIFEST_COLUMNS)
    write_text_atomic(to / MANIFEST, manifest.to_csv(index=False))
    log.info(f"exported {len(manifest)} images to {to} ({written} written now in "
             f"{seconds:.1f} s); manifest {to / MANIFEST}")
    return {"rows": len(manifest), "written": written, "skipped_units": len(units) - len(pending),
            "seconds": seconds}


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.integer):
        return int(value)
    raise TypeError(type(value))


def read_journal(path: Path) -> dict[str, list[dict[str, Any]]]:
    """The units the journal says are written, with their rows; a line cut short by a killed
    driver is ignored (its unit is written again)."""
    done: dict[str, list[dict[str, Any]]] = {}
    if not path.is_file():
        return done
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        done[entry["unit"]] = entry["rows"]
    return done
