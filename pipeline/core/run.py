"""The run directory: every path a stage reads or writes, the shard listing, the manifest, and the
per-unit resume protocol. No stage builds another stage's paths by hand: it asks the Run.

Layout under run_dir (LAYOUT, recorded in manifest.json; a run dir of another layout is refused):
  manifest.json                       config, input listing, versions, per-stage fingerprints
  stage_stats.json                    per-stage stats and wall time (the driver writes it)
  ingest/NNNNN.parquet                one row per input row (key, gid, sha256, status, ...)
  embed/img_emb/img_emb_NNNNN.npy     fp16 vectors (clip-retrieval layout), rows aligned with
  embed/metadata/metadata_NNNNN.parquet
  embed/failed/NNNNN.parquet          rows that could not be embedded, with the reason
  search/assign/NNNNN.parquet         a row per (cell, vector) per shard, sorted by cell (method cells)
  search/zr/NNNNN.npy                 those rows' projections (fp16), for the join; deleted once it is done
  search/pairs/UNIT.parquet           verified pairs per cell block or query shard
  search/against|leaks/NAME-NNNNN.parquet  pairs against another run's registered index
  search/targets/NAME.faiss           that index's IVF-PQ, when its folder does not hold one
  group/rows/NNNNN.parquet, group/edges.parquet, group/groups.parquet
  report/                             samples, pairs, groups, histogram, summary.json, HTML
  export/                             deduplicated webdataset + keep-lists + HF parquet
  calibration/                        `dedup2b calibrate`: its tables, plot and audit sample
and in the index folder (index_dir, default indexes/<run name>):
  codec.json, projection.npy, centroids.npy [, index.faiss]   the index stage
  registry/                           the register stage: rows a later run can search against
  requests/                           `dedup2b remove`: the removal requests (lib/requests.py)
Each stage folder has _done/UNIT.json markers, written last.
"""
from __future__ import annotations

import hashlib
import platform
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .. import __version__
from ..sources import Shard, source_for
from .config import RunConfig, diff_fields
from .io import Marker, read_json, remove_orphan_temps, write_json
from .vectors import VectorStore

LAYOUT = 2    # 2: report/ (was reports/ + report/), registry/ in the index folder, calibration/


class StaleRunError(RuntimeError):
    """The run directory was made with another config or layout; outputs must not be mixed."""


# a FIELDS entry that is no config field: the stage reads the index's removal requests, and their
# version (lib/requests.version) joins its fingerprint; no request: the fingerprint is the config's
REQUESTS = "requests"

# config fields a run may change between resumes: how the work runs, not what it outputs
RESUMABLE_FIELDS = ("ray.", "export.", "embed.batch_size", "embed.actors", "embed.threads", "embed.decode_cpus")


class Run:
    """One run: its config, its shards, and the paths of every stage's files.

    `stage_fields` maps each stage name to the config fields its fingerprint covers (the stage
    list's FIELDS). `shards` defaults to the input listing; a run reopened from its manifest
    passes the recorded one, so it answers without the input present."""

    def __init__(self, cfg: RunConfig, stage_fields: dict[str, tuple[str, ...]], shards: list[Shard] | None = None):
        self.cfg = cfg
        self.root = cfg.run_path
        self.stage_fields = stage_fields
        self.source = source_for(cfg.input.format)
        self.shards: list[Shard] = shards if shards is not None else self.source.list_shards(cfg.input.path)
        self.shard_by_index = {s.index: s for s in self.shards}
        self.shard_by_name = {s.name: s for s in self.shards}

    # ---- resume protocol -----------------------------------------------------------------------
    def fingerprint(self, stage: str) -> str:
        fields = self.stage_fields[stage]
        fp = self.cfg.fingerprint(tuple(f for f in fields if f != REQUESTS))
        if REQUESTS in fields:
            from ..lib import requests
            version = requests.version(self.index_folder())
            if version:
                fp = hashlib.sha256(f"{fp}:{version}".encode()).hexdigest()[:16]
        return fp

    def index_folder(self) -> Path:
        """The index this run registers into: its own, or the one an incremental run extends."""
        return Path(self.cfg.against or self.cfg.index_path)

    def dir(self, stage: str) -> Path:
        """The one folder a stage writes (its outputs and its _done markers)."""
        if stage == "index":
            return self.cfg.index_path
        if stage == "register":    # an incremental run extends the index it searched against
            return self.index_folder() / "registry"
        return self.root / stage

    def marker(self, stage: str, unit: str) -> Marker:
        return Marker(self.dir(stage), unit)

    def pending(self, stage: str, units: list[str]) -> list[str]:
        fp = self.fingerprint(stage)
        return [u for u in units if not self.marker(stage, u).valid(fp)]

    def shard_names(self) -> list[str]:
        return [s.name for s in self.shards]

    @property
    def run_id(self) -> str:
        """This run's unit name in folders several runs share (an index's registry)."""
        return "run-" + hashlib.sha256(str(self.root.resolve()).encode()).hexdigest()[:12]

    # ---- paths and readers, by stage ----------------------------------------------------------
    def ingest_file(self, shard: str) -> Path:
        return self.dir("ingest") / f"{shard}.parquet"

    def ingest_table(self, columns: list[str] | None = None) -> pa.Table:
        return pa.concat_tables([pq.read_table(self.ingest_file(n), columns=columns) for n in self.shard_names()])

    def images(self, gids) -> dict[int, bytes]:
        """The input's image bytes of the given rows (gid -> bytes), read shard by shard through
        the source (its member names from the ingest table); rows without an image are left out."""
        wanted = {int(g) for g in gids}
        out: dict[int, bytes] = {}
        for shard in self.shards:
            sel = [g for g in wanted if g >> 32 == shard.index]
            if not sel:
                continue
            t = pq.read_table(self.ingest_file(shard.name), columns=["gid", "member"], filters=[("gid", "in", sel)])
            members = {m: g for g, m in zip(t["gid"].to_pylist(), t["member"].to_pylist()) if m}
            out.update({int(g): data for g, data in self.source.read_images(shard, members)})
        return out

    def embed_dir(self) -> Path:
        return self.dir("embed")

    def failed_file(self, shard: str) -> Path:
        return self.dir("embed") / "failed" / f"{shard}.parquet"

    def vectors(self) -> VectorStore:
        return VectorStore(self.dir("embed"), {s.index: s.name for s in self.shards})

    def pair_files(self) -> list[Path]:
        return sorted((self.dir("search") / "pairs").glob("*.parquet"))

    def cross_dir(self, kind: str) -> Path:
        """Pairs against another run's index: kind 'against' (incremental) or 'leaks' (evaluation sets)."""
        return self.dir("search") / kind

    def target_index_file(self, name: str) -> Path:
        return self.dir("search") / "targets" / f"{name}.faiss"

    def group_rows_dir(self) -> Path:
        """The group stage's rows: a parquet dataset, a file per shard (read as one table)."""
        return self.dir("group") / "rows"

    def group_rows_file(self, shard: str) -> Path:
        return self.group_rows_dir() / f"{shard}.parquet"

    def group_groups_file(self) -> Path:
        return self.dir("group") / "groups.parquet"

    def group_edges_file(self) -> Path:
        return self.dir("group") / "edges.parquet"

    def report_dir(self) -> Path:
        return report_dir(self.root)

    def summary_file(self) -> Path:
        return report_dir(self.root) / "summary.json"

    def export_dir(self) -> Path:
        return self.dir("export")

    def calibration_dir(self) -> Path:
        return self.root / "calibration"

    def stage_stats_file(self) -> Path:
        return self.root / "stage_stats.json"

    # ---- manifest ------------------------------------------------------------------------------
    def open_manifest(self, fresh: bool = False) -> None:
        """Write manifest.json, or check that an existing one was made with the same config."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = manifest_file(self.root)
        config = self.cfg.to_dict()
        if path.exists():
            old = read_json(path)
            check_layout(self.root, old)
            changed = [f for f in diff_fields(old.get("config", {}), config) if not f.startswith(RESUMABLE_FIELDS)]
            if changed and not fresh:
                raise StaleRunError(
                    f"{self.root}: this run directory was made with another config (changed: "
                    f"{', '.join(changed)}). Use a new --run-dir, or pass --fresh to redo the stages "
                    "these fields affect.")
        for stage in self.stage_fields:
            remove_orphan_temps(self.dir(stage))
        write_json(path, {
            "layout": LAYOUT,
            "config": config,
            "fingerprints": {s: self.fingerprint(s) for s in self.stage_fields},
            "inputs": [{"index": s.index, "shard": s.name, "parquet": str(s.parquet), "data": str(s.data),
                        "bytes": s.data.stat().st_size if s.data.exists() else None} for s in self.shards],
            "versions": _versions(),
        })


def report_dir(run_path) -> Path:
    """The report stage's folder of a run directory, for callers that hold no Run (front doors)."""
    return Path(run_path) / "report"


def manifest_file(run_path) -> Path:
    return Path(run_path) / "manifest.json"


def read_manifest(run_path) -> dict:
    """A run directory's manifest, its layout checked."""
    path = manifest_file(run_path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: not a run directory (run `dedup2b run` first)")
    manifest = read_json(path)
    check_layout(Path(run_path), manifest)
    return manifest


def check_layout(root: Path, manifest: dict) -> None:
    if manifest.get("layout") != LAYOUT:
        raise StaleRunError(
            f"{root}: this run directory was written by an earlier dedup2b (layout "
            f"{manifest.get('layout', 1)}, this version writes layout {LAYOUT}: the report moved to report/, "
            "registered rows to the index's registry/, calibration to calibration/). Its files would be "
            "misread: run again into a new --run-dir (and a new --index-dir), or delete this one.")


def manifest_shards(manifest: dict) -> list[Shard]:
    return [Shard(int(i["index"]), i["shard"], Path(i["parquet"]), Path(i["data"])) for i in manifest["inputs"]]


_DISTRIBUTIONS = {"numpy": ("numpy",), "pyarrow": ("pyarrow",), "faiss": ("faiss-cpu", "faiss-gpu"),
                  "torch": ("torch",), "timm": ("timm",), "open_clip": ("open_clip_torch", "open-clip-torch"),
                  "ray": ("ray",)}


def _versions() -> dict[str, str]:
    """Versions of the libraries that shape the outputs, from their installed metadata (importing
    torch and timm only to read a version costs seconds per stage process)."""
    from importlib.metadata import PackageNotFoundError, version
    out = {"dedup2b": __version__, "python": platform.python_version()}
    for mod, dists in _DISTRIBUTIONS.items():
        out[mod] = "missing"
        for dist in dists:
            try:
                out[mod] = version(dist)
                break
            except PackageNotFoundError:
                continue
    return out
