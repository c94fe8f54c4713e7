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

import ray_lt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--scales", type=float, nargs="+", default=[0.0, 0.03, 0.1])
    parser.add_argument("--criterion", default="entropy")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    run = ray_lt.open_run(args.run, [f"synthesis.num_steps={args.steps}"])
    s = run.config.synthesis
    classifier = run.classifier("baseline")
    num_classes = classifier.head.out_features
    rows = []
    for scale in args.scales:
        for label in range(num_classes):
            images = run.sample(label, args.per_class, criterion=args.criterion, scale=scale,
                                seed=label * 100_000, device="cpu")
            with torch.no_grad():
                pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
                probs = classifier(pixels).softmax(1)
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
