"""``GuidedSampler``: the Ray Data callable class that samples whole shards on a sampler actor.

The generator and the criterion scorer are built once per actor from the run directory; the
constructor takes the config, the run directory and a few names, nothing that grows with the
data set. A finished shard leaves the actor as raw pixels in an Arrow IPC buffer: PNG encoding
and Parquet writing happen in the writer stage after it (``ray_lt.generate.writer``), so the
actor goes straight on to its next shard.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from ray_lt.config import Config, SynthesisConfig
from ray_lt.generate.base import PRECISIONS
from ray_lt.generate.codec import to_ipc
from ray_lt.generate.criteria import draw_criteria
from ray_lt.generate.factory import build_generator, build_scorer
from ray_lt.generate.quota import per_sample_seeds
from ray_lt.generate.sampler import Guidance, Samples, guided_sample, sampling_strength

log = logging.getLogger(__name__)


def sample_finite(generator: Any, scorer: Any, label: int, group: int, ids: torch.Tensor,
                  seeds: list[int], s: SynthesisConfig, guidance: Guidance, where: str
                  ) -> tuple[Samples, torch.Tensor, torch.Tensor]:
    """One batch of (label, group), sampled and decoded for storing (float32 on the CPU).

    A sample whose decoded output is not finite (an fp16 overflow) is sampled again from its
    seed without autocast and decoded in float32; the returned mask ``redrawn`` marks it. One
    that is still not finite raises ``FloatingPointError`` naming ``where`` and its seeds: no
    NaN or black image is ever stored.
    """
    size = len(seeds)
    labels, groups = torch.full((size,), label), torch.full((size,), group)
    strength = sampling_strength(s)
    out = guided_sample(generator, scorer, labels, groups, ids, seeds, s.num_steps, s.cfg_scale,
                        guidance, s.eta, PRECISIONS[s.precision], strength)
    with torch.no_grad():
        decoded = generator.decode_output(out.latents).cpu().float()
    bad = ~torch.isfinite(decoded).flatten(1).all(dim=1)
    if not bad.any():
        return out, decoded, bad
    rows = bad.nonzero().flatten()
    bad_seeds = [seeds[i] for i in rows.tolist()]
    again = guided_sample(generator, scorer, labels[rows], groups[rows], ids[rows], bad_seeds,
                          s.num_steps, s.cfg_scale, guidance, s.eta, None, strength)
    with torch.no_grad():
        redone = generator.decode_output(again.latents, upcast=True).cpu().float()
    if not torch.isfinite(redone).all():
        raise FloatingPointError(f"synthesis {where}: seeds {bad_seeds[:10]} decode to "
                                 "non-finite values even in float32; the generator's weights "
                                 "are not usable")
    decoded[rows] = redone
    for field in ("latents", "criterion_before", "criterion_after", "guidance_norm",
                  "nonfinite_steps"):
        mine, theirs = getattr(out, field), getattr(again, field)
        mine[rows.to(mine.device)] = theirs.to(mine.device, mine.dtype)
    log.warning(f"synthesis {where}: {len(rows)} sample(s) were not finite in reduced "
                "precision and were redrawn from their seeds in float32")
    return out, decoded, bad


def saturated_fraction(pixels: np.ndarray) -> np.ndarray:
    """Per image of a uint8 (B, H, W, C) batch: the fraction of its values at 0 or 255, which
    guidance too strong for the generator drives its samples to."""
    flat = pixels.reshape(len(pixels), -1)
    return ((flat == 0) | (flat == 255)).mean(axis=1).astype(np.float32)


class GuidedSampler:
    """Samples shards ``{shard_id, label, group, n, seed}`` (+ ``scale``, ``round``) with the
    classifier in ``guide`` (default: the baseline's); each output row is one shard:
    ``shard_id``, ``n``, ``seconds`` and ``payload`` (the rows as Arrow IPC bytes)."""

    def __init__(self, config: dict[str, Any], run_dir: str, use_gpu: bool,
                 info: dict[str, Any], guide: str | None = None):
        self.cfg = Config.model_validate(config)
        self.run_dir = Path(run_dir)
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.generator = build_generator(self.cfg, self.run_dir, self.device, info)
        self.scorer = build_scorer(self.cfg, self.run_dir, self.device,
                                   classifier_dir=Path(guide) if guide else None)
        s = self.cfg.synthesis
        self.names = list(s.criteria)
        self.probabilities = [s.criteria[n] for n in self.names]
        self.guidance = Guidance.of(s)

    def sample_shard(self, shard: dict[str, Any]) -> pa.Table:
        """All rows of one shard, deterministic in its seed: ``pixels`` (raw uint8 bytes, the
        shape in the schema metadata) or ``feature``, plus the per-sample columns."""
        s = self.cfg.synthesis
        n = int(shard["n"])
        seeds = per_sample_seeds(int(shard["seed"]), n)
        ids = draw_criteria(self.names, self.probabilities, n,
                            torch.Generator().manual_seed(int(shard["seed"])))
        parts, shape = [], None
        # The shard's own scale when the plan sets one per class (synthesis.scale_by).
        scale = shard.get("scale")
        guidance = (self.guidance if scale is None or scale != scale  # NaN: a plan without
                    else dataclasses.replace(self.guidance, scale=float(scale)))
        for start in range(0, n, s.batch_size):
            chunk = seeds[start:start + s.batch_size]
            size = len(chunk)
            out, decoded, redrawn = sample_finite(
                self.generator, self.scorer, int(shard["label"]), int(shard["group"]),
                ids[start:start + size], chunk, s, guidance, f"shard {shard['shard_id']}")
            if decoded.dim() == 2:  # feature generator: pseudo-feature vectors
                payload = {"feature": pa.array(list(decoded.numpy()),
                                               type=pa.list_(pa.float32()))}
            else:
                pixels = (decoded.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
                shape = pixels.shape[1:]
                payload = {"pixels": pa.array([p.tobytes() for p in pixels], type=pa.binary()),
                           "saturated": saturated_fraction(pixels)}
            parts.append(pa.table({
                **payload,
                "label": pa.array(np.full(size, int(shard["label"]), np.int64)),
                "group": pa.array(np.full(size, int(shard["group"]), np.int64)),
                "criterion": [self.names[i] for i in ids[start:start + size].tolist()],
                "guidance_scale": pa.array(np.full(size, guidance.scale, np.float64)),
                "seed": pa.array(chunk, type=pa.int64()),
                "shard_id": pa.array(np.full(size, int(shard["shard_id"]), np.int64)),
                "criterion_before": out.criterion_before.numpy(),
                "criterion_after": out.criterion_after.numpy(),
                "guidance_norm": out.guidance_norm.numpy(),
                "nonfinite_steps": out.nonfinite_steps.numpy(),
                "redrawn": redrawn.numpy(),
                # what the generator reports per sample: its prompt, its img2img source row
                **out.record,
                # closed-loop synthesis: the round whose guide drew the sample
                **({"round": pa.array(np.full(size, int(shard["round"]), np.int64))}
                   if "round" in shard else {}),
            }))
        table = pa.concat_tables(parts)
        if shape is not None:
            table = table.replace_schema_metadata({"shape": ",".join(map(str, shape))})
        return table

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        done = []
        for shard in batch.to_dict("records"):
            started = time.perf_counter()
            table = self.sample_shard(shard)
            done.append({"shard_id": int(shard["shard_id"]), "n": table.num_rows,
                         "seconds": time.perf_counter() - started, "payload": to_ipc(table)})
        return pd.DataFrame(done)
