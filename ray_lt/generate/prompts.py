"""Text prompts of the pretrained generators: templates with ``{class_name}`` and ``{context}``,
one drawn per sample by its seed, and a per-class prompt file (JSON lines) that overrides the
templates for the classes it names (``ray-lt mine`` writes one, each line with the keywords and
samples its prompts came from).

    {"class": "goldfish", "prompts": ["a photo of a {class_name} in a bowl", "a goldfish"]}
    {"class": 7, "prompts": ["a close-up photo of a {class_name}"]}
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ray_lt.errors import ConfigError
from ray_lt.generate.base import sample_generators

PROMPT_STREAM = 2  # the per-sample generator stream of the template draw
MINED_KEYS = ("keywords", "hard", "easy")  # what `ray-lt mine` adds to each line


def _check_template(template: str, where: str) -> None:
    try:
        template.format(class_name="x", context="y")
    except (KeyError, IndexError, ValueError) as err:
        raise ConfigError(f"{where}: {template!r} uses an unknown field {err}; use "
                          f"{{class_name}} and {{context}}") from None


class Prompts:
    """The prompt of each (label, group, seed): a template drawn by the seed from the class's
    own prompts (``per_class``) or the shared ``templates``, filled with the class name and the
    group's context (group = label * contexts + context; no context when group < 0)."""

    def __init__(self, templates: list[str], class_names: list[str],
                 context_names: list[str] | None = None,
                 per_class: dict[int, list[str]] | None = None, negative: str = ""):
        self.templates = list(templates)
        self.class_names = list(class_names)
        self.context_names = list(context_names or [])
        self.per_class = dict(per_class or {})
        self.negative = negative
        if not self.templates:
            raise ConfigError("generator.prompts: give at least one template")
        for template in self.templates:
            _check_template(template, "generator.prompts")
            if "{context}" in template and not self.context_names:
                raise ConfigError(f"generator.prompts: {template!r} needs {{context}} but the "
                                  f"data set has no context names")

    def fill(self, template: str, label: int, group: int) -> str:
        context = ""
        if self.context_names and group >= 0:
            if group // len(self.context_names) != label:
                raise ValueError(f"group {group} is not a group of class {label} "
                                 f"(group = label * {len(self.context_names)} + context)")
            context = self.context_names[group % len(self.context_names)]
        return template.format(class_name=self.class_names[label], context=context)

    def draw(self, labels: list[int], groups: list[int], seeds: list[int]) -> list[str]:
        """One prompt per sample; a sample's draw depends on its seed only."""
        out = []
        for label, group, gen in zip(labels, groups,
                                     sample_generators(seeds, stream=PROMPT_STREAM), strict=True):
            pool = self.per_class.get(label, self.templates)
            pick = int(torch.randint(len(pool), (1,), generator=gen)) if len(pool) > 1 else 0
            out.append(self.fill(pool[pick], label, group))
        return out


def read_prompts_file(path: str | Path, class_names: list[str]) -> dict[int, list[str]]:
    """``generator.prompts_file``: label -> its prompt templates; every error names the file and
    the line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"generator.prompts_file: {path} does not exist")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise ConfigError(f"generator.prompts_file: {path} is not UTF-8 text ({err.reason} at "
                          f"byte {err.start})") from None
    by_name = {name: i for i, name in enumerate(class_names)}
    out: dict[int, list[str]] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"generator.prompts_file: {path}:{number}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{where}: not a JSON object ({err.msg})") from None
        if not isinstance(entry, dict) or not {"class", "prompts"} <= set(entry) or \
                set(entry) - {"class", "prompts", *MINED_KEYS}:
            raise ConfigError(f'{where}: expected {{"class": NAME or INDEX, "prompts": '
                              f'[TEMPLATE, ...]}} (a mined file may add '
                              f'{", ".join(MINED_KEYS)})')
        key, prompts = entry["class"], entry["prompts"]
        if isinstance(key, bool) or not isinstance(key, int | str):
            raise ConfigError(f"{where}: class {key!r} is not a class name or index")
        label = key if isinstance(key, int) else by_name.get(key)
        if label is None or not 0 <= label < len(class_names):
            raise ConfigError(f"{where}: class {key!r} is not a class of the data set "
                              f"({len(class_names)} classes, e.g. {class_names[0]!r})")
        if not isinstance(prompts, list) or not prompts or \
                not all(isinstance(p, str) and p.strip() for p in prompts):
            raise ConfigError(f"{where}: prompts must be a non-empty list of strings")
        if label in out:
            raise ConfigError(f"{where}: class {key!r} is listed twice")
        for template in prompts:
            _check_template(template, where)
        out[label] = prompts
    return out
