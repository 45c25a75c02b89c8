"""`dedup2b find`: which rows of a built index are copies of these images?

The question behind takedown / opt-out requests and "was this evaluation image in my training
set?". Given image files (or folders of them), every registered row of an index folder whose
stored vector is within the index's threshold of a query image's vector is listed.

- The index: an index folder with a registry (lib/registry.py's `Target`: the registered runs and
  their stored vectors, memory-mapped). A folder without one (the register stage did not run) is
  refused, named.
- The model: codec.json's `model`, the spec every vector of the index was made with. Query images
  go through the embed stage's own path: lib/images.crop_bytes (decode, resize, centre crop) and
  lib/models.Embedder (normalised on the model's device, L2-normalised float32).
- The threshold: `threshold` when given, else the one the index's run used (search.threshold in the
  manifest of the run that built the folder, the first in registry/runs.json), else the model's
  default (core/config.py default_threshold).
- The search is exact and streamed: every stored vector, shard by shard, CHUNK_ROWS rows at a time,
  in one fp16 GEMM against the few queries (torch, CPU; fp32 accumulation, fp16 results: off by
  < 3e-4, measured here), keeping candidates down to threshold - FP16_MARGIN (minus
  the run's input.norm_tolerance for released vectors read in place, whose norms are only within
  that of 1). Every candidate is then re-scored exactly in float32 against the stored vectors
  (Target.get: the same vectors and normalisation the pipeline's verification uses), and kept at
  `similarity >= threshold`. Memory is one chunk plus the candidates; no IVF-PQ index is needed (an
  approximate one would miss copies the exact pass finds; bench/find.py measures both).
- Pixel verification plugs in at `check_pixels` (a `verify(query_bytes, row) -> (ok, score)` over
  the rows whose image bytes `row_images` can read back from their run's input); without a
  verifier the `pixel_check` column stays null.
"""
from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .core.arrays import unique
from .core.config import default_threshold
from .core.run import read_manifest
from .core.vectors import link_path, meta_path
from .lib import codec as codec_lib
from .lib.registry import Target, registry_dir
from .sources.folder import IMAGE_EXTS

COLUMNS = ["query", "key", "url", "caption", "similarity", "gid", "pixel_check"]
CHUNK_ROWS = 65536       # stored vectors per GEMM (96 MB of fp16 at d = 768)
FP16_MARGIN = 0.01       # the fp16 GEMM's error is < 3e-4 (measured); candidates are re-scored exactly
EMBED_BATCH = 32

Verifier = Callable[[bytes, dict], "tuple[bool, float]"]


class FindError(ValueError):
    """Nothing to search with, or nowhere to search: the message says which."""


def is_image_name(name: str) -> bool:
    stem, dot, ext = name.rpartition(".")
    return bool(dot) and ext.lower() in IMAGE_EXTS


def image_files(paths: Iterable) -> tuple[list[Path], list[tuple[str, str]]]:
    """The query files of `paths`: a file as given (whatever its name), a folder's image files
    (IMAGE_EXTS, any depth, sorted). Returns (files, [(path, reason)] of paths that are not there)."""
    files, missing = [], []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            for folder, dirs, names in os.walk(p):
                dirs.sort()
                files += [Path(folder, n) for n in sorted(names) if is_image_name(n)]
        elif p.is_file():
            files.append(p)
        else:
            missing.append((str(p), "no such file or folder"))
    return files, missing


def index_folder(name) -> Path:
    """An index given by NAME (indexes/NAME under the current folder) or by its folder path: of the
    two, the one that is an index folder (holds codec.json), the path first; else, as for
    --against, the path when it is a folder or has a "/", else indexes/NAME."""
    name = str(name)
    path, named = Path(name), Path("indexes") / name
    for p in (path, named):
        if (p / "codec.json").is_file():
            return p.resolve()
    return (path if path.is_dir() or "/" in name else named).resolve()


@dataclass
class Index:
    """A registered index folder opened for lookups: its Target (registry + stored vectors), the
    model its vectors were made with, and the threshold its run used."""
    folder: Path
    target: Target
    model: str
    run_threshold: float
    threshold_from: str
    norm_tolerance: dict = field(default_factory=dict)   # run dir -> input.norm_tolerance (in-place vectors)

    def threshold(self, override: float | None = None) -> float:
        if override is not None and not -1.0 <= override <= 1.0:
            raise FindError(f"threshold {override}: a cosine in [-1, 1]")
        return float(self.run_threshold if override is None else override)


def open_index(folder) -> Index:
    """Open an index folder (refused, named, when it is not a dedup2b index or has no registry)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FindError(f"{folder}: no such index folder")
    model = codec_lib.check(folder)["model"]        # codec.json: the model of every stored vector
    target = Target(folder, model)                  # refuses a folder without registry/, naming it
    configs = {}
    for r in target.runs:
        try:
            configs[r["run_dir"]] = read_manifest(r["run_dir"])["config"]
        except (OSError, ValueError, KeyError):     # the run directory is gone: vectors still are
            configs[r["run_dir"]] = None
    first = configs.get(target.runs[0]["run_dir"]) if target.runs else None
    recorded = ((first or {}).get("search") or {}).get("threshold")
    if recorded is not None:
        threshold, origin = float(recorded), f"search.threshold of {target.runs[0]['run_dir']}"
    else:
        threshold, origin = default_threshold(model), f"default for {model}"
    tol = {run: ((cfg or {}).get("input") or {}).get("norm_tolerance") for run, cfg in configs.items()}
    return Index(folder, target, model, threshold, origin, tol)


# ---------------------------------------------------------------------------------- queries
def embed_images(files: list[Path], model: str, device: str | None = None, embedder=None):
    """Query files -> (names, unit float32 vectors, {name: bytes}, [(name, reason)] not decodable),
    through the embed stage's decode + preprocessing and the model of the index (`embedder`: an
    lib.models.Embedder of that spec already loaded)."""
    from .lib.images import crop_bytes
    from .lib.models import Embedder, preprocess_for
    from .stages.embed import decode_error
    if model.startswith("precomputed:"):
        raise FindError(f"this index holds released vectors ({model}): the model that made them is not "
                        "known here, so images cannot be embedded for it; pass query vectors "
                        "(dedup2b.find(..., vectors=...)) made with that model")
    pp = preprocess_for(model)
    names, pixels, data, bad = [], [], {}, []
    for f in files:
        name = str(f)
        try:
            raw = f.read_bytes()
            px = crop_bytes(raw, pp)
        except Exception as exc:   # a file that cannot be read or decoded is skipped, with its reason
            bad.append((name, f"unreadable: {exc.strerror}" if isinstance(exc, OSError) and exc.strerror
                        else decode_error(exc)))
            continue
        names.append(name)
        pixels.append(px)
        data[name] = raw
    if not names:
        return names, np.zeros((0, 0), np.float32), data, bad
    embedder = embedder or Embedder(model, device=device)
    vecs = np.concatenate([embedder(np.stack(pixels[i:i + EMBED_BATCH]))
                           for i in range(0, len(pixels), EMBED_BATCH)])
    vecs = vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
    return names, vecs.astype(np.float32), data, bad


# ----------------------------------------------------------------------------------- search
def search(index: Index, queries: np.ndarray, threshold: float,
           chunk: int = CHUNK_ROWS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(query row, gid, exact float32 cosine) of every stored row at or above `threshold`.

    Every shard is streamed `chunk` rows at a time through one fp16 GEMM against the queries; rows
    within the margin of the threshold for some query are re-scored in float32 from the stored
    vectors (Target.get: normalised as the pipeline verifies them) before they count. Memory: one
    chunk and its candidates."""
    import torch
    queries = np.asarray(queries, np.float32)
    empty = np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    if queries.ndim != 2 or not len(queries):
        return empty
    if queries.shape[1] != index.target.dim:
        raise FindError(f"query vectors have dimension {queries.shape[1]}, {index.folder} holds "
                        f"{index.target.dim}")
    q16 = torch.from_numpy(np.ascontiguousarray(queries.T)).half()
    q32 = torch.from_numpy(np.ascontiguousarray(queries.T))
    out_q, out_g, out_s = [empty[0]], [empty[1]], [empty[2]]
    for store, run in zip(index.target.stores, index.target.runs):
        for shard, name in sorted(store.shards.items()):
            gids, vecs = store.shard(shard)
            cut = threshold - FP16_MARGIN
            if link_path(store.embed_dir, name).exists():    # the input's own rows: norms within tolerance
                tol = index.norm_tolerance.get(run["run_dir"])
                cut -= 0.05 if tol is None else float(tol)
            for lo in range(0, len(gids), chunk):
                with warnings.catch_warnings():     # a read-only memmap: torch only reads it
                    warnings.simplefilter("ignore", UserWarning)
                    b = torch.from_numpy(np.ascontiguousarray(vecs[lo:lo + chunk]))
                approx = ((b @ q16) if b.dtype == torch.float16 else (b.float() @ q32)).float().numpy()
                near = np.nonzero((approx >= cut).any(axis=1))[0]
                if not len(near):
                    continue
                g = gids[lo + near]
                exact = index.target.get(g) @ queries.T          # (candidate rows, queries), float32
                r, c = np.nonzero(exact >= threshold)
                out_q.append(c.astype(np.int64))
                out_g.append(g[r])
                out_s.append(exact[r, c].astype(np.float32))
    return np.concatenate(out_q), np.concatenate(out_g), np.concatenate(out_s)


def describe_rows(index: Index, gids: np.ndarray) -> pd.DataFrame:
    """gid, key, url, caption of registered rows: key from the registry, url and caption (as the
    input gave them) from the embed stage's metadata of their shard; only the wanted rows are kept."""
    gids = unique(np.asarray(gids, np.int64))
    cols = {"gid": pd.Series([], dtype="int64"), "key": pd.Series([], dtype=object)}
    if not len(gids):
        return pd.DataFrame(cols).assign(url=pd.Series([], dtype=object), caption=pd.Series([], dtype=object))
    reg = pq.read_table(registry_dir(index.folder) / "registry.parquet", columns=["gid", "key"],
                        filters=[("gid", "in", gids.tolist())]).to_pandas()
    owner = {i: st for st in index.target.stores for i in st.shards}
    metas = []
    for shard in unique(gids >> 32):
        st = owner[int(shard)]
        path = meta_path(st.embed_dir, st.shards[int(shard)])
        have = set(pq.read_schema(path).names)
        want = [c for c in ("gid", "url", "caption") if c in have]
        m = pq.read_table(path, columns=want, filters=[("gid", "in", gids[(gids >> 32) == shard].tolist())])
        metas.append(m.to_pandas())
    meta = pd.concat(metas, ignore_index=True)
    for c in ("url", "caption"):
        if c not in meta:
            meta[c] = None
    return reg.merge(meta[["gid", "url", "caption"]], on="gid", how="left")


def _empty() -> pd.DataFrame:
    return pd.DataFrame({"query": pd.Series([], dtype=object), "key": pd.Series([], dtype=object),
                         "url": pd.Series([], dtype=object), "caption": pd.Series([], dtype=object),
                         "similarity": pd.Series([], dtype="float32"), "gid": pd.Series([], dtype="int64"),
                         "pixel_check": pd.Series([], dtype="boolean")})


def matches_table(index: Index, names: list[str], qi, gid, sim) -> pd.DataFrame:
    """The answer: a row per (query, registered row), by query (in the order given) then
    similarity, highest first; pixel_check null."""
    if not len(gid):
        return _empty()
    hits = pd.DataFrame({"q": qi, "gid": gid, "similarity": sim})
    rows = describe_rows(index, gid)
    hits = hits.merge(rows, on="gid", how="inner")          # rows the registry holds
    hits = hits.sort_values(["q", "similarity", "key"], ascending=[True, False, True], kind="stable")
    out = pd.DataFrame({"query": [names[i] for i in hits["q"]], "key": hits["key"].to_numpy(),
                        "url": hits["url"].to_numpy(), "caption": hits["caption"].to_numpy(),
                        "similarity": hits["similarity"].to_numpy(np.float32),
                        "gid": hits["gid"].to_numpy(np.int64),
                        "pixel_check": pd.array([None] * len(hits), dtype="boolean")})
    return out.reset_index(drop=True)


# ------------------------------------------------------------------- pixel verification hook
def row_images(runs: list[dict], gids) -> dict[int, bytes]:
    """The image bytes of registered rows, read back from their runs' inputs (Run.images). Rows of
    runs whose input holds no images (released vectors), or whose run directory or input is gone,
    are left out."""
    from .driver import open_existing
    wanted = set(int(g) for g in gids)
    out: dict[int, bytes] = {}
    for r in runs:             # a registry's runs (registry.Target.runs)
        mine = {g for g in wanted if str(g >> 32) in r["shards"]}
        if not mine:
            continue
        try:
            run = open_existing(r["run_dir"])
            if run.source.HAS_IMAGES:
                out.update(run.images(mine))
        except (OSError, ValueError, KeyError):
            continue
    return out


def check_pixels(index: Index, matches: pd.DataFrame, query_bytes: dict[str, bytes], verify: Verifier) -> None:
    """Fill matches["pixel_check"] with verify(query bytes, row)[0] where both images are at hand
    (row: the match as a dict, its image bytes under "image"); null where either is not."""
    if matches.empty or not query_bytes:
        return
    images = row_images(index.target.runs, matches["gid"].unique())
    result = []
    for row in matches.to_dict("records"):
        q, img = query_bytes.get(row["query"]), images.get(int(row["gid"]))
        result.append(None if q is None or img is None else bool(verify(q, {**row, "image": img})[0]))
    matches["pixel_check"] = pd.array(result, dtype="boolean")


# -------------------------------------------------------------------------------- front door
def find(index_dir, paths: Iterable = (), threshold: float | None = None, *, vectors=None, names=None,
         verify: Verifier | None = None, device: str | None = None, warn=None) -> pd.DataFrame:
    """Every registered row of the index (a folder, or an `Index` already open) that is a copy of
    one of the query images (files, or folders of images at any depth) or of the query `vectors`
    (unit rows made with the index's model; `names` label them). Files that cannot be read or
    decoded are skipped and named through `warn` (default: a line on stderr). Returns a DataFrame
    of COLUMNS; its attrs hold threshold, model, queries and skipped [(path, reason)]."""
    index = index_dir if isinstance(index_dir, Index) else open_index(index_dir)
    warn = warn or (lambda line: print(line, file=sys.stderr))
    thr = index.threshold(threshold)
    query_bytes: dict[str, bytes] = {}
    if vectors is not None:
        q = np.atleast_2d(np.asarray(vectors, np.float32))
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        labels = list(names) if names is not None else [f"vector {i}" for i in range(len(q))]
        skipped = []
    else:
        files, skipped = image_files(paths)
        labels, q, query_bytes, bad = embed_images(files, index.model, device) if files else ([], None, {}, [])
        skipped += bad
    for name, reason in skipped:
        warn(f"dedup2b find: skipped {name}: {reason}")
    if labels:
        qi, gid, sim = search(index, q, thr)
    else:
        qi, gid, sim = np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    out = matches_table(index, labels, qi, gid, sim)
    if verify is not None:
        check_pixels(index, out, query_bytes, verify)
    out.attrs.update(threshold=thr, threshold_from="--threshold" if threshold is not None else index.threshold_from,
                     model=index.model, index=str(index.folder), queries=len(labels), skipped=skipped)
    return out


def write(matches: pd.DataFrame, path) -> Path:
    """The answer as parquet (COLUMNS; pixel_check a nullable boolean)."""
    from .core.io import write_parquet
    schema = pa.schema([("query", pa.string()), ("key", pa.string()), ("url", pa.string()),
                        ("caption", pa.string()), ("similarity", pa.float32()), ("gid", pa.int64()),
                        ("pixel_check", pa.bool_())])
    table = pa.Table.from_pandas(matches[COLUMNS], schema=schema, preserve_index=False)
    return write_parquet(Path(path), table)


def _cut(text, width: int) -> str:
    text = "" if text is None or (isinstance(text, float) and np.isnan(text)) else " ".join(str(text).split())
    return text if len(text) <= width else text[:width - 1] + "…"


def format_table(matches: pd.DataFrame, widths=(32, 28, 36, 36)) -> list[str]:
    """Terminal lines: query file, key, url, caption (each cut to its width), similarity."""
    wq, wk, wu, wc = widths
    lines = [f"{'query':{wq}s}  {'key':{wk}s}  {'url':{wu}s}  {'caption':{wc}s}  similarity"]
    for r in matches.itertuples(index=False):
        lines.append(f"{_cut(r.query, wq):{wq}s}  {_cut(r.key, wk):{wk}s}  {_cut(r.url, wu):{wu}s}  "
                     f"{_cut(r.caption, wc):{wc}s}  {r.similarity:.4f}")
    return lines
