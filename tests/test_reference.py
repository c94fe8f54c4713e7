"""docs/configuration.md: generated from the config models, current, and complete."""

from __future__ import annotations

import re

import pytest
from conftest import ROOT

from ray_lt.config import KINDED_SECTIONS, Config, load_config, section_model
from ray_lt.reference import config_reference
from ray_lt.stages import flatten

PAGE = ROOT / "docs" / "configuration.md"
REGENERATE = "python -m ray_lt.reference > docs/configuration.md"


def _cell(text: str) -> str:
    text = text.strip().replace("\\|", "|")
    return text[1:-1] if text.startswith("`") and text.endswith("`") else text


def tables(markdown: str) -> dict[str, dict[str, tuple[str, str, str]]]:
    """Heading (without its #s) -> {key: (type, default, description)} of its table rows."""
    out: dict[str, dict[str, tuple[str, str, str]]] = {}
    heading = None
    for line in markdown.splitlines():
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
            out.setdefault(heading, {})
        elif line.startswith("| `") and heading is not None:
            cells = [_cell(c) for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            assert len(cells) == 4, line
            key, *rest = cells
            assert key not in out[heading], f"{key} listed twice under {heading}"
            out[heading][key] = tuple(rest)
    return out


def section_classes() -> list[type]:
    """Every config section class reachable from Config, every kind of the kinded ones."""
    seen: list[type] = []

    def walk(cls: type) -> None:
        if cls in seen:
            return
        seen.append(cls)
        for name, field in cls.model_fields.items():
            if cls is Config and name in KINDED_SECTIONS:
                for kind_cls in KINDED_SECTIONS[name].values():
                    walk(kind_cls)
            elif (nested := section_model(field.annotation)) is not None:
                walk(nested)

    walk(Config)
    return seen


@pytest.fixture(scope="module")
def reference() -> dict[str, dict[str, tuple[str, str, str]]]:
    return tables(config_reference())


def test_docs_configuration_md_is_current():
    assert PAGE.is_file(), f"docs/configuration.md is missing: run `{REGENERATE}`"
    assert PAGE.read_text(encoding="utf-8") == config_reference(), (
        f"docs/configuration.md is stale: run `{REGENERATE}`")


def test_every_field_of_every_section_has_a_description():
    classes = section_classes()
    assert len(classes) >= 20, [c.__name__ for c in classes]
    missing = [f"{cls.__name__}.{name}" for cls in classes
               for name, field in cls.model_fields.items()
               if not (field.description or "").strip()]
    assert not missing, f"fields without an attribute docstring: {missing}"


def test_every_kind_has_a_table_of_exactly_its_keys(reference):
    for section, kinds in KINDED_SECTIONS.items():
        for kind, cls in kinds.items():
            rows = reference[f"{section}.kind: {kind}"]
            assert set(rows) == {f"{section}.{name}" for name in cls.model_fields}, kind
            assert next(iter(rows)) == f"{section}.kind"
            assert rows[f"{section}.kind"][0] == f'"{kind}"'


def test_the_reference_lists_every_key_of_a_default_config(reference):
    cfg = load_config(ROOT / "configs" / "digits_lt.yaml")
    kinds = {"dataset": cfg.dataset.kind, "generator": cfg.generator.kind}
    listed: dict[str, dict[str, tuple[str, str, str]]] = {}
    for heading, rows in reference.items():
        for key, row in rows.items():
            listed.setdefault(key, {})[heading] = row
    expected = set()
    for key in flatten(cfg.model_dump(mode="json")):
        section = key.split(".")[0]
        heading = (f"{section}.kind: {kinds[section]}" if section in kinds
                   else "Top level" if "." not in key else section)
        # A mapping's entries (synthesis.criteria.entropy) are values of its key.
        parts = key.split(".")
        owner = next((".".join(parts[:i]) for i in range(len(parts), 0, -1)
                      if ".".join(parts[:i]) in listed), None)
        assert owner is not None, f"{key} is not in docs/configuration.md"
        assert heading in listed[owner], f"{owner} is not listed under '{heading}'"
        if owner != key:
            assert listed[owner][heading][0].startswith("dict["), (key, owner)
        expected.add((heading, owner))
    # ...and nothing else under those headings.
    shown = {(h, k) for h in {h for h, _ in expected} for k in reference[h]}
    assert shown == expected, shown ^ expected


@pytest.mark.parametrize("heading, key, type_, default", [
    ("synthesis", "synthesis.guidance_scale", "float >= 0", "0.03"),
    ("synthesis", "synthesis.grid_scales", "list[float] | null", "null"),
    ("synthesis", "synthesis.sweep_scales", "list[float]", "[0.0, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0]"),
    ("synthesis", "synthesis.criteria", "dict[str, float]", '{"entropy": 1.0}'),
    ("synthesis", "synthesis.guidance_micro_batch", "int >= 1 | null", "null"),
    ("synthesis", "synthesis.filter.confidence_threshold", "float in (0, 1]", "0.9"),
    ("train", "train.optimizer", '"sgd" | "adamw"', '"sgd"'),
    ("train", "train.momentum", "float in [0, 1)", "0.9"),
    ("train", "train.deterministic", "bool", "true"),
    ("train", "train.augment.resized_crop_scale", "[float, float] | null", "null"),
    ("model", "model.mean", "list[float] | null", "null"),
    ("tune", "tune.space.guidance_scale", "[float, float] | null", "[0.003, 0.3]"),
    ("tune", "tune.space.rounds", "list[int >= 1] | null", "null"),
    ("Top level", "seed", "int", "0"),
    ("dataset.kind: digits_lt", "dataset.image_size", "int in [8, 64]", "16"),
    ("dataset.kind: nico_pp", "dataset.context_names", "list[str]",
     '["autumn", "dim", "grass", "outdoor", "rock", "water"]'),
    ("dataset.kind: imagenet_lt", "dataset.root", "path", "(required)"),
    ("dataset.kind: imagenet_lt", "dataset.num_classes", "int >= 2", "(required)"),
    ("generator.kind: pixel", "generator.kind", '"pixel"', '"pixel"'),
    ("generator.kind: sd", "generator.kind", '"sd"', "(required)"),
    ("generator.kind: unclip", "generator.prompts", "list[str], at least 1",
     '["a photo of a {class_name}"]'),
])
def test_types_and_defaults_are_rendered_readably(reference, heading, key, type_, default):
    shown_type, shown_default, description = reference[heading][key]
    assert (shown_type, shown_default) == (type_, default)
    assert description


def test_descriptions_are_the_fields_docstrings_on_one_line_in_markdown(reference):
    field = Config.model_fields["synthesis"].annotation.model_fields["guidance_scale"]
    description = reference["synthesis"]["synthesis.guidance_scale"][2]
    assert description == " ".join(field.description.split()).replace("``", "`")
    assert "0.03" in description and "\n" not in description
