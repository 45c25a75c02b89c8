"""The stages, in order: the one list that fingerprints, invalidation, `dedup2b status`, the CLI's
per-stage subcommands and `jobs/stage.py` are derived from.

Every stage module has the same shape (the Stage protocol):
    NAME                  its name: CLI subcommand, stats key, folder (Run.dir(NAME))
    FIELDS                the config fields its outputs depend on, its inputs' included: their
                          hash is the fingerprint in its done markers; the entry "requests"
                          adds the version of the index's removal requests (core.run.REQUESTS)
    units(run)            the done markers (core.io.Marker) that say its work is complete
    run(run, ex, stats)   do the pending work with executor `ex`; `stats` holds the earlier stages'
                          stats; returns this stage's stats
A stage reads the files of the stages before it (through the Run's paths) and writes only its own
folder. The driver (driver.py) runs them in order; a stage that had pending units invalidates
every later stage's markers. Adding a stage: one module, one line in STAGES.
"""
from __future__ import annotations

from typing import Protocol

from ..core.io import Marker
from ..core.run import Run
from . import embed, export, group, index, ingest, register, report, search, verify

STAGES = (ingest, embed, index, search, verify, group, register, report, export)
NAMES: tuple[str, ...] = tuple(s.NAME for s in STAGES)
BY_NAME = {s.NAME: s for s in STAGES}
FIELDS = {s.NAME: s.FIELDS for s in STAGES}


class Stage(Protocol):
    NAME: str
    FIELDS: tuple[str, ...]

    def units(self, run: Run) -> list[Marker]: ...

    def run(self, run: Run, ex, stats: dict) -> dict: ...


def open_run(cfg, shards=None) -> Run:
    """The Run of a config, with every stage's fingerprint fields."""
    return Run(cfg, FIELDS, shards)
