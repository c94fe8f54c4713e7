"""One progress bar on the driver for a Ray Train run (epochs or steps), and the word that
its loss is no longer finite.

The training workers run in Ray actors whose output stays off the terminal, so rank 0 posts
its count to a small actor (``report_progress``) and a thread on the driver draws it with tqdm
while ``TorchTrainer.fit`` blocks. The count is absolute: a resumed run starts where its
checkpoint left off. A loop whose loss stops being finite posts where (``report_divergence``)
and returns without a checkpoint; the driver then raises (``ray_lt.train.trainer``).
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator
from typing import Any

import ray
import torch
from tqdm.auto import tqdm

PROGRESS_KEY = "progress"  # the train_loop_config key that carries the counter's handle
POLL_SECONDS = 1.0


@ray.remote(num_cpus=0)
class ProgressCounter:
    """The latest count and short metrics (e.g. the loss) posted by rank 0, and where the loss
    stopped being finite, if it did."""

    def __init__(self) -> None:
        self.count, self.postfix, self.diverged = 0, {}, None

    def update(self, count: int, postfix: dict[str, float]) -> None:
        self.count, self.postfix = int(count), dict(postfix)

    def diverge(self, at: int, loss: float, last_checkpoint: int | None) -> None:
        self.diverged = {"at": int(at), "loss": float(loss), "last_checkpoint": last_checkpoint}

    def get(self) -> tuple[int, dict[str, float]]:
        return self.count, self.postfix

    def divergence(self) -> dict[str, Any] | None:
        return self.diverged


def report_progress(config: dict[str, Any], count: int, **postfix: float) -> None:
    """From a training worker: post ``count`` (epochs or steps done) to the driver's bar, if
    the run has one. Fire and forget; call it on rank 0 only."""
    counter = config.get(PROGRESS_KEY)
    if counter is not None:
        counter.update.remote(count, {k: round(float(v), 4) for k, v in postfix.items()})


def finite_everywhere(value: float, device: torch.device) -> bool:
    """Whether ``value`` (this worker's loss) is finite on every worker of the group: one
    all-reduce, so that all of them stop at the same point when one is not."""
    bad = torch.tensor([0.0 if math.isfinite(value) else 1.0], device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(bad)
    return float(bad) == 0.0


def report_divergence(config: dict[str, Any], at: int, loss: float,
                      last_checkpoint: int | None) -> None:
    """From rank 0: the loss is no longer finite at epoch or step ``at``; the last finite
    checkpoint was made at ``last_checkpoint`` (None: there is none)."""
    counter = config.get(PROGRESS_KEY)
    if counter is not None:
        ray.get(counter.diverge.remote(at, loss, last_checkpoint))


def divergence(config: dict[str, Any]) -> dict[str, Any] | None:
    """On the driver, after fit: what ``report_divergence`` posted, None if nothing."""
    return ray.get(config[PROGRESS_KEY].divergence.remote())


@contextlib.contextmanager
def train_progress(config: dict[str, Any], desc: str, total: int, unit: str,
                   bar: bool = True) -> Iterator[dict[str, Any]]:
    """Yield ``config`` with a counter added, drawing ``desc`` as a tqdm bar of ``total``
    ``unit`` until the block ends (no bar with ``bar=False``: the counter alone, which also
    carries ``report_divergence``)."""
    counter = ProgressCounter.remote()
    if not bar:
        try:
            yield {**config, PROGRESS_KEY: counter}
        finally:
            ray.kill(counter)
        return
    stop = threading.Event()
    bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, mininterval=1.0)

    def poll() -> None:
        while not stop.wait(POLL_SECONDS):
            try:
                count, postfix = ray.get(counter.get.remote(), timeout=10)
            except Exception:  # the bar is cosmetic: never fail a run over it
                continue
            if count != bar.n:
                bar.set_postfix(postfix, refresh=False)
                bar.update(count - bar.n)

    thread = threading.Thread(target=poll, name=f"progress-{desc}", daemon=True)
    thread.start()
    try:
        yield {**config, PROGRESS_KEY: counter}
        count, postfix = ray.get(counter.get.remote())
        bar.set_postfix(postfix, refresh=False)
        bar.update(count - bar.n)
    finally:
        stop.set()
        thread.join()
        bar.close()
        ray.kill(counter)
