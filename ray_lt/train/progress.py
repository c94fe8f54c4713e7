"""One progress bar on the driver for a Ray Train run (epochs or steps).

The training workers run in Ray actors whose output stays off the terminal, so rank 0 posts
its count to a small actor (``report_progress``) and a thread on the driver draws it with tqdm
while ``TorchTrainer.fit`` blocks. The count is absolute: a resumed run starts where its
checkpoint left off.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import ray
from tqdm.auto import tqdm

PROGRESS_KEY = "progress"  # the train_loop_config key that carries the counter's handle
POLL_SECONDS = 1.0


@ray.remote(num_cpus=0)
class ProgressCounter:
    """The latest count and short metrics (e.g. the loss) posted by rank 0."""

    def __init__(self) -> None:
        self.count, self.postfix = 0, {}

    def update(self, count: int, postfix: dict[str, float]) -> None:
        self.count, self.postfix = int(count), dict(postfix)

    def get(self) -> tuple[int, dict[str, float]]:
        return self.count, self.postfix


def report_progress(config: dict[str, Any], count: int, **postfix: float) -> None:
    """From a training worker: post ``count`` (epochs or steps done) to the driver's bar, if
    the run has one. Fire and forget; call it on rank 0 only."""
    counter = config.get(PROGRESS_KEY)
    if counter is not None:
        counter.update.remote(count, {k: round(float(v), 4) for k, v in postfix.items()})


@contextlib.contextmanager
def train_progress(config: dict[str, Any], desc: str, total: int, unit: str
                   ) -> Iterator[dict[str, Any]]:
    """Yield ``config`` with a counter added, drawing ``desc`` as a tqdm bar of ``total``
    ``unit`` until the block ends."""
    counter = ProgressCounter.remote()
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
