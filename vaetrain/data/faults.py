"""Bad data: what is counted, and when the loader stops with one line instead of going on.

A bad sample or shard never stops training by itself: it is skipped at once (webdataset's stock
``warn_and_continue`` handler sleeps 0.5 s per exception; ours does not), counted under one of
``REASONS`` and reported through ``ImageDataModule.skip_stats()``. The run stops with one
``DataError`` line when the skip rate passes ``max_skip_rate``, when a fixed-length epoch cannot be
filled, when an epoch gives no batch at all, or when a loader worker goes a long stretch without a
usable sample (so a dataset that is 100% bad stops, whatever ``max_skip_rate`` says, and never hangs).
"""

from __future__ import annotations

from vaetrain.safe import UserError, one_line

# Why a sample or shard was skipped; the order is the layout of every count vector.
REASONS = ("corrupt_image", "truncated_image", "no_image", "too_small", "truncated_tar",
           "unreadable_source", "malformed_sample", "bad_cache_record")
SAMPLES = len(REASONS)        # index of "samples delivered" in a count vector
WIDTH = len(REASONS) + 1      # length of a count vector
# faults counted where shards are opened and read (re-counted when a resumed epoch replays its byte stream)
SHARD_REASONS = ("truncated_tar", "unreadable_source", "malformed_sample")


class SkipSample(Exception):
    """A sample that cannot be used; ``reason`` is one of ``REASONS``."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class DataError(UserError):
    """Bad data or data options, as one line. Constructible from the message alone, so that torch can
    rebuild it when it crosses from a loader worker (the loader then strips torch's wrapper text)."""


def zeros() -> list[int]:
    return [0] * WIDTH


def add(a: list[int], b: list[int]) -> list[int]:
    return [x + y for x, y in zip(a, b)]


def totals(counts: list[int]) -> dict[str, int]:
    """A count vector as ``{reason: n, ..., "samples": n}``."""
    out = {r: int(counts[i]) for i, r in enumerate(REASONS)}
    out["samples"] = int(counts[SAMPLES])
    return out


def skip_rate(counts: list[int]) -> tuple[float, int]:
    """(skipped / seen, seen); a shard fault counts as one skip."""
    skipped = sum(counts[:SAMPLES])
    seen = skipped + counts[SAMPLES]
    return (skipped / seen if seen else 0.0), seen


def summary(counts: list[int], top: int = 3) -> str:
    ranked = sorted(((n, r) for r, n in zip(REASONS, counts[:SAMPLES]) if n), reverse=True)[:top]
    return ", ".join(f"{r}={n}" for n, r in ranked) or "none"


def check_skip_rate(counts: list[int], max_rate: float, min_seen: int, where: str = "data loader") -> None:
    """Raise ``DataError`` when more than ``max_rate`` of at least ``min_seen`` samples were bad."""
    rate, seen = skip_rate(counts)
    if seen >= max(1, min_seen) and rate > max_rate:
        skipped = seen - counts[SAMPLES]
        raise DataError(f"{where}: skip rate {rate:.1%} exceeds data.max_skip_rate={max_rate:.1%} "
                        f"({skipped} skipped of {seen}; top reasons: {summary(counts)}); "
                        f"fix or drop the bad shards, or raise data.max_skip_rate")


def unwrap_worker_error(e: DataError) -> DataError:
    """torch re-raises a worker's exception as ``type(e)("Caught ... Original Traceback ...: msg")``;
    give back the worker's own one-line message."""
    text = str(e)
    if "Original Traceback" not in text:
        return e
    last = text.rstrip().splitlines()[-1]
    for name in (f"{type(e).__module__}.{type(e).__qualname__}: ", f"{type(e).__qualname__}: "):
        if last.startswith(name):
            return type(e)(one_line(last[len(name):], 2000))
    return type(e)(one_line(last, 2000))
