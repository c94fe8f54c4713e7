"""The Python API (``import ray_lt``), the log files of a driver that runs several commands,
and parts of the pipeline that need no Ray cluster: the report rendered from a stored run, the
disk-full check."""

from __future__ import annotations

import errno
import io
import json
import logging

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from conftest import ROOT

import ray_lt
from ray_lt.commands import command
from ray_lt.config import load_config
from ray_lt.data import load_dataset
from ray_lt.errors import ConfigError, StageError
from ray_lt.log import LOG_DIR, LOG_FILE, close_log_files, log_to_file

CONFIG = ROOT / "configs" / "digits_lt.yaml"


def test_import_ray_lt_gives_the_api_and_names_what_it_lacks():
    for name in ray_lt.__all__:
        assert callable(getattr(ray_lt, name)), name
    with pytest.raises(AttributeError, match="has no attribute 'runn'"):
        ray_lt.runn  # noqa: B018


def test_a_driver_that_runs_twice_logs_each_run_into_its_own_directory(tmp_path):
    from ray_lt.log import setup_console

    setup_console()
    log = logging.getLogger("ray_lt.test_api")

    @command("test")
    def body(cfg, out_dir):
        log_to_file(out_dir)
        log.info(f"line of {out_dir.name}")

    body(None, tmp_path / "first")
    body(None, tmp_path / "second")
    log.info("after both")
    first, second = ((tmp_path / d / LOG_DIR / LOG_FILE).read_text() for d in ("first", "second"))
    assert "line of first" in first and "line of second" not in first, first
    assert "line of second" in second and "line of first" not in second, second
    assert "after both" not in first + second
    assert not [h for h in logging.getLogger("ray_lt").handlers
                if (h.get_name() or "").startswith("ray_lt.file:")]
    # Two run directories in a row without a command around them: the second replaces the
    # first.
    log_to_file(tmp_path / "a")
    log_to_file(tmp_path / "b")
    log.info("only in b")
    assert "only in b" not in (tmp_path / "a" / LOG_DIR / LOG_FILE).read_text()
    assert "only in b" in (tmp_path / "b" / LOG_DIR / LOG_FILE).read_text()
    from ray_lt.log import close_log_files

    close_log_files()


def test_open_run_reads_a_stored_run_and_names_a_missing_stage(tmp_path):
    with pytest.raises(ConfigError, match="not a ray-lt run directory"):
        ray_lt.open_run(tmp_path)
    from ray_lt.rundir import write_run_config
    from ray_lt.stages import record_timing

    cfg = load_config(CONFIG, ["train.epochs=3"])
    write_run_config(cfg, tmp_path, "run")
    (tmp_path / "metrics.json").write_text(json.dumps({"few": 0.5}))
    record_timing(tmp_path, "classifier", 2.5, 100.0)
    run = ray_lt.open_run(tmp_path)
    assert run.config.train.epochs == 3 and run.metrics("baseline") == {"few": 0.5}
    assert [t["seconds"] for t in run.timings()["classifier"]] == [2.5]
    with pytest.raises(StageError, match="final test metrics"):
        run.metrics()
    with pytest.raises(ValueError, match="'baseline' or 'final'"):
        run.metrics("guide")
    with pytest.raises(StageError, match="final classifier"):
        run.classifier()


def test_the_api_takes_a_path_a_dict_or_a_config_with_overrides():
    from ray_lt.api import _config

    from_path = _config(CONFIG, ["train.epochs=4"])
    assert from_path.train.epochs == 4
    assert _config(from_path, ["seed=3"]).seed == 3 and _config(from_path, None) is from_path
    raw = from_path.model_dump(mode="json")
    assert _config(raw, ["train.lr=0.2"]).train.lr == 0.2 and raw["train"]["lr"] == 0.05
    with pytest.raises(ConfigError, match="train.epoch"):
        _config(raw, ["train.epoch=3"])


def test_the_report_renders_from_a_stored_run_without_ray(tmp_path):
    """write_report reads only files: the plan, a shard, the quality table and the metrics."""
    from ray_lt.generate.codec import to_ipc
    from ray_lt.generate.writer import write_shards
    from ray_lt.report import write_report

    cfg = load_config(CONFIG)
    data = load_dataset(cfg.dataset, cfg.seed)
    out = tmp_path / "synthetic"
    out.mkdir()
    shards = [{"shard_id": 0, "label": 9, "group": -1, "n": 3, "seed": 5}]
    (out / "plan.json").write_text(json.dumps(shards))
    pixels = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 1), dtype=np.uint8)
    table = pa.table({"pixels": pa.array([p.tobytes() for p in pixels], type=pa.binary()),
                      "label": [9] * 3, "group": [-1] * 3, "criterion": ["entropy"] * 3,
                      "seed": [1, 2, 3], "shard_id": [0] * 3}
                     ).replace_schema_metadata({"shape": "16,16,1"})
    write_shards(pd.DataFrame([{"shard_id": 0, "payload": to_ipc(table), "seconds": 0.1}]),
                 str(out))
    (tmp_path / "report").mkdir()
    pd.DataFrame([{"criterion": "all", "samples": 3, "fid": 12.5, "density": 0.9,
                   "coverage": 0.75}]).to_csv(tmp_path / "report" / "quality.csv", index=False)
    per_class = [0.9] * 9 + [0.2]
    baseline = {"overall": 0.8, "many": 0.9, "few": 0.4, "per_class": per_class, "num_rows": 500}
    final = {**baseline, "overall": 0.85, "few": 0.6}
    path = write_report(cfg, tmp_path, data, baseline, final,
                        {"synthesis": (30.0, 400.0, 20.5), "classifier": (12.0, 300.0, 1.0)})
    text = path.read_text()
    assert "| baseline (real) | 0.800 | 0.900 |" in text
    assert "| final (real + synthetic) - baseline (real) | 0.050 |" in text
    assert "| nine | 2 | 3 | 5 |" in text  # real, synthetic, total of the rarest class
    assert "| all | 3 | 12.500 | 0.900 | 0.750 |" in text  # the quality stage's table
    # stage, started, seconds, driver peak RSS, in the order they started
    assert "| classifier | 1.000 | 12.000 | 300 |\n| synthesis | 20.500 | 30.000 | 400 |" in text
    assert (tmp_path / "report" / "synthetic_samples.png").stat().st_size > 1000
    assert "<table>" in (tmp_path / "report.html").read_text()
    (tmp_path / "report" / "quality.csv").unlink()  # no quality stage: no section
    assert "Synthetic-data quality" not in write_report(cfg, tmp_path, data, baseline,
                                                        final).read_text()


def test_a_full_disk_is_recognised_through_the_error_that_carries_it():
    from ray_lt.generate.synthesize import _disk_full

    full = OSError(errno.ENOSPC, "No space left on device")
    assert _disk_full(full)
    wrapped = RuntimeError("a writer failed")
    wrapped.cause = full
    assert _disk_full(wrapped)
    assert _disk_full(RuntimeError("... OSError: [Errno 28] No space left on device: 'x'"))
    assert not _disk_full(OSError(errno.EACCES, "Permission denied"))
    assert not _disk_full(RuntimeError("a writer failed"))


def test_ray_datas_no_cpu_snapshot_goes_to_the_log_file_not_the_terminal(tmp_path, capsys):
    """Ray Data's "no available CPUs ... the Dataset job will hang" warning is a moment's
    snapshot while stages share the cluster: the run's log file keeps it as a DEBUG line, the
    terminal does not show it; other Ray Data warnings still show."""
    import ray.data  # noqa: F401  (Ray Data's own logging set up, as in a run)

    from ray_lt.log import setup_console

    setup_console()
    path = log_to_file(tmp_path)
    emitter = logging.getLogger("ray.data.dataset")
    capture = logging.StreamHandler(stream := io.StringIO())
    capture.setLevel(logging.INFO)  # a terminal handler, as Ray's own
    emitter.addHandler(capture)
    try:
        emitter.warning("Warning: The Ray cluster currently does not have any available CPUs. "
                        "The Dataset job will hang unless more CPUs are freed up.")
        emitter.warning("another Ray Data warning")
    finally:
        emitter.removeHandler(capture)
        close_log_files()
    shown = stream.getvalue() + capsys.readouterr().out
    assert "will hang" not in shown and "another Ray Data warning" in shown
    assert "DEBUG ray.data.dataset: Warning: The Ray cluster" in path.read_text()
