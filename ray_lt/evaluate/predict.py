"""Running an exported classifier over a Ray Dataset with a pool of Ray Data actors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import ray
import torch

from ray_lt.config import Pool
from ray_lt.train.trainer import load_classifier


class Predictor:
    """Ray Data callable class: the classifier is loaded once per actor. Returns label, group,
    prediction, confidence, entropy and, with ``features``, the penultimate embedding."""

    def __init__(self, classifier_dir: str, use_gpu: bool, features: bool = False,
                 keep: tuple[str, ...] = ()):
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.model = load_classifier(Path(classifier_dir), self.device)
        self.features = features
        self.keep = keep

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = torch.from_numpy(np.stack(batch["image"])).to(self.device)
        embedding = self.model.embed(images.permute(0, 3, 1, 2).float() / 255.0)
        logits = self.model.head(embedding)
        probs = logits.softmax(1)
        out = {"label": batch["label"], "group": batch["group"],
               "pred": logits.argmax(1).cpu().numpy(),
               "confidence": probs.max(1).values.cpu().numpy(),
               "entropy": (-(probs * probs.clamp_min(1e-12).log()).sum(1)).cpu().numpy()}
        if self.features:
            out["features"] = embedding.float().cpu().numpy()
        out.update({key: batch[key] for key in self.keep})
        return out


def predict_dataset(dataset: ray.data.Dataset, classifier_dir: Path, pool: Pool,
                    features: bool = False, keep: tuple[str, ...] = ()) -> ray.data.Dataset:
    """The lazy Dataset of ``Predictor`` rows on ``pool`` (``EvaluateConfig.pool``): predicted
    class, confidence, entropy (and features) of every row, with the ``keep`` columns passed
    through."""
    return dataset.select_columns(["image", "label", "group", *keep]).map_batches(
        Predictor,
        fn_constructor_kwargs={"classifier_dir": str(Path(classifier_dir).resolve()),
                               "use_gpu": pool.use_gpu, "features": features,
                               "keep": tuple(keep)},
        batch_format="numpy", **pool.map_batches_args())


def predict(dataset: ray.data.Dataset, classifier_dir: Path, pool: Pool,
            features: bool = False, keep: tuple[str, ...] = ()) -> pd.DataFrame:
    """``predict_dataset`` gathered on the driver, in row order."""
    return predict_dataset(dataset, classifier_dir, pool, features, keep).to_pandas()
