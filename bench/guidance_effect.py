"""What feedback guidance does to the samples, as the baseline classifier sees them.

    python bench/guidance_effect.py --run runs/quality [--per-class 20] [--scales 0 0.03 0.1]

``--run`` is a run directory with ``classifier/`` (``ray-lt train``) and ``generator/``
(``ray-lt train-generator``). For every class the same seeds are sampled at each guidance scale
(scale 0 = unguided); the table gives the baseline classifier's accuracy on the samples (low =
hard for it) and its mean entropy, then the per-class accuracy on unguided samples (are they
recognisable digits of their class?).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ray_lt.config import load_config
from ray_lt.generate.factory import build_generator, build_scorer
from ray_lt.generate.sampler import Guidance, guided_sample
from ray_lt.train.trainer import load_classifier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--scales", type=float, nargs="+", default=[0.0, 0.03, 0.1])
    parser.add_argument("--criterion", default="entropy")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    cfg = load_config(args.run / "config.yaml", [f"synthesis.num_steps={args.steps}"])
    s = cfg.synthesis
    device = torch.device("cpu")
    info = {"class_names": [], "context_names": [], "image_size": 0}
    generator = build_generator(cfg, args.run, device, info)
    scorer = build_scorer(cfg, args.run, device, [args.criterion])
    classifier = load_classifier(args.run / "classifier")
    num_classes = classifier.head.out_features
    rows = []
    for scale in args.scales:
        guidance = Guidance(scale, s.guidance_every, s.guidance_mode, s.reuse_gradient,
                            s.through_unet)
        for label in range(num_classes):
            n = args.per_class
            seeds = [label * 100_000 + i for i in range(n)]
            out = guided_sample(generator, scorer, torch.full((n,), label), torch.full((n,), -1),
                                torch.zeros(n, dtype=torch.long), seeds, s.num_steps,
                                s.cfg_scale, guidance)
            with torch.no_grad():
                probs = classifier(generator.decode_output(out.latents)).softmax(1)
            entropy = -(probs * probs.clamp_min(1e-12).log()).sum(1)
            rows.append({"scale": scale, "label": label,
                         "accuracy": float((probs.argmax(1) == label).float().mean()),
                         "entropy": float(entropy.mean())})
    table = pd.DataFrame(rows)
    summary = table.groupby("scale")[["accuracy", "entropy"]].mean()
    print(f"criterion {args.criterion}, {args.per_class} samples per class, "
          f"{s.num_steps} steps, CFG {s.cfg_scale}, guidance every {s.guidance_every}")
    print(summary.round(3).to_string())
    unguided = table[table["scale"] == args.scales[0]].set_index("label")["accuracy"]
    print(f"\nper-class accuracy on samples at scale {args.scales[0]}:")
    print(" ".join(f"{c}:{a:.2f}" for c, a in unguided.items()))
    print(f"mean {np.mean(unguided):.3f}")


if __name__ == "__main__":
    main()
