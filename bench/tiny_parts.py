"""Save tiny random Stable Diffusion, SDXL or unCLIP parts (``ray_lt.testing``) in the Hugging
Face layout, to try a generator kind with no weights:

    python bench/tiny_parts.py OUT [--kind sd|sdxl|unclip] [--prediction-type v_prediction]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ray_lt.testing import save_tiny  # noqa: E402


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--kind", choices=("sd", "sdxl", "unclip"), default="sd")
    parser.add_argument("--prediction-type", choices=("epsilon", "v_prediction"),
                        default="epsilon")
    args = parser.parse_args(argv)
    path = save_tiny(args.out, args.kind, prediction_type=args.prediction_type)
    print(f"tiny {args.kind} pipeline -> {path}")
    return path


if __name__ == "__main__":
    main()
