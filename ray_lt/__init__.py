"""ray_lt: balance long-tailed image data sets with classifier-guided diffusion samples, and
train and tune the classifier on the mix, on Ray.

``import ray_lt`` gives the Python API (``ray_lt.api``): ``load_config``, ``run``, ``train``,
``train_generator``, ``synthesize``, ``grid``, ``tune`` and ``open_run``. They are imported on
first use, so that importing a part of the package (the sampler, on a machine without Ray)
stays light.

``ray_lt.train`` is the API's function; the subpackage of the same name (models, losses, the
Ray Train loop) is imported by its full name: ``from ray_lt.train import fit_classifier``.
"""

import sys
import types

__version__ = "0.1.0"

__all__ = ["Run", "grid", "load_config", "open_run", "run", "synthesize", "train",
           "train_generator", "tune"]


def __getattr__(name: str):
    if name in __all__:
        from ray_lt import api

        return getattr(api, name)
    raise AttributeError(f"module 'ray_lt' has no attribute {name!r}")


class _Package(types.ModuleType):
    """The package module: its ``train`` attribute stays the API's function when the
    ``ray_lt.train`` subpackage is imported (which would otherwise set the attribute)."""

    @property
    def train(self):
        from ray_lt.api import train

        return train

    @train.setter
    def train(self, module: types.ModuleType) -> None:
        self.__dict__["_train_package"] = module


sys.modules[__name__].__class__ = _Package
