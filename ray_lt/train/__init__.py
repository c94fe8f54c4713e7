"""Classifier training on Ray Train (``TorchTrainer``, DDP): models, losses, the worker loop.

``fit_classifier`` and ``load_classifier`` are imported on first use, so that the models and
losses can be used without importing Ray.
"""

from typing import Any

__all__ = ["fit_classifier", "load_classifier"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from ray_lt.train import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'ray_lt.train' has no attribute {name!r}")
