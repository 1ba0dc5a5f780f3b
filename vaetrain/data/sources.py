"""Where samples come from: the unit list of each source, and the pipeline stages that turn units into raw samples.

A *unit* is what the shard stage orders, splits and resamples: a shard URL (webdataset, cached), an image
file (folder) or a synthetic index. URLs are opened by webdataset's ``gopen`` (local paths, ``file:``,
``pipe:``, ``http(s)://`` through curl, ``gs://``...), plus ``s3://`` through the AWS CLI, which
webdataset 1.0.2 has no handler for. Raw samples carry bytes (or a path / an index) only: decoding
happens after the shuffle, so a resumed epoch replays this stream without decoding anything.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import braceexpand
import webdataset as wds
from webdataset.gopen import Pipe
from webdataset.tariterators import group_by_keys

from vaetrain.data.faults import DataError, SkipSample
from vaetrain.data.images import list_images
from vaetrain.data.spec import DataSpec
from vaetrain.data.tars import TruncatedTar, tar_members


def gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192):
    """``s3://bucket/key`` -> ``aws s3 cp URL -`` (an argument list, no shell), like webdataset's curl handler."""
    if mode[0] != "r":
        raise ValueError(f"{url}: vaetrain reads s3:// shards only")
    return Pipe(["aws", "s3", "cp", url, "-"], mode=mode, bufsize=bufsize, ignore_status=[141])


# webdataset's documented extension point: its scheme -> opener table
wds.gopen_schemes.setdefault("s3", gopen_s3)


def is_remote(url: str) -> bool:
    return url.startswith("pipe:") or "://" in url and not url.startswith("file://")


def expand_shards(shards: str | Iterable[str], allow_pipe: bool = False) -> list[str]:
    """Brace patterns (``a-{000..009}.tar``), ``::``-separated lists and local folders (all ``*.tar``).

    Refused with one line: a ``pipe:`` URL without ``data.allow_pipe=true`` (it runs a shell command),
    and local files that do not exist (named)."""
    items = [shards] if isinstance(shards, str) else list(shards)
    out: list[str] = []
    for item in items:
        for part in str(item).split("::"):
            for url in braceexpand.braceexpand(part):
                if not is_remote(url) and os.path.isdir(url):
                    out += sorted(str(p) for p in Path(url).glob("*.tar"))
                else:
                    out.append(url)
    piped = [u for u in out if u.startswith("pipe:")]
    if piped and not allow_pipe:
        raise DataError(f"data.shards: {piped[0]!r} runs a shell command; set data.allow_pipe=true if you trust "
                        f"it, or give paths / http(s):// / s3:// URLs")
    missing = [u for u in out if not is_remote(u) and not os.path.isfile(u.removeprefix("file://").removeprefix("file:"))]
    if missing:
        raise DataError(f"data.shards: shard file {missing[0]} does not exist"
                        + (f" (and {len(missing) - 1} more of {len(out)})" if len(missing) > 1 else "")
                        + "; check the path or brace pattern")
    if not out:
        raise DataError(f"data.shards={shards!r}: no shards found (a folder must hold *.tar files)")
    return out


def units_of(spec: DataSpec) -> list[str]:
    """The units of ``spec``'s source, in their stored order."""
    if spec.source == "synthetic":
        return [str(i) for i in range(spec.synthetic_count)]
    if spec.source == "folder":
        try:
            files = list_images(spec.folder)
        except FileNotFoundError:
            missing = next(f for f in ([spec.folder] if isinstance(spec.folder, str) else spec.folder)
                           if not os.path.isdir(f))
            raise DataError(f"data.folder: image folder {missing} does not exist") from None
        if not files:
            raise DataError(f"data.folder={spec.folder!r}: no image files found")
        return files
    return expand_shards(spec.shards, spec.allow_pipe)


class ShardFaults:
    """Counts shard-level faults and stops a worker that opens shard after shard without getting a sample
    (all unreadable or empty: the skip rate alone would never fire on an endless resampled stream)."""

    def __init__(self, count: Callable[[str], None], limit: int):
        self.count, self.limit = count, limit
        self.barren, self.last_url = 0, None

    def shard_done(self, url: str, got_sample: bool, reason: str | None = None) -> None:
        if reason:
            self.count(reason)
        self.barren = 0 if got_sample else self.barren + 1
        self.last_url = url
        if self.barren >= self.limit:
            raise DataError(f"data: the last {self.barren} shards opened gave no sample (last: {url}"
                            + (f", {reason}" if reason else "") + "); check data.shards")


def tar_records(sources: Iterator[dict], faults: ShardFaults) -> Iterator[dict]:
    """``{"url"}`` -> the members of each shard as ``{"fname", "data", "__url__"}``, then ``{}`` (end of shard).

    Replaces webdataset's ``url_opener`` + ``tar_file_expander``: a shard that cannot be opened is counted
    ``unreadable_source``, one cut short (also at a member boundary) ``truncated_tar``; members read whole
    before the cut are still served; nothing sleeps."""
    for source in sources:
        url = source["url"]
        try:
            stream = wds.gopen(url, "rb")
        except Exception:  # missing file, unknown scheme, command that cannot start
            faults.shard_done(url, False, "unreadable_source")
            continue
        got, reason = False, None
        try:
            for name, data in tar_members(stream):
                got = True
                yield {"fname": name, "data": data, "__url__": url}
        except (TruncatedTar, OSError, ValueError):  # a short read, or a pipe/curl that exited non-zero
            reason = "truncated_tar" if got else "unreadable_source"
        finally:
            try:
                stream.close()
            except Exception:  # a pipe we stopped reading early may exit non-zero: nothing was lost
                pass
        yield {}
        faults.shard_done(url, got, reason)


def grouped(records: Iterator[dict], count: Callable[[str], None]) -> Iterator[dict]:
    """webdataset's ``group_by_keys`` (``KEY.ext`` members -> one sample); a malformed member is counted."""

    def handler(exn: Exception) -> bool:
        count("malformed_sample")
        return True

    return group_by_keys(records, handler=handler)


def without_meta(samples: Iterator[dict], check: Callable[[dict, str], None] | None) -> Iterator[dict]:
    """Drop the ``__meta__`` record at the head of a shard (a latent cache's), checking it when asked."""
    for s in samples:
        if s["__key__"] == "__meta__":
            if check is not None:
                check(s, s.get("__url__", "?"))
            continue
        yield s


def file_records(sources: Iterator[dict]) -> Iterator[dict]:
    """Image-file units -> raw samples that name the file; it is read at decode time (after the shuffle),
    so a resumed epoch fast-forwards over paths, not bytes."""
    for source in sources:
        yield {"__key__": source["url"], "__path__": source["url"]}


def synthetic_records(sources: Iterator[dict]) -> Iterator[dict]:
    for source in sources:
        i = int(source["url"])
        yield {"__key__": f"synthetic-{i:08d}", "__synthetic__": i}


def read_file(sample: dict) -> bytes:
    try:
        return Path(sample["__path__"]).read_bytes()
    except OSError as e:
        raise SkipSample("unreadable_source", str(e)) from None
