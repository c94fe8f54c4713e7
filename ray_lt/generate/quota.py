"""Quotas and shards: how many synthetic samples each class (or group) gets, and how that work is
cut into deterministic, independently seeded shards (docs/method.md §4)."""

from __future__ import annotations

from fractions import Fraction
from numbers import Integral

import numpy as np

PAPER_TARGETS = {"imagenet_lt": 1300, "places_lt": 4980, "nico_pp": 811}
"""Real + synthetic samples per class (ImageNet-LT, Places-LT) or per class x context group
(NICO++) in the FG paper."""

SEED_LIMIT = 2**63
"""Every seed handed out is in ``[0, SEED_LIMIT)``: an int64 that ``torch.Generator.manual_seed``
accepts."""


def class_quotas(class_counts: np.ndarray, target: int | None, scale: float = 1.0,
                 minimum: int = 0) -> np.ndarray:
    """Synthetic samples per class that make real + synthetic uniform at ``target`` per class.

    ``quota_c = max(round_half_up(scale * max(target - n_c, minimum)), minimum)``; ``target``
    None means the largest class count, ``minimum=1`` is the FG release's ImageNet-LT rule
    ``max(1300 - n_c, 1)``, and ``scale`` in (0, 1] shrinks every quota for small budgets.
    """
    return _uniform_quotas(class_counts, target, scale, minimum, what="class_counts")


def group_quotas(group_counts: np.ndarray, target: int | None, scale: float = 1.0,
                 minimum: int = 0) -> np.ndarray:
    """:func:`class_quotas` per class x context group (NICO++: 811 per group).

    ``group_counts`` is flat, indexed by ``group = label * num_contexts + context``.
    """
    return _uniform_quotas(group_counts, target, scale, minimum, what="group_counts")


def _uniform_quotas(counts: np.ndarray, target: int | None, scale: float, minimum: int,
                    what: str) -> np.ndarray:
    counts = _count_vector(counts, what)
    if not _is_int(minimum) or minimum < 0:
        raise ValueError(f"minimum must be an integer >= 0, got {minimum!r}")
    if target is None:
        target = int(counts.max())
    elif not _is_int(target) or target < 1:
        raise ValueError(f"target must be an integer >= 1 or None (largest count), got {target!r}")
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not 0 < scale <= 1:
        raise ValueError(f"scale must be a number in (0, 1], got {scale!r}")
    # Exact rational arithmetic, so that e.g. 45 * 0.7 rounds half up to 32, not down to 31.
    num, den = Fraction(repr(float(scale))).as_integer_ratio()
    raw = np.maximum(int(target) - counts, minimum)
    return np.array([max((2 * int(r) * num + den) // (2 * den), minimum) for r in raw],
                    dtype=np.int64)


def plan_shards(quotas: np.ndarray, max_shard_size: int, seed: int, by_group: bool,
                num_contexts: int = 0, round_index: int = 1) -> list[dict]:
    """Cut each class (or group) quota into shards of at most ``max_shard_size`` rows.

    Shards are ordered by class (or group) index, then by position within it, and numbered 0, 1,
    ...; within a class the shards are full except the last. Each shard's seed comes from a numpy
    ``SeedSequence(seed, spawn_key=(label, group + 1, index))``, so it depends only on the config
    seed, the shard's class, group and index within that class or group: the same plan always
    gives the same seeds, and a different ``max_shard_size`` keeps the seed of the i-th shard of a
    class but changes how many rows it covers (hence which samples it draws).
    Rows: ``{"shard_id", "label", "group", "n", "seed"}``, ``group = -1`` when by class and
    ``label = group // num_contexts`` when by group. Rounds after the first (``round_index``
    > 1, closed-loop synthesis) add the round to the spawn key: their seeds differ from the
    first round's, whose seeds are those of one-shot synthesis.
    """
    quotas = _count_vector(quotas, "quotas")
    if not _is_int(max_shard_size) or max_shard_size < 1:
        raise ValueError(f"max_shard_size must be an integer >= 1, got {max_shard_size!r}")
    _check_seed(seed, "seed")
    if by_group:
        if not _is_int(num_contexts) or num_contexts < 1:
            raise ValueError(f"by_group=True needs num_contexts >= 1, got {num_contexts!r}")
        if len(quotas) % num_contexts:
            raise ValueError(f"{len(quotas)} group quotas is not a multiple of "
                             f"num_contexts={num_contexts}; expected num_classes * num_contexts")
    shards: list[dict] = []
    for unit, quota in enumerate(quotas.tolist()):
        label, group = (unit // num_contexts, unit) if by_group else (unit, -1)
        for index, start in enumerate(range(0, quota, max_shard_size)):
            key = (label, group + 1, index) + ((round_index,) if round_index > 1 else ())
            sequence = np.random.SeedSequence(int(seed), spawn_key=key)
            shards.append({"shard_id": len(shards), "label": label, "group": group,
                           "n": min(max_shard_size, quota - start),
                           "seed": _seed_words(sequence, 1)[0]})
    if len({s["seed"] for s in shards}) != len(shards):
        raise RuntimeError(f"two of {len(shards)} shard seeds collide for seed={seed}; "
                           "pick another seed")
    return shards


def per_sample_seeds(shard_seed: int, n: int) -> list[int]:
    """``n`` distinct seeds in ``[0, 2**63)`` for the samples of one shard, derived only from
    the shard seed, so that each sample can be redrawn on its own."""
    _check_seed(shard_seed, "shard_seed")
    if not _is_int(n) or n < 0:
        raise ValueError(f"n must be an integer >= 0, got {n!r}")
    seeds = _seed_words(np.random.SeedSequence(int(shard_seed)), int(n))
    if len(set(seeds)) != len(seeds):
        raise RuntimeError(f"two of {n} sample seeds collide for shard_seed={shard_seed}")
    return seeds


def _seed_words(sequence: np.random.SeedSequence, n: int) -> list[int]:
    # 64-bit words from the SeedSequence hash, top bit dropped to fit a signed int64.
    return [int(w) >> 1 for w in sequence.generate_state(n, dtype=np.uint64)]


def _count_vector(values: np.ndarray, what: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1 or len(array) == 0:
        raise ValueError(f"{what} must be a non-empty 1-D array, got shape {array.shape}")
    if array.dtype == bool or not (np.issubdtype(array.dtype, np.integer)
                                   or (np.issubdtype(array.dtype, np.floating)
                                       and np.all(np.isfinite(array))
                                       and np.all(array == np.round(array)))):
        raise ValueError(f"{what} must hold whole numbers, got dtype {array.dtype}")
    if (array < 0).any():
        raise ValueError(f"{what} must be >= 0; index {int(np.argmax(array < 0))} is "
                         f"{array[array < 0][0]}")
    return array.astype(np.int64)


def _check_seed(seed: int, what: str) -> None:
    if not _is_int(seed) or not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"{what} must be an integer in [0, 2**63), got {seed!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def round_shares(quotas: np.ndarray, count: int) -> list[np.ndarray]:
    """Each quota cut into ``count`` shares as equal as possible, the earlier rounds taking
    the remainder: the shares of every class (group) sum to its quota."""
    quotas = _count_vector(quotas, "quotas")
    if not _is_int(count) or count < 1:
        raise ValueError(f"count must be an integer >= 1, got {count!r}")
    base, extra = np.divmod(quotas, count)
    return [base + (extra > r) for r in range(count)]
