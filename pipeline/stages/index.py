"""index: train the codecs search needs and write them to the index folder (index_dir): the
cell-join codec (projection.npy, centroids.npy [, coarse.npy]), codec.json, and for search.method pq the
populated IVF-PQ index.faiss. See lib/codec.py."""
from __future__ import annotations

import time

from ..core.io import Marker
from ..core.run import Run
from ..lib import codec as codec_lib

NAME = "index"
FIELDS = ("input", "embed.model", "codec", "search.cells", "search.cell_rows", "search.proj_dim", "search.cell_dim", "search.assign",
          "search.method")


def units(run: Run) -> list[Marker]:
    return [run.marker(NAME, NAME)]


def embedded_counts(run: Run) -> dict[int, int]:
    """Rows with a vector per shard index (shards with none left out)."""
    counts = {s.index: run.marker("embed", s.name).read()["rows"] for s in run.shards}
    return {k: v for k, v in counts.items() if v}


def indexed_rows(run: Run) -> int:
    """Rows the index stage indexed (0: every row failed, search has nothing to do; -1: not run)."""
    return (run.marker(NAME, NAME).read() or {}).get("rows", -1)


def run(run: Run, ex, stats: dict) -> dict:
    if not run.pending(NAME, [NAME]):
        return {"skipped": True}
    t0 = time.time()
    counts = embedded_counts(run)
    fp = run.fingerprint(NAME)
    if not counts:        # every row failed: nothing to index; later stages report the failed rows
        run.marker(NAME, NAME).write(fp, [], rows=0)
        return {"rows": 0, "seconds": round(time.time() - t0, 3)}
    codec, files = codec_lib.train_all(run.vectors(), counts, run.cfg.codec, run.dir(NAME), fp, run.cfg.embed.model,
                                       run.cfg.search.cells, run.cfg.search.proj_dim,
                                       ivfpq=run.cfg.search.method == "pq", cell_rows=run.cfg.search.cell_rows,
                                       cell_dim=run.cfg.search.cell_dim,
                                       nested=run.cfg.search.assign == "nested", ex=ex)
    run.marker(NAME, NAME).write(fp, files, rows=sum(counts.values()))
    codec["seconds"] = round(time.time() - t0, 3)
    return codec
