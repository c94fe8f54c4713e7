"""Small dataset shards kept in the training worker's memory after their first pass.

Every epoch of a Ray Train worker reads its shards through Ray Data: one execution per shard
and epoch, which costs about a second of fixed overhead whatever the size. For the small
splits (the digits' 200 validation images, a few hundred synthetic rows) that overhead is the
whole cost, so ``ResidentShard`` keeps the batches of a complete first pass when they fit in a
memory budget and serves the later passes from memory, reshuffled per pass with a seeded
generator when a shuffle is asked for. A shard that outgrows the budget stays streamed, its
local shuffle seeded per pass.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch


def _nbytes(batch: dict[str, torch.Tensor]) -> int:
    return sum(v.numel() * v.element_size() for v in batch.values())


class ResidentShard:
    """Wraps a Ray Data ``DataIterator`` (a Ray Train dataset shard) with the same
    ``iter_torch_batches`` call; see the module docstring."""

    def __init__(self, shard: Any, budget_bytes: int, seed: int):
        self.shard = shard
        self.budget_bytes = int(budget_bytes)
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.passes = 0
        self.columns: dict[str, torch.Tensor] | None = None
        self.streamed = self.budget_bytes <= 0

    @classmethod
    def from_columns(cls, columns: dict[str, torch.Tensor], seed: int = 0) -> ResidentShard:
        """A shard already in memory: its rows are the columns' (equal lengths), served as a
        resident shard's later passes are."""
        lengths = {len(v) for v in columns.values()}
        if len(lengths) != 1:
            raise ValueError(f"columns of unequal lengths {sorted(lengths)}")
        shard = cls(None, budget_bytes=0, seed=seed)
        shard.columns = dict(columns)
        return shard

    @property
    def resident(self) -> bool:
        return self.columns is not None

    def iter_torch_batches(self, batch_size: int, local_shuffle_buffer_size: int | None = None
                           ) -> Iterator[dict[str, torch.Tensor]]:
        if self.columns is not None:
            yield from self._from_memory(batch_size, bool(local_shuffle_buffer_size))
            return
        kept: list[dict[str, torch.Tensor]] = []
        size = 0
        self.passes += 1
        # A streamed pass's local shuffle is seeded too, differently per pass: with ordered
        # execution (``run_trainer``) the batches are a function of the seed alone.
        seed = self.seed * 1_000_003 + self.passes if local_shuffle_buffer_size else None
        for batch in self.shard.iter_torch_batches(
                batch_size=batch_size, local_shuffle_buffer_size=local_shuffle_buffer_size,
                local_shuffle_seed=seed):
            if not self.streamed:
                size += _nbytes(batch)
                if size > self.budget_bytes:
                    self.streamed, kept = True, []
                else:
                    kept.append(batch)
            yield batch
        if not self.streamed and kept:  # only a complete pass becomes resident
            self.columns = {k: torch.cat([b[k] for b in kept]) for k in kept[0]}

    def _from_memory(self, batch_size: int, shuffle: bool) -> Iterator[dict[str, torch.Tensor]]:
        n = len(next(iter(self.columns.values())))
        order = torch.randperm(n, generator=self.generator) if shuffle else torch.arange(n)
        for start in range(0, n, batch_size):
            rows = order[start:start + batch_size]
            yield {k: v[rows] for k, v in self.columns.items()}
