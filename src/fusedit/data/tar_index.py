"""Shard lists and local tar shards: resolve a shard spec, index a tar from its headers, read samples by seeking.

Consecutive tar members sharing a key form one sample; the key is the member name up to the first dot of its base
name, the rest is the extension (``000123.image.jpg``). Remote shards (``https://``, ``s3://``, ``gs://``, ``pipe:``)
are read sequentially by :mod:`fusedit.data.remote`; this module only lists them.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "CorruptSampleError",
    "REMOTE_SCHEMES",
    "is_remote",
    "TarRecord",
    "expand_shards",
    "index_tar",
    "local_records",
    "split_key",
]

logger = logging.getLogger("fusedit.data")

_KEY_RE = re.compile(r"^((?:.*/|)[^./]+)\.([^/]+)$")
#: Prefixes of shard names read as streams (:mod:`fusedit.data.remote`).
REMOTE_SCHEMES = ("http://", "https://", "s3://", "gs://", "gcs://", "pipe:")


def is_remote(name: str) -> bool:
    """Whether a shard name is a URL or a ``pipe:`` command (read as a stream)."""
    return isinstance(name, str) and name.startswith(REMOTE_SCHEMES)


class CorruptSampleError(ValueError):
    """A sample of a shard cannot be used (the message says why); it is skipped and counted."""


def split_key(name: str) -> tuple[str, str] | None:
    """``(key, extension)`` of a tar member name (``None`` for names without an extension)."""
    match = _KEY_RE.match(name)
    return None if match is None else (match.group(1), match.group(2))


def _brace_expand(pattern: str) -> list[str]:
    try:
        from braceexpand import braceexpand
    except ImportError:  # pragma: no cover - braceexpand ships with webdataset
        return [pattern]
    return list(braceexpand(pattern))


def expand_shards(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Resolve a shard spec to a list of shards (order kept; folders and globs sorted).

    Local shards must exist; remote ones (``https://``, ``http://``, ``s3://``, ``gs://`` URLs and ``pipe:CMD``) are
    brace-expanded (``https://host/train-{0000..0099}.tar``) and checked when they are opened.

    Raises:
        FileNotFoundError: a listed local shard, folder or pattern matches nothing.
    """
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    paths: list[str] = []
    for item in specs:
        text = os.fspath(item)
        if is_remote(text):
            paths += _brace_expand(text)
            continue
        for name in _brace_expand(os.path.expanduser(text)):
            if os.path.isdir(name):
                found = sorted(glob.glob(os.path.join(name, "*.tar")))
                if not found:
                    raise FileNotFoundError(f"no *.tar shards in folder {name}")
                paths += found
            elif any(c in name for c in "*?["):
                found = sorted(glob.glob(name))
                if not found:
                    raise FileNotFoundError(f"shard pattern {name} matches no files")
                paths += found
            elif os.path.isfile(name):
                paths.append(name)
            else:
                raise FileNotFoundError(f"shard not found: {name}")
    if not paths:
        raise FileNotFoundError(f"shard spec {spec!r} names no shards")
    return paths


@dataclass
class TarRecord:
    """One sample of a shard: its key and members (extension → ``TarInfo`` of a local shard, or the member's bytes
    of a remote one), read on demand."""

    key: str
    members: dict[str, Any]

    def has(self, ext: str) -> bool:
        return ext in self.members


def index_tar(path: str) -> list[TarRecord]:
    """Group a shard's members into samples by reading tar headers only (no member data is read).

    A damaged tail (truncated archive) ends the index where it breaks; the damage is logged.
    """
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic.startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ")):
        raise ValueError(f"shard {path} is compressed; only uncompressed .tar shards can be read by seeking")
    records: list[TarRecord] = []
    current: TarRecord | None = None
    try:
        with tarfile.open(path, mode="r:") as tf:
            for info in tf:
                if not info.isfile():
                    continue
                parts = split_key(info.name)
                if parts is None:
                    continue
                key, ext = parts
                if current is None or current.key != key:
                    current = TarRecord(key, {})
                    records.append(current)
                current.members[ext] = info
    except (tarfile.TarError, OSError, EOFError) as exc:
        logger.warning("shard %s: archive damaged after %d samples (%s)", path, len(records), exc)
    return records


def local_records(path: str, order_of, begin: int) -> Iterator[tuple[int, int, TarRecord, Any]]:
    """``(offset, index, record, read)`` of a local shard's samples from ``begin`` on, in the order
    ``order_of(num_samples)`` (a list of indices, or ``None`` for tar order): the tar is indexed from its headers and
    members are read by seeking, nothing before ``begin``."""
    records = index_tar(path)
    order = order_of(len(records))
    if begin >= len(records):
        return
    with open(path, "rb") as fileobj:
        for offset in range(begin, len(records)):
            index = order[offset] if order is not None else offset
            yield offset, index, records[index], _reader(fileobj, records[index])


def _reader(fileobj, record: TarRecord):
    def read(ext: str) -> bytes:
        info = record.members.get(ext)
        if info is None:
            raise CorruptSampleError(f"missing member {record.key}.{ext}")
        fileobj.seek(info.offset_data)
        data = fileobj.read(info.size)
        if len(data) != info.size:
            raise EOFError(f"member {record.key}.{ext} truncated ({len(data)} of {info.size} bytes)")
        return data

    return read
