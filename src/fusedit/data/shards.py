"""Tar shards in the webdataset layout, read shard-per-rank and resumable mid-epoch without replaying the stream.

This module is the machinery; :mod:`fusedit.data.webdataset` (images + captions) and :mod:`fusedit.data.latents`
(latent caches) decode the samples.

Shard layout (the reference's, compatible with the ``webdataset`` library): consecutive tar members sharing a key
form one sample; the key is the member name up to the first dot of its base name, the rest is the extension —
``000123.image.jpg``, ``000123.synthetic_caption.txt``, ``000123.original_caption.txt``.

:class:`ShardStream` is the machinery (an ``IterableDataset``); subclasses only decode one sample:

* **split.** Each epoch the shard list (in order, or permuted by ``(seed, epoch)`` when ``shuffle``) is dealt
  shard-per-rank — rank ``r`` of ``w`` reads shards ``r, r+w, r+2w, …`` — and each rank's list is dealt again over
  its DataLoader workers (worker ``k`` of ``K`` takes every ``K``-th). Every sample is read by exactly one
  (rank, worker) per epoch. Ranks never exchange anything.
* **order.** Within a shard samples come in tar order, or permuted by ``(seed, epoch, shard)`` when ``shuffle``
  (the tar is indexed from its headers and read by seeking, so shuffling needs no buffer and stays resumable).
* **position.** A worker's position is ``(epoch, cursor, offset)``: the index of the shard in that worker's list
  for the epoch and the number of samples of that shard already taken (corrupt ones included). Resuming seeks to
  the shard and jumps to the offset: only tar headers are read, nothing before the offset is decoded.
* **randomness.** Per-sample choices (random crop, original-vs-synthetic caption) use a generator seeded by
  ``(seed, epoch, shard, sample index in the shard)``, so a resumed stream is identical to the uninterrupted one
  whatever the worker count that produced it.
* **corrupt samples** (undecodable image, missing/empty caption, unreadable member) are skipped, logged on the
  ``fusedit.data`` logger and counted (``skipped``, and ``bad_samples``: the latest few ``"shard:key: reason"``).

Checkpointing. Every sample carries ``sample["stream_pos"]``: int64 ``[worker, num_workers, epoch, cursor,
offset, skipped]`` (the position *after* it). Without workers the dataset object tracks its position itself.
With DataLoader workers (which iterate copies of the data set) call ``dataset.mark_consumed(batch)`` on every
batch the training loop takes; ``state_dict()`` then holds the position of every worker, and
``load_state_dict()`` (before ``iter(loader)``) makes each worker resume there. A state is tied to the shard
list, seed, shuffle, world size, rank and number of workers; a mismatch raises ``ValueError``. Corrupt samples
between the last consumed sample and a checkpoint may be counted again after resuming.

A shard spec is a path, a brace pattern (``data/train-{0000..0099}.tar``), a glob, a folder (its ``*.tar``), a URL
(``https://``, ``s3://``, ``gs://``) or ``pipe:CMD``, or a list of those (:mod:`fusedit.data.tar_index`). Remote
shards are read sequentially (:mod:`fusedit.data.remote`): samples in tar order (``shuffle`` permutes the shard
order only), resume re-reads the shard skipping samples by their headers, a broken connection is retried
``remote_retries`` times and then the rest of the shard is skipped, logged and counted in ``skipped``.
"""

from __future__ import annotations

import collections
import logging
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fusedit.data.errors import NoUsableDataError
from fusedit.data.remote import RemoteShardError, remote_records
from fusedit.data.tar_index import (
    CorruptSampleError,
    TarRecord,
    expand_shards,
    index_tar,
    is_remote,
    local_records,
)
from fusedit.data.transforms import CorruptImageError

__all__ = [
    "CorruptSampleError",
    "ShardStream",
    "STREAM_POS_KEY",
    "TarRecord",
    "expand_shards",
    "index_tar",
    "sample_generator",
]

logger = logging.getLogger("fusedit.data")

#: Key of the per-sample position tensor ``[worker, num_workers, epoch, cursor, offset, skipped]``.
STREAM_POS_KEY = "stream_pos"
_STATE_FORMAT = "fusedit-shard-stream"
_MAX_BAD_SAMPLES = 100
_MAX_WARNINGS = 20


# --------------------------------------------------------------------------------------------------------------------
# shard lists and tar indexes
# --------------------------------------------------------------------------------------------------------------------


def sample_generator(seed: int, epoch: int, shard: int, index: int) -> torch.Generator:
    """The generator of one sample's random choices, a pure function of ``(seed, epoch, shard, index)``."""
    state = np.random.SeedSequence([int(seed), int(epoch), int(shard), int(index)]).generate_state(2, np.uint64)
    return torch.Generator().manual_seed(int(state[0]) & 0x7FFF_FFFF_FFFF_FFFF)


def checked_original_caption_rate(rate: float) -> float:
    """``rate`` (the probability that a sample takes its stored original caption) as a float, refused outside 0..1."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"original_caption_rate: got {rate}, expected 0..1")
    return float(rate)


def takes_original_caption(generator: torch.Generator, rate: float) -> bool:
    """Whether a sample takes its original caption (when it has one): always exactly one draw from the sample's
    generator, so the draws after it do not depend on the rate or on which samples have an original caption."""
    return float(torch.rand((), generator=generator)) < rate


def _permutation(n: int, *entropy: int) -> list[int]:
    return np.random.default_rng(np.random.SeedSequence([int(e) for e in entropy])).permutation(n).tolist()


# --------------------------------------------------------------------------------------------------------------------
# the resumable stream
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class _Position:
    epoch: int = 0
    cursor: int = 0
    offset: int = 0
    skipped: int = 0


class ShardStream(torch.utils.data.IterableDataset):
    """Resumable shard-per-rank iteration over tar shards (see the module docstring). Subclasses implement
    :meth:`decode`.

    Args:
        shards: shard spec (see :func:`expand_shards`).
        seed: seed of the shard/sample permutations and of per-sample randomness.
        rank, world_size: this process's data-parallel rank and the number of ranks (default: from
            ``torch.distributed`` when initialised, else 0 and 1).
        shuffle: permute shards and samples within shards per epoch (deterministic in ``seed`` and epoch; the
            samples of remote shards stay in tar order).
        epochs: number of epochs, or ``None`` to repeat forever (training).
        remote_retries: reopenings of a remote shard whose stream broke before the rest of it is skipped.
    """

    def __init__(
        self,
        shards,
        *,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        shuffle: bool = False,
        epochs: int | None = None,
        remote_retries: int = 3,
    ):
        super().__init__()
        self.shards = expand_shards(shards)
        self.remote_retries = int(remote_retries)
        if rank is None or world_size is None:
            dist = torch.distributed
            initialised = dist.is_available() and dist.is_initialized()
            rank = (dist.get_rank() if initialised else 0) if rank is None else rank
            world_size = (dist.get_world_size() if initialised else 1) if world_size is None else world_size
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} / world_size {world_size}: expected 0 <= rank < world_size")
        if len(self.shards) < world_size:
            raise ValueError(
                f"{len(self.shards)} shards cannot be split shard-per-rank over {world_size} ranks; "
                f"write at least {world_size} shards"
            )
        if epochs is not None and epochs < 1:
            raise ValueError(f"epochs: got {epochs}, expected a positive integer or None (forever)")
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.shuffle, self.epochs = bool(shuffle), epochs
        self._positions: dict[int, _Position] = {}
        self._num_workers: int | None = None
        self._bad_samples: collections.deque[str] = collections.deque(maxlen=_MAX_BAD_SAMPLES)
        self._warnings = 0

    # ---- subclass hook -----------------------------------------------------------------------------------------

    def decode(self, record: TarRecord, read, generator: torch.Generator) -> dict[str, Any]:
        """Turn one sample into a dict. ``read(ext) -> bytes`` reads a member (:class:`CorruptSampleError` if absent).

        Raise :class:`CorruptSampleError` (or :class:`CorruptImageError`) to skip the sample.
        """
        raise NotImplementedError

    # ---- shard assignment --------------------------------------------------------------------------------------

    def shard_order(self, epoch: int) -> list[int]:
        """Indices into ``shards`` in this epoch's order (before the rank split)."""
        n = len(self.shards)
        return _permutation(n, self.seed, epoch, 0x5A4D) if self.shuffle else list(range(n))

    def worker_shards(self, epoch: int, worker: int = 0, num_workers: int = 1) -> list[int]:
        """Shard indices read by ``(this rank, worker)`` in ``epoch``: rank ``r`` takes ``r, r+w, …`` of the
        epoch's order, and worker ``k`` every ``num_workers``-th of those."""
        return self.shard_order(epoch)[self.rank :: self.world_size][worker::num_workers]

    # ---- state -------------------------------------------------------------------------------------------------

    @property
    def skipped(self) -> int:
        """Corrupt samples skipped so far by this rank (all workers; from consumed positions with workers)."""
        return sum(p.skipped for p in self._positions.values())

    @property
    def bad_samples(self) -> list[str]:
        """The latest ``"shard:key: reason"`` entries of skipped samples seen in this process (no workers)."""
        return list(self._bad_samples)

    def mark_consumed(self, batch: dict | Sequence[dict]) -> None:
        """Record the positions carried by a collated batch (``batch["stream_pos"]``: ``(B, 6)``) or by samples."""
        items = batch if isinstance(batch, (list, tuple)) else [batch]
        for item in items:
            pos = item.get(STREAM_POS_KEY) if isinstance(item, dict) else None
            if pos is None:
                raise KeyError(f"mark_consumed: batch has no {STREAM_POS_KEY!r} entry (collate dropped it?)")
            if isinstance(pos, (list, tuple)):  # a collate that kept per-sample tensors
                pos = torch.stack([torch.as_tensor(p) for p in pos])
            rows = torch.as_tensor(pos).reshape(-1, 6).tolist()
            for worker, num_workers, epoch, cursor, offset, skipped in rows:
                self._set(int(worker), int(num_workers), _Position(epoch, cursor, offset, skipped))

    def _set(self, worker: int, num_workers: int, position: _Position) -> None:
        if self._num_workers is not None and self._num_workers != num_workers:
            self._positions = {}
        self._num_workers = num_workers
        self._positions[worker] = position

    def state_dict(self) -> dict[str, Any]:
        """Position of every worker of this rank (JSON-able)."""
        return {
            "format": _STATE_FORMAT,
            "version": 1,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "num_shards": len(self.shards),
            "rank": self.rank,
            "world_size": self.world_size,
            "num_workers": self._num_workers,
            "workers": {str(k): vars(p).copy() for k, p in sorted(self._positions.items())},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict` (call before creating the DataLoader iterator)."""
        if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
            raise ValueError("load_state_dict: not a shard-stream state (missing format marker)")
        for name, mine in (
            ("num_shards", len(self.shards)),
            ("seed", self.seed),
            ("shuffle", self.shuffle),
            ("world_size", self.world_size),
            ("rank", self.rank),
        ):
            if state.get(name) != mine:
                raise ValueError(
                    f"load_state_dict: state has {name}={state.get(name)!r} but this data set has "
                    f"{mine!r}; the saved position does not apply (shard split or order differs)"
                )
        self._num_workers = state.get("num_workers")
        self._positions = {int(k): _Position(**v) for k, v in state.get("workers", {}).items()}

    # ---- iteration ---------------------------------------------------------------------------------------------

    def _note_bad(self, shard: str, key: str, reason: str) -> None:
        entry = f"{shard}:{key}: {reason}"
        self._bad_samples.append(entry)
        if self._warnings < _MAX_WARNINGS:
            logger.warning("skipping corrupt sample %s", entry)
            self._warnings += 1
        else:
            logger.debug("skipping corrupt sample %s", entry)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        in_process = info is None
        if self._num_workers is not None and self._positions and self._num_workers != num_workers:
            raise ValueError(
                f"resuming a stream saved with {self._num_workers} DataLoader worker(s) on "
                f"{num_workers}; use the same num_workers (0 counts as 1)"
            )
        start = self._positions.get(worker, _Position())
        position = _Position(**vars(start))
        epoch, skipped = position.epoch, position.skipped
        if not self.worker_shards(epoch, worker, num_workers):
            logger.warning(
                "rank %d worker %d has no shard to read (%d shards, %d ranks, %d workers)",
                self.rank,
                worker,
                len(self.shards),
                self.world_size,
                num_workers,
            )
            return
        first, count = True, _SkipCount(skipped)
        while self.epochs is None or epoch < self.epochs:
            shards = self.worker_shards(epoch, worker, num_workers)
            full_epoch, yielded = not first or (position.cursor == 0 and position.offset == 0), 0
            for cursor in range(position.cursor if first else 0, len(shards)):
                begin = position.offset if first and cursor == position.cursor else 0
                first = False
                where = _Where(epoch, shards[cursor], cursor, worker, num_workers, in_process)
                for sample in self._shard_samples(where, begin, count):
                    yielded += 1
                    yield sample
            if self.epochs is None and full_epoch and not yielded:  # would spin forever
                raise NoUsableDataError(
                    f"no usable sample in {len(shards)} shard(s) ({', '.join(self.shards[i] for i in shards[:3])}"
                    f"{', ...' if len(shards) > 3 else ''}): {count.skipped} corrupt or incomplete sample(s) skipped "
                    f"(rank {self.rank}, worker {worker}); check the shards and the data.*_key settings"
                )
            first = False
            epoch += 1
            if in_process:
                self._set(worker, num_workers, _Position(epoch, 0, 0, count.skipped))

    def _records(self, epoch: int, shard: int, begin: int) -> Iterator[tuple[int, int, TarRecord, Any]]:
        """``(offset, index, record, read)`` of shard ``shard``'s samples from ``begin`` on in ``epoch``'s order:
        local shards by seeking (permuted when ``shuffle``), remote ones as a stream in tar order."""
        path = self.shards[shard]
        if not is_remote(path):
            order_of = (lambda n: _permutation(n, self.seed, epoch, shard)) if self.shuffle else (lambda n: None)
            yield from local_records(path, order_of, begin)
            return
        for index, key, members in remote_records(path, begin, self.remote_retries):
            yield index, index, TarRecord(key, members), _bytes_reader(key, members)

    def _shard_samples(self, where: _Where, begin: int, count: _SkipCount) -> Iterator[dict[str, Any]]:
        """The decoded samples of one shard from sample ``begin`` on (in the epoch's order), each with its position
        after it; corrupt samples are skipped, noted and counted (a remote shard lost mid-way counts once)."""
        path = self.shards[where.shard]
        records = self._records(where.epoch, where.shard, begin)
        offset = begin - 1
        while True:
            try:
                offset, index, record, read = next(records)
            except StopIteration:
                if begin == 0 and offset < 0:  # no readable sample at all: counted once (offset 1 marks it counted)
                    count.skipped += 1
                    self._note_bad(path, "*", "the shard holds no readable sample")
                    if where.in_process:
                        self._set(
                            where.worker, where.num_workers, _Position(where.epoch, where.cursor, 1, count.skipped)
                        )
                return
            except RemoteShardError as exc:
                count.skipped += 1
                self._note_bad(path, f"sample {offset + 1}+", str(exc))
                return
            generator = sample_generator(self.seed, where.epoch, where.shard, index)
            try:
                sample = self.decode(record, read, generator)
            except _CORRUPT as exc:
                count.skipped += 1
                self._note_bad(path, record.key, _reason(exc))
                sample = None
            if where.in_process:
                self._set(
                    where.worker, where.num_workers, _Position(where.epoch, where.cursor, offset + 1, count.skipped)
                )
            if sample is None:
                continue
            sample[STREAM_POS_KEY] = torch.tensor(
                [where.worker, where.num_workers, where.epoch, where.cursor, offset + 1, count.skipped],
                dtype=torch.int64,
            )
            yield sample

    def samples_at(self, epoch: int, shard: int, offsets: Sequence[int]) -> list[dict[str, Any]]:
        """Decode again the samples at ``offsets`` (positions in ``epoch``'s order) of shard ``shard``, exactly as
        they were first decoded (same per-sample generator), in the order of ``offsets``.

        Raises:
            ValueError: one of them is now missing or unreadable (the shard changed since it was read).
        """
        wanted, found = set(offsets), {}
        if wanted:
            for offset, index, record, read in self._records(epoch, shard, min(wanted)):
                if offset in wanted:
                    try:
                        found[offset] = self.decode(record, read, sample_generator(self.seed, epoch, shard, index))
                    except _CORRUPT as exc:
                        raise ValueError(f"{self.shards[shard]}:{record.key}: {_reason(exc)}") from None
                if offset >= max(wanted):
                    break
        missing = sorted(wanted - set(found))
        if missing:
            raise ValueError(f"{self.shards[shard]}: samples {missing} of epoch {epoch} are gone (shard changed?)")
        return [found[o] for o in offsets]


#: Errors that mark one sample as corrupt (it is skipped, the stream goes on).
_CORRUPT = (CorruptSampleError, CorruptImageError, OSError, EOFError, UnicodeDecodeError, tarfile.TarError)


@dataclass
class _SkipCount:
    """Corrupt samples skipped by one worker so far."""

    skipped: int


@dataclass(frozen=True)
class _Where:
    """Which shard a worker is reading: its epoch, the shard's index in the shard list and in the worker's list."""

    epoch: int
    shard: int
    cursor: int
    worker: int
    num_workers: int
    in_process: bool


def _reason(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, CorruptSampleError) else f"{type(exc).__name__}: {exc}"


def _bytes_reader(key: str, members: dict[str, bytes]):
    def read(ext: str) -> bytes:
        if ext not in members:
            raise CorruptSampleError(f"missing member {key}.{ext}")
        return members[ext]

    return read
