"""The LDMLR feature-space generator: training, save/load, guided sampling on the head."""

import numpy as np
import torch

from ray_lt.generate.criteria import CriterionScorer
from ray_lt.generate.feature import FeatureGenerator, train_feature_generator
from ray_lt.generate.sampler import Guidance, guided_sample
from ray_lt.train.models import build_model


def _toy_features(n_per_class=60, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, (3, dim))
    labels = np.repeat(np.arange(3), n_per_class)
    return (centres[labels] + rng.normal(0, 0.5, (len(labels), dim))).astype(np.float32), labels


def test_feature_generator_learns_its_classes_and_guidance_raises_entropy(tmp_path):
    features, labels = _toy_features()
    folder = train_feature_generator(features, labels, 3, steps=600, batch_size=128, lr=2e-3,
                                     label_dropout=0.1, seed=0, folder=tmp_path / "gen")
    generator = FeatureGenerator.from_pretrained(folder)
    assert generator.latent_shape() == (8,)
    # A head that separates the class centres, as a trained classifier's head would.
    classifier = build_model("small_cnn", num_classes=3, in_channels=1, width=4).eval()
    classifier.head = torch.nn.Linear(8, 3)
    centres = torch.stack([torch.from_numpy(features[labels == c].mean(0)) for c in range(3)])
    with torch.no_grad():
        classifier.head.weight.copy_(centres)
        classifier.head.bias.copy_(-0.5 * (centres ** 2).sum(1))
    scorer = CriterionScorer(classifier, ["entropy"], inputs="features")
    n = 30
    runs = {}
    for scale in (0.0, 0.2):
        runs[scale] = guided_sample(generator, scorer, torch.arange(n) % 3,
                                    torch.full((n,), -1), torch.zeros(n, dtype=torch.long),
                                    list(range(n)), num_steps=20, cfg_scale=2.0,
                                    guidance=Guidance(scale=scale, every=2))
    with torch.no_grad():
        pred = classifier.head(generator.decode_output(runs[0.0].latents)).argmax(1)
    assert (pred == torch.arange(n) % 3).float().mean() >= 0.9
    assert runs[0.2].criterion_after.mean() > runs[0.0].criterion_after.mean()
