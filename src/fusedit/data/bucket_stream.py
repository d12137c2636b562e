"""Micro-batches of one aspect-ratio bucket from a resumable shard stream, resumable exactly mid-epoch.

:class:`BucketBatchStream` wraps a :class:`~fusedit.data.shards.ShardStream` whose samples come in several sizes
(:class:`~fusedit.data.webdataset.WebShardDataset` with buckets, or a latent cache written per bucket) and yields
whole micro-batches: each worker keeps one buffer per sample size (``image.shape``) and emits a buffer as a batch the
moment it holds ``batch_size`` samples. Buffers carry over epoch boundaries (the stream is endless), so nothing is
dropped; a finite inner stream (``epochs`` set) ends with its partial batches.

Position. After a batch, a worker's position is the inner stream's position (after the sample that completed the
batch) plus the samples still waiting in its buffers, each named by ``(epoch, cursor, offset)`` — where it sits in
that worker's reading order. A batch carries both: ``stream_pos`` ``(1, 6)`` (see :mod:`fusedit.data.shards`) and
``pending`` ``(K, 3)`` int64 rows in reading order. :meth:`mark_consumed` records them per worker; on resume each
worker decodes its pending samples again (:meth:`ShardStream.samples_at`: same bytes, same per-sample generator,
so the same tensors) into its buffers, then continues the inner stream: the batches that follow are those of the
uninterrupted run. Ranks read disjoint shards (the inner stream's split), so every rank's batches are its own.
With DataLoader workers, the loader takes batches from the workers in turn starting at worker 0, so the order is
exact when the number of batches taken before the checkpoint is a multiple of ``num_workers`` (each worker's own
sequence is exact either way), as for unbucketed streams.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import IterableDataset

from fusedit.data.shards import STREAM_POS_KEY, ShardStream

__all__ = ["BucketBatchStream"]

_FORMAT = "fusedit-bucket-stream"


class BucketBatchStream(IterableDataset):
    """Batches of same-size samples from ``stream`` (see the module docstring). Read it with a DataLoader of
    ``batch_size=None``; each item is ``{"image": (B, C, h, w), "caption": [str] * B, "is_latent": bool,
    "stream_pos": int64 (1, 6), "pending": int64 (K, 3)}``.

    Args:
        stream: the inner stream (``epochs=None`` for training).
        batch_size: samples per batch (this rank's micro-batch); may be set later with :meth:`configure_batches`.
    """

    #: read by :class:`~fusedit.train.data_order.TrainingData`: the items are whole batches
    yields_batches = True

    def __init__(self, stream: ShardStream, batch_size: int | None = None):
        super().__init__()
        self.stream = stream
        self.batch_size = batch_size
        self._pending: dict[int, list[list[int]]] = {}

    # ---- what the trainer reads off a stream -------------------------------------------------------------------

    @property
    def rank(self) -> int:
        return self.stream.rank

    @property
    def world_size(self) -> int:
        return self.stream.world_size

    @property
    def skipped(self) -> int:
        return self.stream.skipped

    @property
    def bad_samples(self) -> list[str]:
        return self.stream.bad_samples

    def configure_batches(self, batch_size: int) -> None:
        """Set the micro-batch size (before iterating)."""
        if batch_size < 1:
            raise ValueError(f"batch_size: got {batch_size}, expected >= 1")
        self.batch_size = int(batch_size)

    # ---- state -------------------------------------------------------------------------------------------------

    def mark_consumed(self, batch: dict[str, Any]) -> None:
        """Record the position a taken batch carries (``stream_pos`` and ``pending``)."""
        pos = torch.as_tensor(batch[STREAM_POS_KEY]).reshape(-1, 6)
        pending = batch.get("pending")
        if pending is None:
            raise KeyError("mark_consumed: batch has no 'pending' entry (not from a BucketBatchStream?)")
        worker = int(pos[-1, 0])
        self.stream.mark_consumed({STREAM_POS_KEY: pos[-1:]})
        self._pending[worker] = torch.as_tensor(pending).reshape(-1, 3).tolist()

    def state_dict(self) -> dict[str, Any]:
        """The inner stream's state plus each worker's pending samples (JSON-able)."""
        state = self.stream.state_dict()
        state["buckets"] = {
            "format": _FORMAT,
            "batch_size": self.batch_size,
            "pending": {str(k): rows for k, rows in sorted(self._pending.items())},
        }
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict` (after :meth:`configure_batches`, before iterating)."""
        buckets = state.get("buckets") if isinstance(state, dict) else None
        if not isinstance(buckets, dict) or buckets.get("format") != _FORMAT:
            raise ValueError("load_state_dict: not a bucketed stream state (saved without data.buckets?)")
        pending = {int(k): [list(map(int, r)) for r in rows] for k, rows in buckets.get("pending", {}).items()}
        if buckets.get("batch_size") != self.batch_size:
            raise ValueError(
                f"load_state_dict: saved with {buckets.get('batch_size')} samples per batch, this run takes "
                f"{self.batch_size}; the bucket buffers do not apply"
            )
        self.stream.load_state_dict(state)
        self._pending = pending

    # ---- iteration ---------------------------------------------------------------------------------------------

    def _restore(self, worker: int, num_workers: int) -> list[tuple[dict[str, Any], tuple[int, int, int]]]:
        """This worker's pending samples, decoded again, with their ``(epoch, cursor, offset)``."""
        restored = []
        rows = self._pending.get(worker, [])
        for (epoch, cursor), group in itertools.groupby(rows, key=lambda r: (r[0], r[1])):
            offsets = [r[2] for r in group]
            shard = self.stream.worker_shards(epoch, worker, num_workers)[cursor]
            for offset, sample in zip(offsets, self.stream.samples_at(epoch, shard, offsets), strict=True):
                restored.append((sample, (epoch, cursor, offset)))
        return restored

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.batch_size is None:
            raise ValueError("BucketBatchStream: call configure_batches(batch_size) before iterating")
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        buffers: dict[tuple[int, ...], list[tuple[dict[str, Any], tuple[int, int, int]]]] = {}
        for sample, where in self._restore(worker, num_workers):
            buffers.setdefault(tuple(sample["image"].shape), []).append((sample, where))
        pos = torch.zeros(6, dtype=torch.int64)
        for sample in self.stream:
            pos = sample.pop(STREAM_POS_KEY)
            where = (int(pos[2]), int(pos[3]), int(pos[4]) - 1)
            group = buffers.setdefault(tuple(sample["image"].shape), [])
            group.append((sample, where))
            if len(group) < self.batch_size:
                continue
            del buffers[tuple(sample["image"].shape)]
            rest = sorted(w for waiting in buffers.values() for _, w in waiting)
            batch = _collate([s for s, _ in group])
            batch[STREAM_POS_KEY] = pos.reshape(1, 6)
            batch["pending"] = torch.tensor(rest, dtype=torch.int64).reshape(-1, 3)
            if info is None:
                self.mark_consumed(batch)
            yield batch
        # a finite stream (epochs set, e.g. for caching) ends with its partial batches, each still of one size
        while buffers:
            group = buffers.pop(next(iter(buffers)))
            batch = _collate([s for s, _ in group])
            batch[STREAM_POS_KEY] = pos.reshape(1, 6)
            rest = sorted(w for waiting in buffers.values() for _, w in waiting)
            batch["pending"] = torch.tensor(rest, dtype=torch.int64).reshape(-1, 3)
            yield batch


def _collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack same-size samples into one batch dict."""
    return {
        "image": torch.stack([s["image"] for s in samples]),
        "caption": [s["caption"] for s in samples],
        "is_latent": bool(samples[0].get("is_latent", False)),
    }
