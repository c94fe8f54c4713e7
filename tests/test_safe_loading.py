"""Weights, checkpoints and configs are read without executing anything they contain."""

import json
import os
import re
from pathlib import Path

import pytest
import torch
from conftest import ROOT

from ray_lt.errors import ConfigError, StageError
from ray_lt.train import load_classifier
from ray_lt.train.models import build_model
from ray_lt.train.trainer import MODEL_FILE, SPEC_FILE


class Payload:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _booby_trapped(path: Path, marker: Path) -> Path:
    state = build_model("small_cnn", num_classes=3, in_channels=1, width=8).state_dict()
    torch.save({**state, "extra": Payload(marker)}, path)
    return path


def test_a_pickled_payload_in_model_checkpoint_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "payload_ran"
    checkpoint = _booby_trapped(tmp_path / "weights.pt", marker)
    with pytest.raises(ConfigError, match=r"model.checkpoint: .*weights.pt is not a PyTorch "
                                          r"state dict \(UnpicklingError"):
        build_model("small_cnn", num_classes=3, in_channels=1, width=8, checkpoint=checkpoint)
    assert not marker.exists()


def test_a_pickled_payload_in_an_exported_classifier_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "payload_ran"
    folder = tmp_path / "classifier"
    folder.mkdir()
    _booby_trapped(folder / MODEL_FILE, marker)
    spec = {"name": "small_cnn", "num_classes": 3, "in_channels": 1, "width": 8, "mean": None,
            "std": None, "checkpoint": None}
    (folder / SPEC_FILE).write_text(json.dumps(spec))
    with pytest.raises(StageError, match=r"model.pt: not a state dict of tensors, refused"):
        load_classifier(folder)
    assert not marker.exists()


UNSAFE = {
    r"weights_only\s*=\s*False": "torch.load of arbitrary pickles",
    r"\bpickle\.loads?\(": "unpickling",
    r"\byaml\.(load|unsafe_load|full_load)\(": "YAML that can build objects",
    r"trust_remote_code\s*=\s*True": "code from a model hub",
    r"(?<![.\w])(eval|exec)\(": "evaluated strings",
}


def _call_text(text: str, start: int) -> str:
    """The argument text of the call whose opening parenthesis is at ``start``."""
    depth = 0
    for i in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return text[start:i + 1]
    return text[start:]


def test_every_torch_load_takes_weights_only():
    calls = []
    for path in sorted((ROOT / "ray_lt").rglob("*.py")):
        text = path.read_text()
        for match in re.finditer(r"torch\.load\(", text):
            args = _call_text(text, match.end() - 1)
            calls.append((f"{path.relative_to(ROOT)}", "weights_only=True" in args))
    assert len(calls) >= 5  # the checkpoints, exports and model.checkpoint
    assert [where for where, safe in calls if not safe] == []


@pytest.mark.parametrize("pattern", list(UNSAFE))
def test_the_package_never_loads_in_a_way_that_can_run_code(pattern):
    hits = []
    for path in sorted((ROOT / "ray_lt").rglob("*.py")):
        text = path.read_text()
        for match in re.finditer(pattern, text, flags=re.S):
            line = text[:match.start()].count("\n") + 1
            hits.append(f"{path.relative_to(ROOT)}:{line}")
    assert not hits, f"{UNSAFE[pattern]}: {hits}"
