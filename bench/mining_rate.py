"""Seconds per image of the mining step's description pool, small and large, side by side in
one Ray session, with tiny random models (or the local ones named):

    python bench/mining_rate.py [--vlm DIR] [--llm DIR] [--images 16 64] [--gpus 0]

For each count N, N random 32 x 32 images are described on the mining actor pool (one actor,
a new pool each time, as a round's mining starts one) and, with ``--llm``, 4 prompts per 8
images are written: the wall time, and the cost of each image beyond the first count's, so
that the pool's start-up (process, imports, loading) and the per-image work are told apart.
Keyword scoring of the descriptions is timed too (it runs on the driver).
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ray_lt.cluster import init_ray  # noqa: E402
from ray_lt.config import load_config  # noqa: E402
from ray_lt.generate.mining import describe, keyword_scores, llm_prompts  # noqa: E402


def images(count: int, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)).save(buffer, "PNG")
        out.append(buffer.getvalue())
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vlm", type=Path)
    parser.add_argument("--llm", type=Path)
    parser.add_argument("--images", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--gpus", type=float, default=0.0)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        vlm, llm = args.vlm, args.llm
        if vlm is None:
            from ray_lt.testing import save_tiny_llm, save_tiny_vlm

            vlm = save_tiny_vlm(Path(scratch) / "vlm")
            llm = llm or save_tiny_llm(Path(scratch) / "llm")
        cfg = load_config(ROOT / "configs" / "imagenet_lt_sd.yaml", [
            "dataset.root=/unused", "rounds.count=2", "mining.enabled=true", f"mining.vlm={vlm}",
            f"mining.llm={llm}", "mining.num_actors=1", "mining.cpus_per_actor=1",
            f"mining.gpus_per_actor={args.gpus:g}", f"mining.batch_size={args.batch_size}",
            "ray.address=null"])
        init_ray(cfg.ray)
        results = []
        for count in args.images:
            started = time.perf_counter()
            texts = describe(images(count, count), cfg)
            seconds = time.perf_counter() - started
            half = count // 2
            started = time.perf_counter()
            keyword_scores(texts[:half], texts[half:])
            scoring = time.perf_counter() - started
            requests = [{"request": t, "start": "A photo of a seven that"}
                        for t in texts[: max(count // 2, 1)]]
            started = time.perf_counter()
            llm_prompts(requests, cfg)
            writing = time.perf_counter() - started
            results.append({"images": count, "describe": seconds, "score": scoring,
                            "prompts": len(requests), "write": writing})
    first = results[0]
    print(f"{'images':>6s} {'describe s':>10s} {'s/image':>8s} {'beyond first s/image':>21s} "
          f"{'keywords s':>10s} {'prompts':>7s} {'write s':>8s}")
    for r in results:
        extra = r["images"] - first["images"]
        marginal = (r["describe"] - first["describe"]) / extra if extra else float("nan")
        print(f"{r['images']:6d} {r['describe']:10.2f} {r['describe'] / r['images']:8.3f} "
              f"{marginal:21.3f} {r['score']:10.4f} {r['prompts']:7d} {r['write']:8.2f}")
    return results


if __name__ == "__main__":
    main()
