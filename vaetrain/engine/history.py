"""Loggers whose history survives resumes (pre-emption, SLURM requeues, crashes).

- :class:`CSVLogger`: Lightning's CSV logger deletes ``metrics.csv`` whenever a new writer starts in the same
  folder, so every resumed segment erased the last one's log. This one keeps the rows of the steps before the
  first step the resumed run logs (those after the checkpoint are re-run and logged again) and appends.
- :class:`WandbLogger`: one wandb run per vaetrain run folder: its id is kept in ``<run_dir>/wandb_run_id`` and
  a resumed run continues it (``resume="allow"``), offline or online.

Both take ``resume_at``: the batch position of the checkpoint the run resumes from (None: a fresh run).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger as _LightningCSVLogger
from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter as _LightningExperimentWriter

from vaetrain.safe import atomic_write


class _KeepingWriter(_LightningExperimentWriter):
    """Lightning's writer, except that a resumed run keeps the existing ``metrics.csv``: at its first save the
    rows from the first step it logs on are dropped (they are being re-run) and the new rows appended."""

    def __init__(self, log_dir: str, resuming: bool):
        self.resuming = resuming
        self._old: tuple[list[str], list[dict]] | None = None
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        if not self.resuming:  # a fresh run in a used folder starts a fresh log
            path.unlink()
            return
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            self._old = (list(reader.fieldnames or []), list(reader))

    def save(self) -> None:
        if self._old is not None and self.metrics:
            first = min(int(m["step"]) for m in self.metrics)
            keys, rows = self._old
            rows = [r for r in rows if r.get("step") not in (None, "") and int(float(r["step"])) < first]
            buf = io.StringIO()
            writer = csv.DictWriter(buf, fieldnames=sorted(keys))  # Lightning appends in sorted-key order
            writer.writeheader()
            writer.writerows(rows)
            atomic_write(self.metrics_file_path, buf.getvalue())
            self.metrics_keys, self._old = sorted(keys), None
        super().save()


class CSVLogger(_LightningCSVLogger):
    def __init__(self, save_dir: str, name: str = "logs", version: str | int | None = "", resume_at: int | None = None,
                 **kwargs):
        super().__init__(save_dir, name=name, version=version, **kwargs)
        self.resume_at = resume_at

    @property
    def experiment(self) -> _KeepingWriter:
        if self._experiment is None:
            self._experiment = _KeepingWriter(self.log_dir, self.resume_at is not None)
        return self._experiment


class WandbLogger(_LightningWandbLogger):
    ID_FILE = "wandb_run_id"

    def __init__(self, save_dir: str, resume_at: int | None = None, **kwargs):
        id_file = Path(save_dir) / self.ID_FILE
        if resume_at is not None and id_file.is_file() and not kwargs.get("id"):
            kwargs.update(id=id_file.read_text().strip(), resume="allow")
        super().__init__(save_dir=save_dir, **kwargs)
        self._id_file = id_file

    @property
    def experiment(self):
        run = super().experiment
        if getattr(run, "id", None) and not self._id_file.is_file():
            atomic_write(self._id_file, run.id + "\n")
        return run
