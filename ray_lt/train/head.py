"""LDMLR's last step: fine-tune the baseline classifier's head on real features plus
pseudo-features from the ``feature`` generator (``CE_real + gamma * CE_pseudo``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ray_lt.atomic import staged_folder
from ray_lt.train.losses import classification_loss, log_prior
from ray_lt.train.trainer import HISTORY_FILE, MODEL_FILE, SPEC_FILE, load_classifier


def fit_head(classifier_dir: Path, real: tuple[np.ndarray, np.ndarray],
             pseudo: tuple[np.ndarray, np.ndarray], class_counts: list[int],
             train: dict[str, Any], seed: int, folder: Path) -> Path:
    """Train the head of the classifier in ``classifier_dir`` on 50/50 batches (at
    ``synthetic_fraction``) of real and pseudo features, pseudo rows weighted by
    ``synthetic_weight``; export the whole classifier to ``folder``."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = load_classifier(Path(classifier_dir))
    head = model.head.train()
    optimizer = torch.optim.SGD(head.parameters(), lr=train["lr"], momentum=train["momentum"],
                                weight_decay=train["weight_decay"])
    prior = log_prior(class_counts)
    real_x, real_y = (torch.as_tensor(a) for a in real)
    fake_x, fake_y = (torch.as_tensor(a) for a in pseudo)
    n_fake = max(1, round(train["batch_size"] * train["synthetic_fraction"]))
    n_real = max(1, train["batch_size"] - n_fake)
    history = []
    for epoch in range(train["epochs"]):
        order = torch.as_tensor(rng.permutation(len(real_x)))
        loss_sum = seen = 0.0
        for start in range(0, len(order), n_real):
            r = order[start:start + n_real]
            f = torch.as_tensor(rng.integers(0, len(fake_x), size=n_fake))
            x = torch.cat([real_x[r], fake_x[f]]).float()
            y = torch.cat([real_y[r], fake_y[f]]).long()
            weight = torch.cat([torch.ones(len(r)),
                                torch.full((len(f),), float(train["synthetic_weight"]))])
            loss = classification_loss(head(x), y, prior, train["balanced_softmax_weight"],
                                       weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += float(loss.detach()) * len(y)
            seen += len(y)
        history.append({"epoch": epoch, "train_loss": loss_sum / max(seen, 1)})
    folder = Path(folder)
    with staged_folder(folder) as tmp:
        tmp.mkdir(parents=True)
        torch.save(model.state_dict(), tmp / MODEL_FILE)
        spec = json.loads((Path(classifier_dir) / SPEC_FILE).read_text())
        (tmp / SPEC_FILE).write_text(json.dumps(spec, indent=2))
        pd.DataFrame(history).to_csv(tmp / HISTORY_FILE, index=False)
    return folder
