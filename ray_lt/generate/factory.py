"""Building the configured generator and criterion scorer inside a worker (sampler actor, grid
task), and the cheap checks that fail on a missing stage before any actor starts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ray_lt.config import Config
from ray_lt.errors import require_stage
from ray_lt.generate.criteria import CriterionScorer
from ray_lt.generate.kinds import generator_kind
from ray_lt.generate.statistics import load_context_head, load_criterion_support
from ray_lt.train.trainer import MODEL_FILE, load_classifier


def generator_info(class_names: list[str], context_names: list[str], image_size: int
                   ) -> dict[str, Any]:
    """What a worker needs to know about the data set to build its generator: names and the
    image size, nothing that grows with the number of images."""
    return {"class_names": list(class_names), "context_names": list(context_names),
            "image_size": int(image_size)}


def build_generator(cfg: Config, run_dir: Path, device: torch.device,
                    info: dict[str, Any]) -> Any:
    """The configured generator on ``device``: trained in the run directory or pretrained
    (``ray_lt.generate.kinds``), with the run's img2img sources under ``synthesis.init: real``."""
    sources = None
    if cfg.synthesis.init == "real":
        from ray_lt.generate.sources import Sources

        sources = Sources.load(run_dir)
    return generator_kind(cfg).build(cfg, Path(run_dir), device, info, sources)


def check_generator(cfg: Config, run_dir: Path) -> None:
    """Fail on a missing generator or one of another kind before any actor starts (loads no
    weights)."""
    generator_kind(cfg).check(cfg, Path(run_dir))


def build_scorer(cfg: Config, run_dir: Path, device: torch.device,
                 names: list[str] | None = None, classifier_dir: Path | None = None
                 ) -> CriterionScorer:
    """The classifier in ``classifier_dir`` (default: the baseline, ``run_dir/classifier``)
    scoring ``names`` (default: those of ``synthesis.criteria``)."""
    classifier_dir = Path(classifier_dir or Path(run_dir) / "classifier")
    require_stage(classifier_dir / MODEL_FILE, "classifier", "ray-lt train")
    statistics, head = load_criterion_support(classifier_dir)
    names = names or list(cfg.synthesis.criteria)
    inputs = cfg.generator.OUTPUTS
    context_head = load_context_head(classifier_dir)
    return CriterionScorer(load_classifier(classifier_dir, device), names, statistics, head,
                           inputs=inputs, context_head=context_head).to(device)


def check_scorer(cfg: Config, run_dir: Path, names: list[str] | None = None,
                 classifier_dir: Path | None = None) -> None:
    """Fail, loading nothing, when the classifier or what the criteria need beside it (class
    statistics, epistemic head) is missing from the run directory."""
    from ray_lt.generate.criteria import CRITERIA
    from ray_lt.generate.statistics import CONTEXT_HEAD_FILE, HEAD_FILE, STATISTICS_FILE

    classifier_dir = Path(classifier_dir or Path(run_dir) / "classifier")
    require_stage(classifier_dir / MODEL_FILE, "classifier", "ray-lt train")
    files = {"statistics": STATISTICS_FILE, "epistemic_head": HEAD_FILE,
             "context_head": CONTEXT_HEAD_FILE}
    for name in names or list(cfg.synthesis.criteria):
        needs = CRITERIA[name].needs
        if needs is not None:
            require_stage(classifier_dir / files[needs], f"criterion support ({name})",
                          "ray-lt synthesize")
