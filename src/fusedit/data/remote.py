"""Shards where they live: ``https://``/``http://``, ``s3://``, ``gs://`` URLs (through ``fsspec``) and ``pipe:CMD``
(a shell command writing the tar to its stdout), read as a sequential stream.

Nothing can be sought in a stream, so a remote shard is read in tar order (``data.shuffle`` permutes the shard order
only) and resuming at sample ``k`` of a shard re-reads it from the start, skipping ``k`` samples by their tar headers
(their bytes are read past, nothing is decoded).

The tar is parsed here, block by block, instead of by :mod:`tarfile`'s stream mode, because a stream cut at a header
boundary looks like a clean end to ``tarfile``: a shard is complete only when its end-of-archive block (512 zero
bytes) arrives. A connection that fails or ends early (:class:`ShardStreamError`) is retried: the shard is opened
again and the samples already taken are skipped, at most ``retries`` times; after that :class:`RemoteShardError`
says the rest of the shard is lost (the reader skips it, logs it and counts it — never a silent stop).
"""

from __future__ import annotations

import importlib.util
import logging
import subprocess
import tarfile
from collections.abc import Iterator
from typing import IO, Any

from fusedit.data.tar_index import REMOTE_SCHEMES, is_remote, split_key

__all__ = [
    "REMOTE_SCHEMES",
    "RemoteShardError",
    "ShardStreamError",
    "is_remote",
    "iter_tar_records",
    "open_stream",
    "remote_records",
]

logger = logging.getLogger("fusedit.data")

_BLOCK = 512
#: fsspec back-ends that are separate packages: URL scheme → (module, pip package).
_BACKENDS = {
    "s3": ("s3fs", "s3fs"),
    "gs": ("gcsfs", "gcsfs"),
    "gcs": ("gcsfs", "gcsfs"),
    "http": ("aiohttp", "fsspec[http]"),
    "https": ("aiohttp", "fsspec[http]"),
}


class ShardStreamError(OSError):
    """A remote shard's stream failed or ended before its end-of-archive block (retried)."""


class RemoteShardError(OSError):
    """A remote shard could not be read to its end, even after retries (the rest of it is skipped)."""


def check_backend(url: str) -> None:
    """Raise ``ImportError`` with the package to install when the fsspec back-end of ``url`` is missing."""
    scheme = url.split("://", 1)[0]
    module, package = _BACKENDS.get(scheme, (None, None))
    if module is not None and importlib.util.find_spec(module) is None:
        raise ImportError(f"{scheme}:// shards need the {module} package: pip install {package}")


class _PipeStream:
    """stdout of ``sh -c CMD``; a non-zero exit status is an error when the stream is closed."""

    def __init__(self, command: str):
        self.command = command
        self.process = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def read(self, n: int) -> bytes:
        assert self.process.stdout is not None
        return self.process.stdout.read(n)

    def close(self) -> None:
        assert self.process.stdout is not None
        self.process.stdout.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def failed(self) -> str | None:
        code = self.process.poll()
        if code:
            assert self.process.stderr is not None
            err = self.process.stderr.read().decode("utf-8", "replace").strip().splitlines()
            return f"command exited with status {code}" + (f": {err[-1]}" if err else "")
        return None


def open_stream(name: str) -> Any:
    """A readable binary stream of a remote shard (``read(n)``, ``close()``).

    Raises:
        ImportError: the fsspec back-end of the URL's scheme is not installed (the message names the package).
        OSError: the shard cannot be opened.
    """
    if name.startswith("pipe:"):
        return _PipeStream(name[len("pipe:") :])
    check_backend(name)
    import fsspec

    # block_size=0: a plain sequential stream (no range requests, no file-size probe)
    return fsspec.open(name, "rb", block_size=0).open()


def _read_exact(stream: IO[bytes] | Any, n: int, what: str) -> bytes:
    chunks, left = [], n
    while left:
        chunk = stream.read(left)
        if not chunk:
            raise ShardStreamError(f"stream ended inside {what} ({n - left} of {n} bytes)")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _members(stream: Any) -> Iterator[tuple[str, bytes]]:
    """``(name, data)`` of each regular file of a tar stream; :class:`ShardStreamError` unless it ends properly."""
    long_name: str | None = None
    while True:
        header = stream.read(_BLOCK)
        if len(header) < _BLOCK:
            header += _read_exact(stream, _BLOCK - len(header), "a tar header") if header else b""
        if not header:
            raise ShardStreamError("stream ended before the tar's end-of-archive block")
        if header == bytes(_BLOCK):
            return
        try:
            info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
        except tarfile.HeaderError as exc:
            raise ShardStreamError(f"bad tar header ({exc})") from None
        padded = (info.size + _BLOCK - 1) // _BLOCK * _BLOCK
        data = _read_exact(stream, padded, f"member {info.name}")[: info.size]
        if info.type == tarfile.GNUTYPE_LONGNAME:
            long_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
        elif info.type == tarfile.XHDTYPE:
            long_name = _pax_path(data) or long_name
        elif info.type in tarfile.REGULAR_TYPES:
            yield long_name or info.name, data
            long_name = None
        else:
            long_name = None


def _pax_path(data: bytes) -> str | None:
    """The ``path`` of a pax extended header (records ``"LEN key=value\\n"``)."""
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        length = int(data[pos:space])
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        if key == b"path":
            return value.decode("utf-8", "surrogateescape")
        pos += length
    return None


def iter_tar_records(stream: Any) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {extension: bytes})`` of each sample of a tar stream, in tar order (see :mod:`fusedit.data.tar_index`
    for keys); raises :class:`ShardStreamError` if the stream breaks or ends early (the sample in progress is not
    yielded)."""
    key, members = None, {}
    for name, data in _members(stream):
        parts = split_key(name)
        if parts is None:
            continue
        if key is not None and parts[0] != key:
            yield key, members
            members = {}
        key = parts[0]
        members[parts[1]] = data
    if key is not None:
        yield key, members


def _transient_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OSError, EOFError, TimeoutError]
    try:
        import aiohttp

        errors.append(aiohttp.ClientError)
    except ImportError:
        pass
    return tuple(errors)


def remote_records(name: str, begin: int = 0, retries: int = 3) -> Iterator[tuple[int, str, dict[str, bytes]]]:
    """``(index, key, members)`` of a remote shard's samples from sample ``begin`` on, in tar order.

    The samples before ``begin`` are skipped by their headers. A broken stream is reopened (at most ``retries``
    times), skipping the samples already yielded.

    Raises:
        RemoteShardError: the shard still broke after ``retries`` retries, or a ``pipe:`` command failed.
        ImportError: its fsspec back-end is missing.
    """
    done, attempt = begin, 0
    transient = _transient_errors()
    while True:
        try:
            stream = open_stream(name)
            try:
                for index, (key, members) in enumerate(iter_tar_records(stream)):
                    if index < done:
                        continue  # skipped by headers: read past, not decoded
                    yield index, key, members
                    done = index + 1
            finally:
                stream.close()
            failed = stream.failed() if isinstance(stream, _PipeStream) else None
            if failed:
                raise RemoteShardError(f"{name}: {failed}")
            return
        except RemoteShardError:
            raise
        except transient as exc:
            attempt += 1
            if attempt > retries:
                raise RemoteShardError(
                    f"{name}: {type(exc).__name__}: {exc} (after {retries} retries; the rest of the shard from "
                    f"sample {done} is skipped)"
                ) from None
            logger.warning("shard %s: %s; retry %d of %d from sample %d", name, exc, attempt, retries, done)
