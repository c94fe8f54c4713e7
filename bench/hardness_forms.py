"""The two forms of the hardness statistics: per-class covariances (``full``) and one covariance
shared by every class (``tied``, ``synthesis.hardness_covariance``).

Digits: how well tied hardness ranks samples like full hardness (Spearman's rho, per class and
over all samples) on the real test images and, when the run has them, its synthetic images. The
classifier is the run's baseline, trained by ``ray-lt train``::

    ray-lt train configs/digits_lt.yaml --out /tmp/hardness_digits --set ray.address=local
    python bench/hardness_forms.py --run /tmp/hardness_digits

Scale (``--scale``): the tied fit streamed over Parquet files of ImageNet-LT's size (115,846
random 2,048-d float32 features, 1,000 classes): wall time, peak RSS, statistics file size.
With ``--head-epochs N`` also the epistemic head behind ``total_uncertainty`` (K =
``--heads`` linear heads, the statistics stage's 30 epochs) over the same rows: N epochs timed,
the 30 extrapolated. A run whose criteria are entropy + hardness fits the statistics alone;
before, every run also fitted the head, in the driver.
"""

from __future__ import annotations

import argparse
import io
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image
from scipy.stats import spearmanr

from ray_lt.config import load_config
from ray_lt.data import digits_tables
from ray_lt.generate.criteria import (
    ClassStatistics,
    fit_class_statistics,
    fit_class_statistics_streamed,
    fit_epistemic_head_streamed,
    hardness,
)
from ray_lt.generate.statistics import FEATURES_DIR, feature_batches, feature_table
from ray_lt.train.trainer import load_classifier


@torch.no_grad()
def embed(classifier: torch.nn.Module, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Penultimate features of uint8 (N, H, W, C) images, as the Ray Data predictor computes
    them."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    return torch.cat([classifier.embed(x[i:i + batch_size])
                      for i in range(0, len(x), batch_size)]).numpy()


def synthetic_images(run: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """Decoded PNG images and labels of ``run/synthetic/shard_*.parquet``, None without any."""
    files = sorted((run / "synthetic").glob("shard_*.parquet"))
    if not files:
        return None
    table = pq.ParquetDataset(files).read(columns=["image", "label"])
    images = [np.asarray(Image.open(io.BytesIO(b))) for b in table.column("image").to_pylist()]
    images = np.stack([i[..., None] if i.ndim == 2 else i for i in images])
    return images, table.column("label").to_numpy()


def rank_agreement(features: np.ndarray, labels: np.ndarray, forms: dict[str, ClassStatistics]
                   ) -> tuple[dict[int, float], float]:
    """Spearman's rho between full and tied hardness, within each class and over all rows."""
    x, y = torch.tensor(features, dtype=torch.float32), torch.tensor(labels, dtype=torch.long)
    full, tied = (hardness(x, y, forms[f]).numpy() for f in ("full", "tied"))
    per_class = {int(c): float(spearmanr(full[labels == c], tied[labels == c])[0])
                 for c in np.unique(labels) if (labels == c).sum() > 2}
    return per_class, float(spearmanr(full, tied)[0])


def digits(run: Path) -> None:
    cfg = load_config(run / "config.yaml")
    tables = digits_tables(cfg.dataset, cfg.seed)
    classifier = load_classifier(run / "classifier")
    train = tables["train"]
    features = embed(classifier, np.stack(train["image"].to_numpy()))
    labels = train["label"].to_numpy()
    counts = np.bincount(labels)
    forms = {f: fit_class_statistics(features, labels, len(counts), covariance=f)
             for f in ("full", "tied")}
    print(f"digits: {len(labels)} training images, d = {features.shape[1]}, "
          f"{len(counts)} classes of {counts.max()} down to {counts.min()} images")
    sets = {"test": (np.stack(tables["test"]["image"].to_numpy()),
                     tables["test"]["label"].to_numpy())}
    synthetic = synthetic_images(run)
    if synthetic is not None:
        sets["synthetic"] = synthetic
    results = {name: (rank_agreement(embed(classifier, images), y, forms), np.bincount(y))
               for name, (images, y) in sets.items()}
    header = "| class | train |" + "".join(f" {n} rows | rho {n} |" for n in results)
    print(header)
    print("|" + "---|" * (2 + 2 * len(results)))
    for c in range(len(counts)):
        cells = "".join(f" {n_rows[c] if c < len(n_rows) else 0} | "
                        + (f"{per_class[c]:.3f} |" if c in per_class else "- |")
                        for (per_class, _), n_rows in results.values())
        print(f"| {c} | {counts[c]} |{cells}")
    cells = "".join(f" {n_rows.sum()} | {overall:.3f} |"
                    for (_, overall), n_rows in results.values())
    print(f"| all | {counts.sum()} |{cells}")


HEAD_EPOCHS = 30  # fit_epistemic_head_streamed's default, the statistics stage's setting


def scale(rows: int, dim: int, classes: int, chunk: int, seed: int, head_epochs: int = 0,
          heads: int = 5) -> None:
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / FEATURES_DIR
        folder.mkdir()
        start = time.perf_counter()
        for i, first in enumerate(range(0, rows, chunk)):
            n = min(chunk, rows - first)
            labels = rng.integers(0, classes, size=n)
            if first == 0:
                labels[:min(classes, n)] = np.arange(min(classes, n))
            table = feature_table({"features": rng.normal(size=(n, dim)).astype(np.float32),
                                   "label": labels, "group": np.full(n, -1)})
            pq.write_table(table, folder / f"part_{i:04d}.parquet")
        written = time.perf_counter() - start
        features_size = sum(f.stat().st_size for f in folder.iterdir())
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
        start = time.perf_counter()
        stats = fit_class_statistics_streamed(feature_batches(Path(tmp)), classes, "tied")
        path = Path(tmp) / "class_statistics.safetensors"
        stats.save(path)
        fitted = time.perf_counter() - start
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
        size = path.stat().st_size
        if head_epochs:
            start = time.perf_counter()
            fit_epistemic_head_streamed(feature_batches(Path(tmp)), classes, k=heads,
                                        epochs=head_epochs, seed=seed)
            head = time.perf_counter() - start
    full = classes * dim**2 * 4 + classes * dim * 4 + classes * 4
    print(f"scale: {rows} rows x {dim} float32 features, {classes} classes; Parquet "
          f"{features_size / 2**20:.0f} MiB written in {written:.1f} s")
    print(f"tied fit (2 streamed passes, {torch.get_num_threads()} threads) + save: "
          f"{fitted:.1f} s")
    print(f"peak RSS: {rss:.0f} MiB (before the fit: {rss_before:.0f} MiB)")
    print(f"statistics file: {size / 2**20:.1f} MiB tied; full form would be "
          f"{full / 2**30:.2f} GiB ({full / 1e9:.1f} GB)")
    if head_epochs:
        whole = head / head_epochs * HEAD_EPOCHS
        print(f"epistemic head (K={heads}, {dim} -> {classes}), {head_epochs} of its "
              f"{HEAD_EPOCHS} epochs: {head:.1f} s; all {HEAD_EPOCHS}: {whole:.0f} s "
              f"(extrapolated)")
        print(f"support for entropy + hardness: {fitted:.1f} s (statistics only) against "
              f"{fitted + whole:.0f} s when the head is fitted too, "
              f"{(fitted + whole) / fitted:.0f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, help="digits run directory with classifier/ "
                        "(and synthetic/shard_*.parquet)")
    parser.add_argument("--scale", action="store_true", help="the tied fit at ImageNet-LT size")
    parser.add_argument("--rows", type=int, default=115_846)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--chunk", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--head-epochs", type=int, default=0,
                        help="with --scale: also time this many epochs of the epistemic head")
    parser.add_argument("--heads", type=int, default=5, help="K of the epistemic head")
    args = parser.parse_args()
    if args.run is None and not args.scale:
        parser.error("give --run DIR, --scale or both")
    if args.run is not None:
        digits(args.run)
    if args.scale:
        scale(args.rows, args.dim, args.classes, args.chunk, args.seed, args.head_epochs,
              args.heads)


if __name__ == "__main__":
    main()
