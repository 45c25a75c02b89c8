"""Input sources: each module reads one input layout and answers the same questions.

    FORMAT                         the `input.format` value that selects it
    LOOKS_FOR, detect(path)        what the format's files look like, and whether a folder has them
    HAS_IMAGES                     whether rows carry image bytes (decoded by the embed stage,
                                   exported, shown in the HTML report)
    TAR_SHARDS                     whether its shards are tars the webdataset export copies from
    list_shards(path)              the input's shards, in order (a shard: index, name, two files)
    validate(shards)               checks across every file, before any work (raises InputError)
    ingest_shard(shard, cfg)       the ingest table of one shard (base.SCHEMA): a row per input
                                   row, bad rows as status failed with the reason
    count_rows(shard)              the shard's input rows counted from its files alone (the
                                   report's invariant: input = kept + removed + failed)
  image sources also:
    read_images(shard, wanted)     (value, bytes) for wanted member names
    copy_rows(shard, members, out) (optional: sources whose rows are parquet rows) the rows of those
                                   members written to `out` with the input file's own schema; the
                                   hf export then keeps the input's columns unchanged
    webdataset_members(shard, row) (optional: image sources without tar shards) a kept row as
                                   webdataset members (name, bytes, mtime), bytes unchanged
  vector sources also:
    unit_vectors(shard, rows, cfg) the input's vectors of those rows as fp16 unit vectors
    in_place(shard, rows, cfg)     the input's own vector file where the run reads it as it is
                                   (memory-mapped, never copied), else None

Adding a format: one module with these names, one line in SOURCES, and the name in
`InputConfig.format`'s list.
"""
from __future__ import annotations

from types import ModuleType

from . import embeddings, folder, hf, img2dataset
from .base import InputError, Shard

# hf.detect defers to img2dataset and embeddings (their folders hold parquet files too)
SOURCES: dict[str, ModuleType] = {m.FORMAT: m for m in (img2dataset, embeddings, folder, hf)}


def detect(path) -> str:
    """The format of an input folder when `input.format` is not given; an InputError listing what
    was looked for when no format matches, or naming both when two do."""
    from pathlib import Path
    folder = Path(path)
    if not folder.is_dir():
        raise InputError(f"{folder}: input folder not found")
    found = [name for name, m in SOURCES.items() if m.detect(folder)]
    if len(found) == 1:
        return found[0]
    looked = "; ".join(f"{name}: {m.LOOKS_FOR}" for name, m in SOURCES.items())
    if not found:
        raise InputError(f"{folder}: no input format recognised (looked for {looked}); give --input-format")
    raise InputError(f"{folder}: holds files of several formats ({', '.join(found)}); give --input-format")


def source_for(fmt: str) -> ModuleType:
    try:
        return SOURCES[fmt]
    except KeyError:
        raise InputError(f"input.format: unknown format {fmt!r}; known: {', '.join(SOURCES)}") from None


__all__ = ["SOURCES", "InputError", "Shard", "detect", "source_for"]
