"""Writes that are complete or absent (``ray_lt.atomic``)."""

from __future__ import annotations

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
    with staged_folder(folder) as tmp:
        assert not tmp.exists()  # the stale staging folder was cleared
        tmp.mkdir()
        (tmp / "model.pt").write_text("new")
    assert (folder / "model.pt").read_text() == "new" and not tmp.exists()
