"""Training input pipeline at 224 px: the project's Ray Data path vs a torchvision DataLoader.

    python bench/input_pipeline.py [--images 2000] [--cpus 2] [--repeats 3] [--data DIR]

Both sides read the same JPEG files (ImageNet-sized, written once into a temp folder or
``--data DIR``), apply a random-resized crop (scale 0.08-1) to 224 px plus a horizontal flip
and hand float (B, 3, 224, 224) batches in [0, 1] to the consuming process, on K CPU cores:

* ``ray``: the dataset ``ray_lt.data`` builds for training (``decode_batch`` in
  ``map_batches`` on a local K-CPU Ray instance), read with ``iter_torch_batches`` and
  augmented with ``augment_batch`` in this process, as the Ray Train worker does;
* ``ray-gpu-crop``: the same without the crop and flip, which the Ray Train worker runs on
  its training device (``augment_batch`` after ``to_images``): what a GPU node's CPUs do;
* ``dataloader``: ``torch.utils.data.DataLoader`` with K workers over the files with
  ``RandomResizedCrop(224)``, ``RandomHorizontalFlip()`` and ``PILToTensor()``.

The Ray side crops within the stored 224 px centre crop, as training does; the DataLoader
within the whole image. The consuming process uses one torch thread on both sides.

After a warm-up pass of each, whole passes are timed, alternating the two sides; prints one
line per pass, then the median images/s, images/s per core (images/s / K) and CPU ms per image
(user + system time of this process and all its descendants, which stays meaningful when other
work shares the machine), and the Ray / DataLoader ratios of both.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import psutil
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

if TYPE_CHECKING:
    import ray.data

SIZE = 224
SCALE = (0.08, 1.0)


def write_jpegs(folder: Path, n: int, seed: int = 0) -> list[str]:
    """Write ``n`` ImageNet-like JPEGs (about 500x375, smooth fields plus noise, quality 90).

    Returns their file names relative to ``folder``.
    """
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        w = int(np.clip(rng.normal(500, 40), 333, 640))
        h = int(np.clip(w * rng.choice([0.75, 0.75, 0.75, 0.667, 1.0, 1.333]), 250, 640))
        coarse = Image.fromarray(rng.integers(0, 256, (h // 48 + 2, w // 48 + 2, 3), np.uint8))
        fine = Image.fromarray(rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), np.uint8))
        image = (0.8 * np.asarray(coarse.resize((w, h), Image.Resampling.BICUBIC), np.float32)
                 + 0.2 * np.asarray(fine.resize((w, h), Image.Resampling.BILINEAR), np.float32)
                 + rng.normal(0.0, 6.0, (h, w, 3)).astype(np.float32))
        name = f"img_{i:05d}.jpg"
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(
            folder / name, quality=90)
        names.append(name)
    return names


def file_table(folder: Path, n: int) -> pd.DataFrame:
    """The ``path, label, group`` table of the JPEGs in ``folder``, writing ``n`` if none."""
    names = sorted(p.name for p in folder.glob("*.jpg")) or write_jpegs(folder, n)
    labels = np.random.default_rng(1).integers(0, 10, len(names))
    return pd.DataFrame({"path": names, "label": labels, "group": -1})


class FileImages(Dataset):
    """(image, label) pairs of files under ``root``, read with PIL and torchvision transforms."""

    def __init__(self, root: Path, table: pd.DataFrame, transform: Callable) -> None:
        self.paths = [str(root / p) for p in table["path"]]
        self.labels = table["label"].tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        with Image.open(self.paths[i]) as img:
            return self.transform(img.convert("RGB")), self.labels[i]


def dataloader(root: Path, table: pd.DataFrame, workers: int, batch_size: int) -> DataLoader:
    """The torchvision baseline: ``workers`` persistent processes decode and augment."""
    transform = transforms.Compose([transforms.RandomResizedCrop(SIZE, scale=SCALE),
                                    transforms.RandomHorizontalFlip(),
                                    transforms.PILToTensor()])
    return DataLoader(FileImages(root, table, transform), batch_size=batch_size, shuffle=True,
                      num_workers=workers, persistent_workers=True)


def dataloader_pass(loader: DataLoader) -> int:
    """One epoch of float batches in [0, 1]; returns the number of images."""
    seen = 0
    for images, _ in loader:
        x = images.float().div_(255.0)
        seen += len(x)
    return seen


def ray_dataset(root: Path, table: pd.DataFrame) -> ray.data.Dataset:
    """The training dataset exactly as ``ray_lt.data`` builds it, with the columns it trains on."""
    import numpy as np

    from ray_lt.data import LongTailData

    table = table.assign(source=table["path"])
    data = LongTailData({"train": table, "val": table, "test": table},
                        np.bincount(table["label"]), [], (SIZE, SIZE, 3), root=root)
    return data.train.select_columns(["image", "label"])


def ray_pass(ds: ray.data.Dataset, batch_size: int, shuffle_buffer: int,
             generator: torch.Generator, crop: bool = True) -> int:
    """One epoch as the Ray Train worker reads it: ``iter_torch_batches``, ``to_images``,
    ``augment_batch``; returns the number of images. ``crop=False`` leaves out the crop and
    flip, which the worker runs on its training device: on a GPU node they cost no CPU."""
    from ray_lt.train.augment import augment_batch
    from ray_lt.train.loop import to_images

    seen = 0
    for batch in ds.iter_torch_batches(batch_size=batch_size,
                                       local_shuffle_buffer_size=shuffle_buffer or None):
        x = to_images(batch, torch.device("cpu"))
        if crop:
            x = augment_batch(x, 0, SCALE, True, generator)
        seen += len(x)
    return seen


def tree_cpu_seconds() -> float:
    """User + system CPU seconds of this process and all its descendants (Ray's processes and
    the DataLoader's workers): the work done, whatever else runs on the machine."""
    me = psutil.Process()
    total = 0.0
    for proc in [me, *me.children(recursive=True)]:
        try:
            times = proc.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def timed(run: Callable[[], int]) -> tuple[float, float]:
    """Images per second of one call of ``run`` and CPU milliseconds per image it used."""
    cpu, started = tree_cpu_seconds(), time.perf_counter()
    seen = run()
    wall = time.perf_counter() - started
    return seen / wall, 1000 * (tree_cpu_seconds() - cpu) / seen


def summary(results: dict[str, list[tuple[float, float]]], cpus: int) -> Iterable[str]:
    """The table lines: median images/s, per core and CPU ms per image of each side, then the
    Ray / DataLoader ratios (also per pair of passes run one after the other, which keeps
    load from other work on the machine out of the ratio)."""
    yield (f"{'pipeline':<14}{'K':>3}{'images/s':>10}{'per core':>10}{'cpu ms/img':>12}"
           "   passes (images/s)")
    rate, cpu_ms = {}, {}
    for name, passes in results.items():
        rate[name] = statistics.median(r for r, _ in passes)
        cpu_ms[name] = statistics.median(c for _, c in passes)
        shown = " ".join(f"{r:.0f}" for r, _ in passes)
        yield (f"{name:<14}{cpus:>3}{rate[name]:>10.1f}{rate[name] / cpus:>10.1f}"
               f"{cpu_ms[name]:>12.2f}   {shown}")
    for name in [n for n in results if n != "dataloader"]:
        pairs = zip(results[name], results["dataloader"], strict=True)
        paired = statistics.median(r / d for (r, _), (d, _) in pairs)
        yield (f"{name} / dataloader: images/s per core {rate[name] / rate['dataloader']:.2f} "
               f"(median of the passes' pairwise ratios {paired:.2f}), "
               f"CPU per image {cpu_ms[name] / cpu_ms['dataloader']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--cpus", type=int, default=2, help="K: Ray CPUs = DataLoader workers")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes of each side")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--shuffle-buffer", type=int, default=0,
                        help="Ray side's local_shuffle_buffer_size (training default: 2048)")
    parser.add_argument("--data", type=Path, help="folder of *.jpg to reuse (written if empty)")
    args = parser.parse_args()

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data or Path(tmp)
        started = time.perf_counter()
        table = file_table(root, args.images)
        print(f"{len(table)} JPEGs in {root} ({time.perf_counter() - started:.1f} s)", flush=True)

        # Start the DataLoader's workers before Ray's threads exist in this process.
        loader = dataloader(root, table, args.cpus, args.batch_size)
        warm = {"dataloader": timed(lambda: dataloader_pass(loader))[0]}

        import ray

        ray.init(address="local", num_cpus=args.cpus, include_dashboard=False,
                 log_to_driver=False, logging_level=logging.WARNING)
        ray.data.DataContext.get_current().enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        ds = ray_dataset(root, table)
        generator = torch.Generator().manual_seed(0)
        sides = {"ray": lambda: ray_pass(ds, args.batch_size, args.shuffle_buffer, generator),
                 "ray-gpu-crop": lambda: ray_pass(ds, args.batch_size, args.shuffle_buffer,
                                                  generator, crop=False),
                 "dataloader": lambda: dataloader_pass(loader)}
        warm["ray"] = timed(sides["ray"])[0]
        print("warm-up: " + ", ".join(f"{k} {v:.0f} images/s" for k, v in warm.items()),
              flush=True)
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in sides}
        for i in range(args.repeats):
            for name, run in sides.items():
                rate, cpu_ms = timed(run)
                results[name].append((rate, cpu_ms))
                print(f"pass {i + 1} {name:<12} {rate:7.1f} images/s {cpu_ms:6.2f} CPU ms/image",
                      flush=True)
        ray.shutdown()
    for line in summary(results, args.cpus):
        print(line)


if __name__ == "__main__":
    main()
