"""``ResumableLoader``: torchdata's ``StatefulDataLoader`` over ``StreamingImages``, resumable at the batch trained last.

torchdata snapshots every worker's stream state with each batch and, on load, gives each worker its own
state back and continues the round robin at the right worker (a plain DataLoader would restart it at
worker 0). What this class adds:

- the epoch: the main process numbers epochs and writes the number into the dataset before each pass,
  so an epoch's order is a function of (seed, epoch) whether workers persist or not;
- the trained position: Lightning fetches one batch ahead of the step it trains, so the loader's own
  state at checkpoint time is one batch too far. Under a trainer, ``consume()`` (called by the data
  module's ``on_before_batch_transfer``) marks a batch as trained, and ``state_dict()`` is the state
  right after the last trained batch. Without a trainer, every yielded batch counts as trained;
- skip counts that match the position (workers send their counts with every batch, and a last tally
  per epoch), restored on resume, plus the skip-rate check on what this rank has received;
- a worker's ``DataError`` re-raised as its own one-line message, not torch's "Caught ... in DataLoader
  worker process 0. Original Traceback" text.

State: ``{"next_epoch", "resume" (torchdata state or None: start next_epoch fresh), "base" (counts before
that epoch), "workers" (per-worker counts within it), "order" (what the data order depends on)}``. Under a
process group the states of all ranks are gathered into ``{"ranks": {rank: state}}``, since Lightning writes
rank 0's checkpoint only, and each rank loads its own. A state written for another order (batch size,
workers, ranks, shards, seed...) starts the next epoch fresh and says so, instead of replaying positions that
no longer mean the same samples.
"""

from __future__ import annotations

import copy
import warnings
from collections import deque
from collections.abc import Iterator
from typing import Any

import torch.distributed as dist
from torchdata.stateful_dataloader import StatefulDataLoader

from vaetrain.data import faults
from vaetrain.data.faults import DataError
from vaetrain.data.pipeline import StreamingImages

STATE_VERSION = 1


class ResumableLoader(StatefulDataLoader):
    def __init__(self, dataset: StreamingImages, *, num_workers: int, pin_memory: bool, persistent_workers: bool,
                 prefetch_factor: int, order: dict):
        extra = {"persistent_workers": persistent_workers, "prefetch_factor": prefetch_factor} if num_workers else {}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*set_vital.*")  # torchdata 0.11 on torch >= 2.6
            super().__init__(dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory, **extra)
        self.order = order
        self.spec = dataset.spec
        self.track_consumption = False   # set when a trainer drives the loader
        self._next_epoch = 0
        self._epoch: int | None = None   # the epoch being streamed (None: not since construction or load)
        self._resuming = False
        self._start_state: dict | None = None
        self._idle_state: dict | None = None
        self._base = faults.zeros()
        self._received: dict[int, list[int]] = {}
        self._consumed: dict[int, list[int]] = {}
        self._pending: deque = deque()
        self._consumed_state: dict | None = None
        self._exhausted = False
        self._yielded = 0
        self.notice: str | None = None

    # --- iteration -------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        resumed, self._resuming = self._resuming, False
        if not resumed:
            self._base = self._total(self._consumed)
            self._consumed, self._start_state = {}, None
        self._received = dict(self._consumed)
        self._epoch, self._next_epoch = self._next_epoch, self._next_epoch + 1
        self._pending.clear()
        self._consumed_state, self._exhausted, self._yielded = self._start_state, False, 0
        self.dataset.set_epoch(self._epoch)
        inner = super().__iter__()
        return self._stream(inner, resumed)

    def _stream(self, inner, resumed: bool) -> Iterator[dict]:
        while True:
            try:
                item = next(inner)
            except StopIteration:
                break
            except DataError as e:
                self.close()
                raise faults.unwrap_worker_error(e) from None
            worker, counts = int(item.pop("__worker__")), list(item.pop("__counts__"))
            self._received[worker] = counts
            if not self.track_consumption:
                self._consumed[worker] = counts
            try:
                faults.check_skip_rate(self._total(self._received), self.spec.max_skip_rate,
                                       self.spec.min_samples_for_skip_rate)
            except DataError:
                self.close()
                raise
            if item.pop("__tally__", False):
                continue
            self._yielded += 1
            if self.track_consumption:
                self._pending.append((copy.deepcopy(super().state_dict()), dict(self._received)))
            yield item
        self._exhausted = True
        if not self._pending:
            self._consumed = dict(self._received)
        if self._yielded == 0 and not resumed:
            raise DataError(f"data: epoch {self._epoch} gave no batch of {self.spec.batch_size} "
                            f"({faults.summary(self._total(self._received))}; "
                            f"{self._total(self._received)[faults.SAMPLES]} usable samples); check the data and "
                            f"data.batch_size / data.drop_last")

    def close(self) -> None:
        """Stop the worker processes now (after an error: a stale iterator would otherwise be inherited by
        the next loader's forked workers)."""
        it, self._iterator = self._iterator, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()

    def consume(self) -> None:
        """The trainer has taken the oldest batch handed out and not yet consumed."""
        if not self._pending:
            return
        self._consumed_state, self._consumed = self._pending.popleft()
        if self._exhausted and not self._pending:
            self._consumed = dict(self._received)

    # --- counts ----------------------------------------------------------------------------
    def _total(self, per_worker: dict[int, list[int]]) -> list[int]:
        total = list(self._base)
        for counts in per_worker.values():
            total = faults.add(total, counts)
        return total

    def counts(self) -> list[int]:
        """This rank's counts, up to the last trained batch."""
        return self._total(self._consumed)

    # --- state -----------------------------------------------------------------------------
    def _make(self, next_epoch: int, resume: dict | None, base: list[int], workers: dict) -> dict[str, Any]:
        return {"version": STATE_VERSION, "next_epoch": next_epoch, "resume": resume, "base": list(base),
                "workers": {int(k): list(v) for k, v in workers.items()}, "order": dict(self.order)}

    def state_dict(self) -> dict[str, Any]:
        """This rank's state; under a process group, every rank's (a collective: checkpoints are written by all
        ranks together)."""
        mine = self._local_state()
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return mine
        states: list = [None] * dist.get_world_size()
        dist.all_gather_object(states, mine)
        return {"version": STATE_VERSION, "ranks": {int(s["order"]["rank"]): s for s in states}}

    def _local_state(self) -> dict[str, Any]:
        if self._epoch is None:
            return copy.deepcopy(self._idle_state) if self._idle_state else \
                self._make(self._next_epoch, None, self._base, {})
        if self._exhausted and not (self.track_consumption and self._pending):
            return self._make(self._epoch + 1, None, self._total(self._consumed), {})
        if self.track_consumption:
            resume = self._consumed_state
        else:
            resume = copy.deepcopy(super().state_dict()) if self._yielded else self._start_state
        return self._make(self._epoch, resume, self._base, self._consumed if resume is not None else {})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        if state.get("version") != STATE_VERSION:
            raise DataError(f"data: the checkpoint's loader state has version {state.get('version')!r}; this "
                            f"vaetrain reads version {STATE_VERSION} (resume with the vaetrain that wrote it)")
        if "ranks" in state:
            ranks = state["ranks"]
            rank = int(self.order["rank"])
            if rank not in ranks:  # more ranks than the run that wrote it: this rank starts the next epoch afresh
                some = next(iter(ranks.values()))
                state = {**some, "next_epoch": some["next_epoch"] + (some["resume"] is not None), "resume": None,
                         "base": faults.zeros(), "workers": {}, "order": None}
            else:
                state = ranks[rank]
        base, workers, resume = list(state["base"]), dict(state["workers"]), state["resume"]
        next_epoch = int(state["next_epoch"])
        if state.get("order") is not None and state["order"] != self.order:
            changed = sorted(k for k in set(self.order) | set(state.get("order") or {})
                             if self.order.get(k) != (state.get("order") or {}).get(k))
            self.notice = (f"vaetrain data: the checkpoint's data position was written for another data order "
                           f"(changed: {', '.join(changed)}); continuing with a fresh epoch "
                           f"{next_epoch + (resume is not None)}")
            print(self.notice, flush=True)
            for counts in workers.values():
                base = faults.add(base, counts)
            next_epoch, resume, workers = next_epoch + (resume is not None), None, {}
        self._next_epoch, self._base = next_epoch, base
        self._consumed = {int(k): list(v) for k, v in workers.items()}
        self._epoch, self._idle_state = None, self._make(next_epoch, resume, base, workers)
        super().load_state_dict({})   # drops any running iterator
        self.next_iter_state = None
        if resume is not None:
            super().load_state_dict(copy.deepcopy(resume))
        self._resuming, self._start_state = resume is not None, resume

    def set_epoch(self, epoch: int) -> None:
        """Make ``epoch`` the next epoch streamed (from its start)."""
        if self._epoch is not None or self._resuming:
            self._base = self._total(self._consumed)
            self._consumed = {}
        self._next_epoch, self._resuming, self._start_state = epoch, False, None
        self._epoch, self._idle_state = None, None
        super().load_state_dict({})
        self.next_iter_state = None
