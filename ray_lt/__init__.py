"""ray_lt: balance long-tailed image data sets with classifier-guided diffusion samples, and
train and tune the classifier on the mix, on Ray.

``import ray_lt`` gives the Python API (``ray_lt.api``): ``load_config``, ``run``, ``train``,
``train_generator``, ``synthesize``, ``grid``, ``mine``, ``tune`` and ``open_run``. They are
imported on first use, so that importing a part of the package (the sampler, on a machine
without Ray) stays light.

``ray_lt.train`` and ``ray_lt.tune`` are the API's functions; the subpackages of the same
names are imported by their full names (``from ray_lt.train import fit_classifier``).
"""

import sys
import types

__version__ = "0.1.0"

__all__ = ["Run", "grid", "load_config", "mine", "open_run", "run", "synthesize", "train",
           "train_generator", "tune"]


def __getattr__(name: str):
    if name in __all__:
        from ray_lt import api

        return getattr(api, name)
    raise AttributeError(f"module 'ray_lt' has no attribute {name!r}")


def _api_function(name: str) -> property:
    """The API's ``name`` as a package attribute that the subpackage of the same name, once
    imported, does not replace (Python sets a subpackage as an attribute of its parent)."""

    def get(module: types.ModuleType):
        from ray_lt import api

        return getattr(api, name)

    def keep_subpackage(module: types.ModuleType, subpackage: types.ModuleType) -> None:
        module.__dict__[f"_{name}_package"] = subpackage

    return property(get, keep_subpackage)


class _Package(types.ModuleType):
    """The package module: ``ray_lt.train`` and ``ray_lt.tune`` stay the API's functions."""

    train = _api_function("train")
    tune = _api_function("tune")


sys.modules[__name__].__class__ = _Package
