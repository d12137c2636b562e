"""The order in which a run reads its data, and where it stands in it (what a checkpoint records).

Map-style data sets (``__len__``/``__getitem__``) are read in a seeded permutation per epoch (``randperm`` seeded by
``(train.seed, epoch)``), consumed as one endless stream; the position is the number of samples consumed. A data set
with ``set_epoch(epoch)`` (:class:`~fusedit.data.folder.ImageFolderDataset`) gets each item's epoch, inside the
DataLoader workers too. With ``W`` processes every rank walks the same stream in global micro-batches and takes its
contiguous slice.

Resumable streams (an ``IterableDataset`` with ``state_dict``/``load_state_dict``/``mark_consumed``:
:class:`~fusedit.data.webdataset.WebShardDataset`, :class:`~fusedit.data.latents.LatentShardDataset`) are split
shard-per-rank by the stream itself; every batch taken is passed to ``mark_consumed`` (its ``stream_pos`` rows), and
``state_dict()`` is checkpointed per rank.

Aspect-ratio buckets (``data.buckets``): a map-style data set with ``item_buckets`` (each item's bucket,
:class:`~fusedit.data.bucket_folder.BucketedImageFolder`) is read by :class:`BucketBatchSampler`: each epoch's
permutation is cut into global micro-batches within one bucket, a pure function of ``(seed, epoch)``, so the position
is the number of global batches taken. A stream with ``yields_batches``
(:class:`~fusedit.data.bucket_stream.BucketBatchStream`) yields whole same-bucket micro-batches and carries its
pending samples in ``MicroBatch.pending``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from fusedit.checkpoint.errors import CheckpointError
from fusedit.dist.env import DistEnv, all_reduce


def epoch_permutation(num_items: int, seed: int, epoch: int) -> torch.Tensor:
    """The data order of ``epoch``: ``randperm(num_items)`` from a generator seeded by ``(seed, epoch)``."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_items, generator=generator)


class ResumableBatchSampler(torch.utils.data.Sampler):
    """An endless stream of index batches: epoch permutations concatenated, starting after ``start`` samples.

    Batches may straddle epochs (nothing is dropped). Position after ``k`` batches: ``start + k·batch_size``.
    With ``world_size > 1`` the stream is cut into global batches of ``batch_size`` and rank ``r`` yields the
    ``r``-th contiguous slice of ``batch_size / world_size`` indices of each. ``with_epoch``: yield
    ``(epoch, index)`` pairs (for :class:`EpochIndexed`) instead of indices.
    """

    def __init__(
        self,
        num_items: int,
        batch_size: int,
        seed: int,
        start: int = 0,
        *,
        rank: int = 0,
        world_size: int = 1,
        with_epoch: bool = False,
    ) -> None:
        if num_items <= 0:
            raise ValueError("the dataset is empty")
        if batch_size % world_size:
            raise ValueError(f"global batch {batch_size} cannot be split over {world_size} ranks")
        self.num_items, self.batch_size, self.seed, self.start = num_items, batch_size, seed, start
        self.rank, self.world_size, self.with_epoch = rank, world_size, with_epoch

    def __iter__(self) -> Iterator[list]:
        epoch, index = divmod(self.start, self.num_items)
        order = epoch_permutation(self.num_items, self.seed, epoch)
        share = self.batch_size // self.world_size
        lo = self.rank * share
        while True:
            batch: list = []
            while len(batch) < self.batch_size:
                if index == self.num_items:
                    epoch, index = epoch + 1, 0
                    order = epoch_permutation(self.num_items, self.seed, epoch)
                take = min(self.batch_size - len(batch), self.num_items - index)
                chunk = order[index : index + take].tolist()
                batch += [(epoch, i) for i in chunk] if self.with_epoch else chunk
                index += take
            yield batch[lo : lo + share]


def bucket_epoch_batches(item_buckets: Sequence[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The global micro-batches of ``epoch``, each within one bucket: walk ``epoch_permutation``, put each item in its
    bucket's buffer (items of bucket ``-1`` are left out) and emit a buffer when it holds ``batch_size`` items; at the
    end each partial buffer is completed with the first items of its bucket in this epoch's order (an item may then
    come twice in an epoch; nothing is dropped)."""
    order = epoch_permutation(len(item_buckets), seed, epoch).tolist()
    buffers: dict[int, list[int]] = {}
    batches: list[list[int]] = []
    for index in order:
        bucket = item_buckets[index]
        if bucket < 0:
            continue
        buffer = buffers.setdefault(bucket, [])
        buffer.append(index)
        if len(buffer) == batch_size:
            batches.append(buffer)
            buffers[bucket] = []
    for bucket, buffer in buffers.items():
        if buffer:
            members = [i for i in order if item_buckets[i] == bucket]
            batches.append(buffer + [members[k % len(members)] for k in range(batch_size - len(buffer))])
    return batches


class BucketBatchSampler(torch.utils.data.Sampler):
    """An endless stream of index batches within one bucket (:func:`bucket_epoch_batches`), starting after
    ``start_batches`` global batches. Rank ``r`` of ``world_size`` yields the ``r``-th contiguous slice of each global
    batch (so every rank's micro-batch has the same size); ``with_epoch`` as in :class:`ResumableBatchSampler`."""

    def __init__(
        self,
        item_buckets: Sequence[int],
        batch_size: int,
        seed: int,
        start_batches: int = 0,
        *,
        rank: int = 0,
        world_size: int = 1,
        with_epoch: bool = False,
    ) -> None:
        if not any(b >= 0 for b in item_buckets):
            raise ValueError("the dataset has no readable item in any bucket")
        if batch_size % world_size:
            raise ValueError(f"global batch {batch_size} cannot be split over {world_size} ranks")
        self.item_buckets, self.batch_size, self.seed = list(item_buckets), batch_size, seed
        self.start_batches, self.rank, self.world_size, self.with_epoch = start_batches, rank, world_size, with_epoch

    def __iter__(self) -> Iterator[list]:
        epoch, skip = 0, self.start_batches
        batches = bucket_epoch_batches(self.item_buckets, self.batch_size, self.seed, epoch)
        while skip >= len(batches):
            skip -= len(batches)
            epoch += 1
            batches = bucket_epoch_batches(self.item_buckets, self.batch_size, self.seed, epoch)
        share = self.batch_size // self.world_size
        lo = self.rank * share
        while True:
            for batch in batches[skip:]:
                mine = batch[lo : lo + share]
                yield [(epoch, i) for i in mine] if self.with_epoch else mine
            epoch, skip = epoch + 1, 0
            batches = bucket_epoch_batches(self.item_buckets, self.batch_size, self.seed, epoch)


class EpochIndexed(Dataset):
    """A map-style data set read with ``(epoch, index)`` keys: calls ``dataset.set_epoch(epoch)`` when the epoch
    changes (in whichever process reads the item, so DataLoader workers see it too), then returns
    ``dataset[index]``."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset
        self._epoch: int | None = None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        if epoch != self._epoch:
            self.dataset.set_epoch(epoch)
            self._epoch = epoch
        return self.dataset[index]


@dataclass
class MicroBatch:
    """One rank's micro-batch: ``images`` ``(B, C, H, W)`` (pixels, or latents when ``is_latent``), ``captions`` and,
    for streams, ``stream_pos`` ``(B, 6)`` (see :mod:`fusedit.data.webdataset`)."""

    images: torch.Tensor
    captions: list[str]
    is_latent: bool = False
    stream_pos: torch.Tensor | None = None
    pending: torch.Tensor | None = None


def collate_batch(items: Sequence[Mapping[str, Any]]) -> MicroBatch:
    """Stack dataset items ``{"image": (C, H, W), "caption": str[, "is_latent", "stream_pos"]}`` into a
    :class:`MicroBatch` (other keys are ignored)."""
    for item in items:
        if not isinstance(item, Mapping) or "image" not in item or "caption" not in item:
            keys = sorted(item) if isinstance(item, Mapping) else type(item).__name__
            raise TypeError(f"dataset items must be mappings with 'image' and 'caption', got {keys}")
        if not isinstance(item["caption"], str):
            raise TypeError(f"dataset item 'caption' must be a str, got {type(item['caption']).__name__}")
    latent = {bool(item.get("is_latent", False)) for item in items}
    if len(latent) > 1:
        raise ValueError("a batch mixes latent (is_latent=True) and pixel items; use one kind of data per run")
    has_pos = {"stream_pos" in item for item in items}
    if len(has_pos) > 1:
        raise ValueError("some items of a batch carry 'stream_pos' and others do not")
    stream_pos = None
    if has_pos == {True}:
        stream_pos = torch.stack([torch.as_tensor(item["stream_pos"]) for item in items])
    return MicroBatch(
        images=torch.stack([torch.as_tensor(item["image"]) for item in items]),
        captions=[item["caption"] for item in items],
        is_latent=latent == {True},
        stream_pos=stream_pos,
    )


def collate_batch_item(item: Mapping[str, Any]) -> MicroBatch:
    """A :class:`MicroBatch` of a batch a stream yielded whole (``BucketBatchStream``: ``image`` ``(B, C, h, w)``,
    ``caption`` list, ``is_latent``, ``stream_pos``, ``pending``)."""
    return MicroBatch(
        images=item["image"],
        captions=list(item["caption"]),
        is_latent=bool(item.get("is_latent", False)),
        stream_pos=item.get("stream_pos"),
        pending=item.get("pending"),
    )


def collate_image_caption(items: Sequence[Mapping[str, Any]]) -> tuple[torch.Tensor, list[str]]:
    """Stack dataset items ``{"image": (C, H, W), "caption": str}`` into ``(images (B, C, H, W), captions)``."""
    batch = collate_batch(items)
    return batch.images, batch.captions


def is_resumable_stream(dataset: Any) -> bool:
    """Whether ``dataset`` is an ``IterableDataset`` the trainer can checkpoint (``state_dict``,
    ``load_state_dict``, ``mark_consumed``)."""
    return isinstance(dataset, IterableDataset) and all(
        callable(getattr(dataset, name, None)) for name in ("state_dict", "load_state_dict", "mark_consumed")
    )


def _endless(loader: DataLoader) -> Iterator[MicroBatch]:
    """The batches of a stream's DataLoader; a clear error if the stream ends before training does."""
    yield from loader
    raise RuntimeError(
        "the training data stream ended before train.max_steps; build shard streams with epochs=None "
        "(repeat forever) for training"
    )


class TrainingData:
    """A data set read as one resumable stream of micro-batches, and the position a checkpoint records.

    Args:
        dataset: map-style or a resumable stream (see the module docstring).
        seed: ``train.seed`` (the permutation of each epoch; the DataLoader's own generator).
        global_micro_batch: samples per micro-batch over all ranks.
        env: this process's rank and world size.
        num_workers: DataLoader workers.
    """

    def __init__(self, dataset: Any, *, seed: int, global_micro_batch: int, env: DistEnv, num_workers: int) -> None:
        self.is_stream = isinstance(dataset, IterableDataset)
        if self.is_stream and not is_resumable_stream(dataset):
            raise TypeError(
                f"{type(dataset).__name__} is an IterableDataset without state_dict/load_state_dict/"
                f"mark_consumed; the trainer needs a resumable stream (e.g. WebShardDataset, "
                f"LatentShardDataset) or a map-style data set"
            )
        if self.is_stream:
            split = (getattr(dataset, "rank", 0), getattr(dataset, "world_size", 1))
            if split != (env.rank, env.world_size):
                raise ValueError(
                    f"the data stream was built for rank {split[0]} of {split[1]} but this process is "
                    f"rank {env.rank} of {env.world_size}; build it after the process group exists (or "
                    f"pass rank/world_size)"
                )
        self.dataset, self.seed, self.env, self.num_workers = dataset, seed, env, num_workers
        self.global_micro_batch = global_micro_batch
        self.micro_batch = global_micro_batch // env.world_size
        self.samples_seen = 0
        self.yields_batches = self.is_stream and bool(getattr(dataset, "yields_batches", False))
        if self.yields_batches:
            dataset.configure_batches(self.micro_batch)
        self.item_buckets = None if self.is_stream else getattr(dataset, "item_buckets", None)

    def batches(self) -> Iterator[MicroBatch]:
        """This rank's micro-batches from the current position on (an endless iterator)."""
        # iterator creation must not draw from the global RNG: the loader gets its own generator
        generator = torch.Generator().manual_seed(self.seed + self.samples_seen)
        pin = self.env.device.type == "cuda"
        if self.is_stream:
            collate: Any = collate_batch_item if self.yields_batches else collate_batch
            loader = DataLoader(
                self.dataset,
                batch_size=None if self.yields_batches else self.micro_batch,
                collate_fn=collate,
                num_workers=self.num_workers,
                pin_memory=pin,
                persistent_workers=False,
                generator=generator,
            )
            return _endless(loader)
        with_epoch = callable(getattr(self.dataset, "set_epoch", None))
        sampler: torch.utils.data.Sampler = ResumableBatchSampler(
            len(self.dataset),
            self.global_micro_batch,
            self.seed,
            self.samples_seen,
            rank=self.env.rank,
            world_size=self.env.world_size,
            with_epoch=with_epoch,
        )
        if self.item_buckets is not None:
            sampler = BucketBatchSampler(
                self.item_buckets,
                self.global_micro_batch,
                self.seed,
                self.samples_seen // self.global_micro_batch,
                rank=self.env.rank,
                world_size=self.env.world_size,
                with_epoch=with_epoch,
            )
        source = EpochIndexed(self.dataset) if with_epoch else self.dataset
        loader = DataLoader(
            source,
            batch_sampler=sampler,
            collate_fn=collate_batch,
            num_workers=self.num_workers,
            pin_memory=pin,
            persistent_workers=False,
            generator=generator,
        )
        return iter(loader)

    def consumed(self, batch: MicroBatch) -> None:
        """Count ``batch`` (this rank's share of a global micro-batch) as read."""
        self.samples_seen += len(batch.captions) * self.env.world_size
        if self.is_stream:
            if batch.stream_pos is None:
                raise KeyError("the data stream's items carry no 'stream_pos'; its position cannot be tracked")
            taken = {"stream_pos": batch.stream_pos}
            if batch.pending is not None:
                taken["pending"] = batch.pending
            self.dataset.mark_consumed(taken)

    @property
    def epoch(self) -> float | None:
        """Epochs read so far (map-style data; ``None`` for streams, whose length is unknown)."""
        return None if self.is_stream else self.samples_seen / len(self.dataset)

    def position(self) -> dict[str, Any]:
        """The global data position (saved in ``trainer_state.json``)."""
        if self.is_stream:
            return {"kind": "stream", "samples_seen": self.samples_seen}
        n = len(self.dataset)
        position = {
            "kind": "map",
            "samples_seen": self.samples_seen,
            "num_items": n,
            "epoch": self.samples_seen // n,
            "index": self.samples_seen % n,
        }
        if self.item_buckets is not None:
            position["bucket_batch"] = self.global_micro_batch
        return position

    def stream_state(self) -> Any:
        """This rank's stream position (``None`` for map-style data)."""
        return self.dataset.state_dict() if self.is_stream else None

    def restore(self, path: Path, position: Mapping[str, Any], ranks: list[dict[str, Any]]) -> str | None:
        """Continue from a checkpoint's global ``position`` and every saving rank's state ``ranks``; returns a note
        when the stream had to restart (the number of processes changed)."""
        kind = position.get("kind", "map")
        mine = "stream" if self.is_stream else "map"
        if kind != mine:
            raise CheckpointError(
                f"{path}: saved while reading a {kind} data set, this run reads a {mine} data set; "
                f"the data position cannot be resumed"
            )
        if kind == "map" and position["num_items"] != len(self.dataset):
            raise CheckpointError(
                f"{path}: saved with a dataset of {position['num_items']} items, this one has "
                f"{len(self.dataset)}; the data position cannot be resumed"
            )
        saved_batch = position.get("bucket_batch")
        if kind == "map" and (saved_batch is not None) != (self.item_buckets is not None):
            raise CheckpointError(
                f"{path}: saved {'with' if saved_batch else 'without'} aspect-ratio buckets, this run reads "
                f"{'with' if self.item_buckets is not None else 'without'} them; the data position cannot be resumed"
            )
        if saved_batch is not None and saved_batch != self.global_micro_batch:
            raise CheckpointError(
                f"{path}: saved with bucketed micro-batches of {saved_batch} samples, this run takes "
                f"{self.global_micro_batch}; the data position cannot be resumed"
            )
        self.samples_seen = position["samples_seen"]
        if not self.is_stream:
            return None
        if len(ranks) == self.env.world_size:
            self._load_stream_state(path, ranks[self.env.rank].get("data"))
            return None
        return self._restart_stream(path, [rank.get("data") for rank in ranks])

    def _load_stream_state(self, path: Path, state: Any) -> None:
        try:
            self.dataset.load_state_dict(state)
        except (ValueError, KeyError, TypeError) as error:
            raise CheckpointError(
                f"{path}: the saved data-stream position does not fit this data set ({error})"
            ) from None

    def _restart_stream(self, path: Path, saved: list[Any]) -> str:
        """World size changed: the shard-per-rank split differs, so per-rank positions do not apply. Every rank
        restarts at the beginning of the first epoch no saved worker had started reading (the rest of the
        interrupted epoch is skipped; nothing is read twice); the skipped-sample count carries over on rank 0."""
        epoch, skipped = 0, 0
        for state in saved:
            for position in (state or {}).get("workers", {}).values():
                started = position["cursor"] > 0 or position["offset"] > 0
                epoch = max(epoch, position["epoch"] + (1 if started else 0))
                skipped += position.get("skipped", 0)
        workers = max(self.num_workers, 1)
        state = self.dataset.state_dict()
        state["num_workers"] = workers
        state["workers"] = {
            str(k): {
                "epoch": epoch,
                "cursor": 0,
                "offset": 0,
                "skipped": skipped if (k == 0 and self.env.is_main) else 0,
            }
            for k in range(workers)
        }
        self._load_stream_state(path, state)
        return (
            f"data stream: the shard split changed with the number of processes; restarting at the beginning of "
            f"epoch {epoch} (the rest of the interrupted epoch is skipped)"
        )

    def skipped(self) -> float | None:
        """Corrupt samples skipped so far (streams: summed over ranks; map-style: the largest rank count)."""
        skipped = getattr(self.dataset, "skipped", None)
        if not isinstance(skipped, int):
            return None
        if not self.env.distributed:
            return float(skipped)
        return all_reduce(skipped, "sum" if self.is_stream else "max", self.env.device)
