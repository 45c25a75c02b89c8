"""The run directory: paths, shard listing, manifest, and the per-unit resume protocol.

Layout under run_dir:
  manifest.json                       config, input listing, versions, per-stage fingerprints
  ingest/NNNNN.parquet                one row per input row (key, gid, sha256, status, ...)
  embed/img_emb/img_emb_NNNNN.npy     fp16 vectors (clip-retrieval layout), rows aligned with
  embed/metadata/metadata_NNNNN.parquet
  embed/failed/NNNNN.parquet          rows that could not be embedded, with the reason
  index/ (or index_dir)               IVF-PQ index + cell-join codec (see index.py)
  search/assign/NNNNN.parquet         cell assignments per shard (method cells)
  search/pairs/UNIT.parquet           verified pairs per cell block or query shard
  group/rows.parquet, group/edges.parquet
  reports/                            samples, pairs, groups, histogram, summary.json
  export/                             deduplicated webdataset + keep-lists
Each stage folder has _done/UNIT.json markers, written last.
"""
from __future__ import annotations

import platform
from pathlib import Path

from . import __version__
from .config import RunConfig, diff_fields
from .ingest import Shard, list_shards
from .io import Marker, read_json, remove_orphan_temps, write_json


class StaleRunError(RuntimeError):
    """The run directory was made with another config; outputs must not be mixed."""


class Run:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.root = cfg.run_path
        if cfg.input.format == "embeddings":
            from . import embeddings
            self.shards: list[Shard] = embeddings.list_shards(cfg.input.path)
        else:
            self.shards = list_shards(cfg.input.path)
        self.shard_by_index = {s.index: s for s in self.shards}

    def dir(self, stage: str) -> Path:
        return self.cfg.index_path if stage == "index" else self.root / stage

    def marker(self, stage: str, unit: str) -> Marker:
        return Marker(self.dir(stage), unit)

    def pending(self, stage: str, units: list[str]) -> list[str]:
        fp = self.cfg.fingerprint(stage)
        return [u for u in units if not self.marker(stage, u).valid(fp)]

    def shard_names(self) -> list[str]:
        return [s.name for s in self.shards]

    def open_manifest(self, fresh: bool = False) -> None:
        """Write manifest.json, or check that an existing one was made with the same config."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / "manifest.json"
        config = self.cfg.to_dict()
        if path.exists() and not fresh:
            old = read_json(path)
            changed = [f for f in diff_fields(old.get("config", {}), config) if not f.startswith(RESUMABLE_FIELDS)]
            if changed:
                raise StaleRunError(
                    f"{self.root}: this run directory was made with another config (changed: "
                    f"{', '.join(changed)}). Use a new --run-dir, or pass --fresh to redo the stages "
                    "these fields affect.")
        for stage in ("ingest", "embed", "index", "search", "group", "report", "export"):
            remove_orphan_temps(self.dir(stage))
        write_json(path, {
            "config": config,
            "fingerprints": {s: self.cfg.fingerprint(s) for s in RunConfig.STAGE_FIELDS},
            "inputs": [{"shard": s.name, "parquet": str(s.parquet), "data": str(s.data),
                        "bytes": s.data.stat().st_size if s.data.exists() else None} for s in self.shards],
            "versions": _versions(),
        })


# config fields a run may change between resumes: how the work runs, not what it outputs
RESUMABLE_FIELDS = ("ray.", "export.", "embed.batch_size", "embed.actors", "embed.threads", "embed.decode_cpus")


def _versions() -> dict[str, str]:
    out = {"dedup2b": __version__, "python": platform.python_version()}
    for mod in ("numpy", "pyarrow", "faiss", "torch", "timm", "open_clip", "ray"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:
            out[mod] = "missing"
    return out
