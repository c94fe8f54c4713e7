"""The documents the code cites are in the repository, with the sections cited."""

from __future__ import annotations

import re

from conftest import ROOT

SOURCES = [*sorted((ROOT / "ray_lt").rglob("*.py")), *sorted((ROOT / "bench").glob("*.py")),
           ROOT / "README.md"]


def test_cited_documents_and_method_sections_exist():
    method = (ROOT / "docs" / "method.md").read_text()
    sections = {int(n) for n in re.findall(r"^## (\d+)\. ", method, flags=re.M)}
    cited_docs, cited_sections = set(), set()
    for path in SOURCES:
        text = path.read_text()
        assert "METHOD.md" not in text, path
        cited_docs.update(re.findall(r"docs/[\w.-]+\.md", text))
        for first, last in re.findall(r"docs/method\.md §(\d+)(?:-(\d+))?", text):
            cited_sections.update(range(int(first), int(last or first) + 1))
    assert {"docs/method.md", "docs/performance.md"} <= cited_docs
    assert all((ROOT / doc).is_file() for doc in cited_docs), cited_docs
    assert cited_sections and cited_sections <= sections, cited_sections - sections


def test_every_test_the_guarantees_cite_exists():
    readme = (ROOT / "README.md").read_text()
    short = readme.split("## Guarantees", 1)[1].split("\n## ", 1)[0]
    full = (ROOT / "docs" / "guarantees.md").read_text()
    for section, least in ((short, 8), (full, 15)):
        cited = re.findall(r"`(test_\w+\.py)(?:::(test_\w+))?", section)
        assert len(cited) >= least
        for module, name in cited:
            text = (ROOT / "tests" / module).read_text()
            assert not name or f"def {name}(" in text, f"{module}::{name}"


def test_the_readme_stays_short_and_its_links_resolve():
    readme = ROOT / "README.md"
    assert len(readme.read_text().splitlines()) <= 200
    for doc in [readme, *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench" / "README.md"]:
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", doc.read_text()):
            if not target.startswith("http"):
                assert (doc.parent / target).exists(), f"{doc.name}: {target}"
