"""Writes that are complete or absent (``ray_lt.atomic``)."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from ray_lt.atomic import atomic_file, staged_folder, write_text_atomic


def test_a_failed_file_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "stages.json"
    write_text_atomic(path, "old")
    with pytest.raises(RuntimeError, match="killed"), atomic_file(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stages.json"]
    write_text_atomic(path, "new")
    assert path.read_text() == "new" and len(list(tmp_path.iterdir())) == 1


def test_a_staged_folder_replaces_the_old_one_only_when_complete(tmp_path):
    folder = tmp_path / "classifier"
    folder.mkdir()
    (folder / "model.pt").write_text("old")
    (tmp_path / "classifier.tmp").mkdir()  # left by a killed run
    (tmp_path / "classifier.tmp" / "stale").write_text("x")
    with pytest.raises(RuntimeError), staged_folder(folder) as tmp:
        tmp.mkdir()
        (tmp / "model.pt").write_text("half")
        raise RuntimeError("killed")
    assert (folder / "model.pt").read_text() == "old"
    assert not (tmp_path / "classifier.tmp").exists()  # a failed write leaves no staging
    (tmp_path / "classifier.tmp").mkdir()  # left by a killed run
    (tmp_path / "classifier.tmp" / "stale").write_text("x")
    with staged_folder(folder) as tmp:
        assert not tmp.exists()  # the stale staging folder was cleared
        tmp.mkdir()
        (tmp / "model.pt").write_text("new")
    assert (folder / "model.pt").read_text() == "new" and not tmp.exists()


WRITER = """
import sys, time
from ray_lt.atomic import atomic_file
with atomic_file(sys.argv[1]) as tmp, open(tmp, "w") as handle:
    handle.write("half" * 1000)
    handle.flush()
    print("writing", flush=True)
    time.sleep(120)
"""


@pytest.mark.parametrize("name, old", [("shard_000003.parquet", None), ("stages.json", "{}"),
                                       ("report.md", "# old report"), ("metrics.json", None)])
def test_a_process_killed_mid_write_leaves_the_old_file_or_none(tmp_path, name, old):
    path = tmp_path / name
    if old is not None:
        path.write_text(old)
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE,
                              text=True)
    assert writer.stdout.readline().strip() == "writing"
    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=30)
    if old is None:
        assert not path.exists()
    else:
        assert path.read_text() == old
    # Only the hidden temporary is left, and the globs readers use do not see it.
    assert [p.name for p in tmp_path.iterdir() if p.name != name] == [
        f".{name}.{writer.pid}.tmp"]
    assert list(tmp_path.glob("shard_*.parquet")) == ([path] if name.startswith("shard") and
                                                      old is not None else [])
