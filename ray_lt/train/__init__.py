"""Classifier training on Ray Train (``TorchTrainer``, DDP): models, losses, the worker loop."""

from ray_lt.train.trainer import fit_classifier, load_classifier

__all__ = ["fit_classifier", "load_classifier"]
