"""Synthetic data sets with the real shape of ImageNet-LT and Places-LT, written to disk.

    python bench/lt_shape.py imagenet_lt --out DIR [--image-size 16] [--val-per-class 2]
        [--test-per-class 4] [--classes N] [--unclip DIR] [--folders]

The files follow the layout that ``dataset.kind: imagenet_lt | places_lt`` reads (split lists of
``relative/path label`` lines next to real JPEG files), or with ``--folders`` the one that
``dataset.kind: folder`` reads (``train/<class>/``, ``val/<class>/``, ``test/<class>/``); either
way ``manifest.csv`` (path, label, split) lists them for ``dataset.kind: manifest``. The
per-class training counts are those of the real sets, so that indexing, loading and quota
planning can be measured at full scale without the real images. Every class is a smooth random
colour pattern, so that a small CNN can learn the images even at 16x16.
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image
from tqdm import tqdm

Kind = Literal["imagenet_lt", "places_lt"]
SPLITS = ("train", "val", "test")
MANY_ABOVE, FEW_BELOW = 100, 20
SHIFT = 2
NOISE = 0.06
QUALITY = 90
CHUNK = 512


def _segment_curve(ranks: np.ndarray, knots: list[tuple[float, float]], s: float) -> np.ndarray:
    """Broken power law in ``s + rank`` through ``knots`` (rank, count).

    Between knots ``(r0, c0)`` and ``(r1, c1)``: ``c(r) = c0 * ((s + r) / (s + r0)) ** -a`` with
    ``a = log(c0 / c1) / log((s + r1) / (s + r0))``: a Zipf-Mandelbrot (Pareto-like) fall whose
    exponent changes at the knots; a small offset ``s`` makes a steep head, a large one tends to
    a geometric fall.
    """
    out = np.empty(len(ranks))
    for (r0, c0), (r1, c1) in zip(knots[:-1], knots[1:], strict=True):
        inside = (ranks >= r0) & (ranks <= r1)
        a = np.log(c0 / c1) / np.log((s + r1) / (s + r0))
        out[inside] = c0 * ((s + ranks[inside]) / (s + r0)) ** -a
    return out


def _bands(counts: np.ndarray) -> tuple[int, int, int]:
    """Many (> 100), Medium (20-100) and Few (< 20) class counts."""
    many = int((counts > MANY_ABOVE).sum())
    few = int((counts < FEW_BELOW).sum())
    return many, len(counts) - many - few, few


def long_tail_counts(num_classes: int, most: int, least: int, total: int,
                     many: int | None = None, few: int | None = None) -> np.ndarray:
    """Descending per-class counts from ``most`` to ``least`` that sum to exactly ``total``.

    The curve is :func:`_segment_curve` through the knots ``(0, most)``, ``(n - 1, least)`` and,
    when ``many`` / ``few`` are given, ``(many - 0.5, 100.5)`` / ``(n - few - 0.5, 19.5)``: the
    curve crosses each band edge half-way between two ranks, so rounding puts exactly ``many``
    classes above 100 and ``few`` below 20. The offset ``s`` is found by bisection so that the
    rounded counts sum to ``total``; when no ``s`` lands on it exactly, the remaining units go one
    at a time to the classes whose rounding lost (or gained) the most, among those that can move
    without breaking the order, the band edges or the end points.
    """
    n = num_classes
    knots = [(0.0, float(most))]
    if many is not None:
        knots.append((many - 0.5, MANY_ABOVE + 0.5))
    if few is not None:
        knots.append((n - few - 0.5, FEW_BELOW - 0.5))
    knots.append((n - 1.0, float(least)))
    ranks = np.arange(n, dtype=float)

    def rounded(s: float) -> tuple[np.ndarray, np.ndarray]:
        exact = _segment_curve(ranks, knots, s)
        return exact, np.rint(exact).astype(np.int64)

    lo, hi = np.log(1e-3), np.log(1e6)
    if not rounded(np.exp(lo))[1].sum() <= total <= rounded(np.exp(hi))[1].sum():
        raise ValueError(f"no curve from {most} to {least} over {n} classes sums to {total}")
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        exact, counts = rounded(np.exp(mid))
        if counts.sum() == total:
            break
        lo, hi = (mid, hi) if counts.sum() < total else (lo, mid)
    _fix_remainder(counts, exact, total)
    return counts


def _fix_remainder(counts: np.ndarray, exact: np.ndarray, total: int) -> None:
    """Move the rounded ``counts`` by single units, in place, until they sum to ``total``."""
    n = len(counts)
    while (gap := total - int(counts.sum())) != 0:
        step = 1 if gap > 0 else -1
        moved = counts + step
        before = np.r_[np.iinfo(np.int64).max, counts[:-1]]
        after = np.r_[counts[1:], 0]
        ok = (moved <= before) & (moved >= after)
        ok &= (counts > MANY_ABOVE) == (moved > MANY_ABOVE)
        ok &= (counts < FEW_BELOW) == (moved < FEW_BELOW)
        ok[[0, n - 1]] = False
        if not ok.any():
            raise ValueError(f"cannot place the last {gap} unit(s) of the total {total}")
        residual = step * (exact - counts)
        counts[np.flatnonzero(ok)[np.argmax(residual[ok])]] += step


def imagenet_lt_counts() -> np.ndarray:
    """ImageNet-LT's training counts: 1,000 classes from 1,280 down to 5, 115,846 images.

    Matched exactly: class count, maximum, minimum, total, and the split that ImageNet-LT's
    test results report: 385 Many (> 100 images), 479 Medium (20-100), 136 Few (< 20) classes.
    The curve between the band edges is a Pareto-like (Zipf-Mandelbrot) fall, see
    :func:`long_tail_counts` (offset s = 14.3; exponents 0.77 Many, 2.08 Medium, 9.48 Few: the
    Few band falls steeply, as ImageNet-LT's 136 Few classes require); single classes differ
    from the real list.
    """
    return long_tail_counts(1000, 1280, 5, 115_846, many=385, few=136)


def places_lt_counts() -> np.ndarray:
    """Places-LT's training counts: 365 classes from 4,980 down to 5, 62,500 images.

    Matched exactly: class count, maximum, minimum and total. Places-LT's Many/Medium/Few split
    is not matched (no published class numbers were at hand): it is what a single
    Zipf-Mandelbrot curve between the end points gives (offset s = 13.1, exponent 2.05; 75 Many,
    107 Medium, 183 Few), see :func:`long_tail_counts`.
    """
    return long_tail_counts(365, 4980, 5, 62_500)


@dataclass(frozen=True)
class Layout:
    """File names of one real data set: list prefix, class folders and image names."""

    prefix: str
    counts: Callable[[], np.ndarray]
    class_id: Callable[[int], str]
    train_name: Callable[[str, int], str]
    test_name: Callable[[str, int], str]


LAYOUTS: dict[str, Layout] = {
    "imagenet_lt": Layout(
        "ImageNet_LT", imagenet_lt_counts, lambda c: f"n{c:08d}",
        lambda cid, i: f"train/{cid}/{cid}_{i:05d}.JPEG",
        lambda cid, i: f"val/{cid}/ILSVRC2012_val_{i:08d}.JPEG"),
    "places_lt": Layout(
        "Places_LT", places_lt_counts, lambda c: f"c{c:03d}",
        lambda cid, i: f"train/{cid}/{cid}_{i:05d}.jpg",
        lambda cid, i: f"val/{cid}/Places365_val_{i:08d}.jpg"),
}


def class_subset(counts: np.ndarray, num_classes: int | None) -> np.ndarray:
    """Indices of ``num_classes`` classes spread evenly over the profile (all when None)."""
    if num_classes is None or num_classes >= len(counts):
        return np.arange(len(counts))
    if num_classes < 2:
        raise ValueError("num_classes must be at least 2")
    return np.unique(np.rint(np.linspace(0, len(counts) - 1, num_classes)).astype(int))


@lru_cache(maxsize=4096)
def _prototype(seed: int, class_id: int, size: int) -> np.ndarray:
    """The class's pattern: a random 4x4x3 grid, bilinearly upsampled to ``size``."""
    grid = np.random.default_rng([seed, class_id]).uniform(0.1, 0.9, (4, 4, 3))
    pos = np.linspace(0.0, 3.0, size)
    left = np.minimum(pos.astype(int), 2)
    frac = pos - left
    weights = np.zeros((size, 4))
    weights[np.arange(size), left] = 1.0 - frac
    weights[np.arange(size), left + 1] = frac
    return np.einsum("ij,jkc,lk->ilc", weights, grid, weights)


def render(seed: int, class_id: int, split: int, index: int, size: int) -> np.ndarray:
    """One uint8 (size, size, 3) image: the class pattern, shifted by up to 2 pixels, plus noise."""
    rng = np.random.default_rng([seed, class_id, split, index])
    base = _prototype(seed, class_id, size + 2 * SHIFT)
    dy, dx = rng.integers(0, 2 * SHIFT + 1, 2)
    image = base[dy:dy + size, dx:dx + size] + rng.normal(0.0, NOISE, (size, size, 3))
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)


def _write_chunk(job: tuple[str, int, int, list[tuple[str, int, int, int]]]) -> tuple[int, int]:
    """Render and write one chunk of images; returns (files, bytes)."""
    root, size, seed, items = job
    written = 0
    for rel, class_id, split, index in items:
        buffer = io.BytesIO()
        Image.fromarray(render(seed, class_id, split, index, size)).save(
            buffer, format="JPEG", quality=QUALITY)
        data = buffer.getvalue()
        (Path(root) / rel).write_bytes(data)
        written += len(data)
    return len(items), written


def _plan(layout: Layout, classes: np.ndarray, counts: np.ndarray, val_per_class: int,
          test_per_class: int, folders: bool = False
          ) -> dict[str, list[tuple[str, int, int, int]]]:
    """Every file of every split as (relative path, class id, split number, index); with
    ``folders`` each split in its own class folders."""
    plan: dict[str, list[tuple[str, int, int, int]]] = {split: [] for split in SPLITS}
    test_index = 0
    for class_id, count in zip(classes.tolist(), counts.tolist(), strict=True):
        cid = layout.class_id(class_id)
        for i in range(count):
            plan["train"].append((layout.train_name(cid, i), class_id, 0, i))
        for i in range(count, count + val_per_class):
            name = layout.train_name(cid, i)
            plan["val"].append((name.replace("train/", "val/", 1) if folders else name,
                                class_id, 1, i))
        for _ in range(test_per_class):
            test_index += 1
            name = layout.test_name(cid, test_index)
            plan["test"].append((name.replace("val/", "test/", 1) if folders else name,
                                 class_id, 2, test_index))
    return plan


def disk_usage(path: Path) -> int:
    """Bytes that the files under ``path`` take on disk (allocated blocks, as ``du``)."""
    total = 0
    for folder, _, names in os.walk(path):
        total += sum(os.stat(os.path.join(folder, name)).st_blocks * 512 for name in names)
    return total


def write_lt_shape(out: Path, kind: Kind, image_size: int = 16, val_per_class: int = 2,
                   test_per_class: int = 4, seed: int = 0, num_classes: int | None = None,
                   workers: int = 2, folders: bool = False) -> dict[str, Any]:
    """Write a data set of ``kind``'s shape to ``out``: split lists, JPEG files, class names.

    ``num_classes`` keeps that many classes spread evenly over the profile (labels 0..n-1 in
    profile order). As in the real sets, validation images sit in the ``train/`` folders and
    test images in ``val/`` (with ``folders``: in ``val/`` and ``test/``). Existing files of
    the same names are overwritten. Images are
    written by ``workers`` processes in chunks. Returns the summary: classes, files per split,
    Many/Medium/Few, seconds, bytes written and on disk.
    """
    layout = LAYOUTS[kind]
    started = time.perf_counter()
    profile = layout.counts()
    classes = class_subset(profile, num_classes)
    counts = profile[classes]
    plan = _plan(layout, classes, counts, val_per_class, test_per_class, folders)
    label_of = {class_id: label for label, class_id in enumerate(classes.tolist())}

    out.mkdir(parents=True, exist_ok=True)
    manifest = ["path,label,split\n"]
    for split, items in plan.items():
        lines = [f"{rel} {label_of[class_id]}\n" for rel, class_id, _, _ in items]
        (out / f"{layout.prefix}_{split}.txt").write_text("".join(lines))
        manifest += [f"{rel},{label_of[class_id]},{split}\n" for rel, class_id, _, _ in items]
    (out / "manifest.csv").write_text("".join(manifest))
    (out / "class_names.txt").write_text(
        "".join(f"{layout.class_id(c)}\n" for c in classes.tolist()))
    for folder in sorted({str(Path(rel).parent) for items in plan.values()
                          for rel, *_ in items}):
        (out / folder).mkdir(parents=True, exist_ok=True)

    items = [item for split in SPLITS for item in plan[split]]
    jobs = [(str(out), image_size, seed, items[i:i + CHUNK]) for i in range(0, len(items), CHUNK)]
    written = 0
    with tqdm(total=len(items), desc=f"writing {kind}", unit="img", mininterval=1.0) as bar:
        if workers <= 1:
            results = map(_write_chunk, jobs)
            for files, size in results:
                written += size
                bar.update(files)
        else:
            with multiprocessing.get_context("fork").Pool(workers) as pool:
                for files, size in pool.imap_unordered(_write_chunk, jobs):
                    written += size
                    bar.update(files)
    seconds = time.perf_counter() - started
    many, medium, few = _bands(counts)
    return {
        "kind": kind, "out": str(out), "classes": len(classes), "image_size": image_size,
        "files": {split: len(plan[split]) for split in SPLITS},
        "many": many, "medium": medium, "few": few,
        "max": int(counts.max()), "min": int(counts.min()),
        "seconds": round(seconds, 2), "bytes_written": written,
        "bytes_on_disk": disk_usage(out),
    }


def save_tiny_unclip(out: Path) -> Path:
    """Save the tiny random SD 2.1 unCLIP stand-in to ``out`` in the Hugging Face layout."""
    from ray_lt.generate.unclip import save_components
    from ray_lt.testing import tiny_unclip_components

    save_components(tiny_unclip_components(), out)
    return out


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=sorted(LAYOUTS))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--val-per-class", type=int, default=2)
    parser.add_argument("--test-per-class", type=int, default=4)
    parser.add_argument("--classes", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--folders", action="store_true",
                        help="each split in its own class folders (dataset.kind: folder)")
    parser.add_argument("--unclip", type=Path, default=None,
                        help="also save the tiny random unCLIP stand-in to this folder")
    args = parser.parse_args(argv)
    summary = write_lt_shape(args.out, args.kind, args.image_size, args.val_per_class,
                             args.test_per_class, args.seed, args.classes, args.workers,
                             args.folders)
    files = summary["files"]
    print(f"{args.kind}: {summary['classes']} classes, counts {summary['max']}..{summary['min']}; "
          f"train {files['train']}, val {files['val']}, test {files['test']} images "
          f"of {args.image_size}x{args.image_size}")
    print(f"Many {summary['many']}, Medium {summary['medium']}, Few {summary['few']} classes")
    print(f"{summary['seconds']:.1f} s, {_mib(summary['bytes_written'])} written, "
          f"{_mib(summary['bytes_on_disk'])} on disk in {args.out}")
    if args.unclip is not None:
        started = time.perf_counter()
        path = save_tiny_unclip(args.unclip)
        print(f"tiny unCLIP saved to {path} in {time.perf_counter() - started:.1f} s "
              f"({_mib(disk_usage(path))} on disk)")
    return summary


if __name__ == "__main__":
    main()
