"""WebDataset tar shards: a strict member reader and an atomic, reproducible shard writer.

Reading: webdataset's ``tar_file_iterator`` uses ``tarfile``'s stream mode, which ends silently when a
tar is cut at a member boundary or inside a header (a shard truncated by a failed copy looks complete).
``tar_members`` reads the same format (ustar, GNU long names, PAX ``path`` records) but demands every
byte and the end-of-archive block, so every truncation is seen and counted.

Writing: samples go through webdataset's ``TarWriter`` (fixed mtime, uid/gid 0, empty user names; tarfile's
default PAX format),
so the same input gives byte-identical shards; webdataset's ``ShardWriter`` writes under the final name,
so each shard here goes through ``safe.atomic_open`` instead and a killed run leaves no half shard.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import webdataset as wds

from vaetrain.safe import atomic_open

_ZERO_BLOCK = bytes(512)


class TruncatedTar(Exception):
    """The stream ended (or broke) before the tar's end-of-archive block."""


def _read_exact(f, n: int) -> bytes:
    data = f.read(n)
    while len(data) < n:
        more = f.read(n - len(data))
        if not more:
            raise TruncatedTar(f"wanted {n} bytes, got {len(data)}")
        data += more
    return data


def tar_members(f) -> Iterator[tuple[str, bytes]]:
    """(name, data) of the regular files in a tar stream; ``TruncatedTar`` on any short read."""
    long_name = None
    while True:
        hdr = _read_exact(f, 512)
        if hdr == _ZERO_BLOCK:
            return
        try:
            info = tarfile.TarInfo.frombuf(hdr, "utf-8", "surrogateescape")
        except tarfile.HeaderError as e:
            raise TruncatedTar(f"bad tar header ({e})") from None
        data = _read_exact(f, info.size)
        _read_exact(f, -info.size % 512)
        if info.type == tarfile.GNUTYPE_LONGNAME:
            long_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
        elif info.type == tarfile.XHDTYPE:
            for rec in data.split(b"\n"):
                _, _, kv = rec.partition(b" ")
                if kv.startswith(b"path="):
                    long_name = kv[5:].decode("utf-8", "surrogateescape")
        elif info.type in (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE):
            yield (long_name or info.name), data
            long_name = None
        elif info.type != tarfile.XGLTYPE:
            long_name = None


class ShardWriter:
    """Samples into ``OUTPUT/{prefix}-NNNNNN.tar``, rolling over at ``max_samples`` or ``max_bytes``.

    ``header``: fields written as the sample ``__meta__`` at the head of every shard (a latent cache's
    ``__meta__.json``). ``close()`` returns ``[{"name", "samples", "bytes"}]``.
    """

    def __init__(self, output: str | os.PathLike, prefix: str = "shard", max_samples: int = 10_000,
                 max_bytes: int = 1 << 30, header: dict[str, bytes] | None = None):
        self.dir = Path(output)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.prefix, self.max_samples, self.max_bytes = prefix, max_samples, max_bytes
        self.header = dict(header or {})
        self.shards: list[dict] = []
        self._stack: ExitStack | None = None
        self._tar: wds.TarWriter | None = None
        self._n = self._bytes = 0

    def _open(self) -> None:
        self._path = self.dir / f"{self.prefix}-{len(self.shards):06d}.tar"
        self._stack = ExitStack()
        f = self._stack.enter_context(atomic_open(self._path, "wb"))
        self._tar = wds.TarWriter(f, user="", group="", mtime=0, encoder=False)
        self._n = self._bytes = 0
        if self.header:
            self._add("__meta__", self.header)

    def _add(self, key: str, fields: dict[str, bytes]) -> None:
        self._tar.write({"__key__": key, **fields})
        self._bytes += sum(512 + len(v) + (-len(v) % 512) for v in fields.values())

    def _close(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        self._stack.close()  # fsync + rename to the final name
        self.shards.append({"name": self._path.name, "samples": self._n, "bytes": self._path.stat().st_size})
        self._tar = self._stack = None

    def write(self, key: str, fields: dict[str, bytes]) -> None:
        """One sample: ``fields`` maps extension -> bytes (``{"jpg": ..., "json": ...}``)."""
        size = sum(512 + len(v) for v in fields.values())
        if self._tar is not None and (self._n >= self.max_samples or
                                      (self._n and self._bytes + size > self.max_bytes)):
            self._close()
        if self._tar is None:
            self._open()
        self._add(key, fields)
        self._n += 1

    def close(self) -> list[dict]:
        self._close()
        return self.shards

    def abort(self) -> None:
        """Drop the shard being written (its temporary file is removed; finished shards stay)."""
        if self._stack is not None:
            self._stack.__exit__(RuntimeError, RuntimeError("aborted"), None)
        self._tar = self._stack = None


def read_first_member(stream) -> tuple[str, bytes] | None:
    """The first member of a tar stream, or None when it has none or is cut short."""
    try:
        for item in tar_members(stream):
            return item
    except TruncatedTar:
        return None
    return None


def members_of(data: bytes) -> list[tuple[str, bytes]]:
    """All members of an in-memory tar (tests and small tools)."""
    return list(tar_members(io.BytesIO(data)))
