"""report: the parquet reports, the histograms, summary.json and the HTML report (DESIGN.md §4),
all in the run's report/ folder.

report/samples.parquet     one row per input row: key, shard, row, url, caption, sha256, status,
                           error, group_id, group_size, is_representative, is_duplicate,
                           representative_key, nearest_key, nearest_similarity
report/pairs.parquet       verified duplicate edges: key_a, key_b, similarity, kind (how the edge was
                           decided: bytes | descriptor | pixels), pixel_score (the pixel check's score)
report/groups.parquet      groups of 2+ rows: group_id, size, representative_key, max/min_similarity
report/histogram.parquet   groups per group size; similarity.parquet: candidate-pair similarities
report/histogram.png       both, log-log sizes and the similarity distribution with the threshold
report/leaks.parquet       decontamination: eval_set, eval_key, key, url, caption, group_id, similarity
samples.parquet's removed_reason says why a row is not kept: duplicate, eval_leak (its group
holds a near duplicate of an evaluation row: the whole group goes), or request (a removal request
in the index's requests/ names the row, its group or its key: `dedup2b remove`, lib/requests.py)
"""
from __future__ import annotations

import itertools
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..core.arrays import unique
from ..core.io import Marker, ahead, parquet_writer, read_json, write_json, write_parquet
from ..core.memory import need
from ..core.run import Run
from ..lib import gallery, registry, requests
from ..lib.nodes import Keys
from . import verify

NAME = "report"
FIELDS = ("input", "embed.model", "codec", "search", "verify", "group", "against", "decontaminate", "requests")


def units(run: Run) -> list[Marker]:
    return [run.marker(NAME, NAME)]


GROUP_BYTES = 120          # held per group of 2+ rows (its numbers, its representative's key as Arrow, the sort)
REPORT_BUFFERS = 512 << 20   # a shard's sample rows as pandas, a batch of pairs


# the pixel check's work, not its answers: keypoints are made where a check needs them, and a task
# with threads checks ahead of its order (checks it then drops), so they differ between executors
COST_KEYS = ("wall_s", "seconds", "ms_per_image_features", "ms_per_pair", "worker_s_per_million_pairs",
             "tasks_by_node", "skipped", "images_with_keypoints", "ms_per_image_keypoints")


class InvariantBroken(RuntimeError):
    """Input rows != kept + removed + failed: a row was lost or doubled on the way."""


SAMPLES_SCHEMA = pa.schema([
    ("key", pa.string()), ("shard", pa.string()), ("row", pa.int64()), ("gid", pa.int64()), ("uid", pa.string()),
    ("url", pa.string()), ("caption", pa.string()), ("sha256", pa.string()), ("status", pa.string()),
    ("error", pa.string()), ("group_id", pa.int64()), ("group_size", pa.int64()), ("is_representative", pa.bool_()),
    ("is_duplicate", pa.bool_()), ("is_leak", pa.bool_()), ("removed_reason", pa.string()),
    ("representative_key", pa.string()), ("rep_similarity", pa.float32()), ("nearest_key", pa.string()),
    ("nearest_similarity", pa.float32())])


GROUPS_SCHEMA = pa.schema([("group_id", pa.int64()), ("size", pa.int64()), ("representative_key", pa.string()),
                           ("max_similarity", pa.float32()), ("min_similarity", pa.float32())])


class Counts:
    """What the report counts while it writes the sample rows shard by shard (the invariant's
    sample side, and the summary's tallies): no per-row state."""

    def __init__(self):
        self.rows = self.failed = self.kept = self.removed = 0
        self.twice = False
        self.removed_by = Counter()
        self.failed_by = Counter()

    def add(self, df: pd.DataFrame) -> None:
        ok = df["status"] == "ok"
        self.rows += len(df)
        self.failed += int((~ok).sum())
        self.kept += int((ok & df["removed_reason"].isna()).sum())
        self.removed += int((ok & df["removed_reason"].notna()).sum())
        self.twice |= bool(df.duplicated(["shard", "row"]).any())
        self.removed_by.update(df.loc[ok, "removed_reason"].dropna().tolist())
        self.failed_by.update(df.loc[~ok, "error"].fillna("").str.split(": ").str[:2].str.join(": ").tolist())


def invariant(run: Run, counts: Counts) -> tuple[int, int, int, int]:
    """(input, kept, removed, failed), each side counted on its own: input rows from the input
    files (the source's count_rows); kept, removed and failed from the sample rows by status and
    decision, every input row exactly once. Raises InvariantBroken before the report is published."""
    n_in = sum(run.source.count_rows(s) for s in run.shards)
    c = counts
    if c.twice or not n_in == c.rows == c.kept + c.removed + c.failed:
        raise InvariantBroken(f"report: invariant broken: {n_in} input rows in the input files, {c.rows} sample "
                              f"rows{' (some twice)' if c.twice else ''}, kept {c.kept} + removed {c.removed} + "
                              f"failed {c.failed}; no report written")
    return n_in, c.kept, c.removed, c.failed


class Groups:
    """The groups of 2+ rows (the group stage's groups.parquet: size, representative key, the
    highest and lowest similarity, this run's rows in it, sorted by size), the singletons, the
    groups of the leaked rows and of the rows the index's removal requests name."""

    def __init__(self, run: Run, n_rows: int):
        self.leaked = unique(verify.cross_pairs(run, "leaks")["gid"].to_numpy())
        req = requests.read(run.index_folder())
        self.requests = req.count
        self.request_gids = unique(np.r_[req.gids, rows_with_keys(run, req.keys)])
        t = pq.read_table(run.group_groups_file())
        self.table = t.to_pandas(types_mapper={pa.string(): pd.ArrowDtype(pa.string())}.get).sort_values(
            ["size", "group_id"], ascending=[False, True], ignore_index=True)
        self.singletons = n_rows - int(self.table["rows"].sum())
        # incremental runs: rows whose group is an earlier run's
        self.joining = int(self.table.loc[self.table["earlier"], "rows"].sum())
        self.leak_groups = unique(group_of(run, self.leaked))
        self.request_groups = unique(np.r_[np.asarray(req.groups, np.int64), group_of(run, self.request_gids)])

    @property
    def count(self) -> int:
        return self.singletons + len(self.table)


def group_of(run: Run, gids: np.ndarray) -> np.ndarray:
    """The group ids of the given rows of this run (read from their shards' rows files)."""
    gids = unique(np.asarray(gids, np.int64))
    parts = [np.zeros(0, np.int64)]
    for shard in run.shards:
        lo, hi = np.searchsorted(gids, [shard.index << 32, (shard.index + 1) << 32])
        if hi > lo:
            t = pq.read_table(run.group_rows_file(shard.name), columns=["gid", "group_id"])
            parts.append(t.filter(pc.is_in(t["gid"], pa.array(gids[lo:hi])))["group_id"].to_numpy())
    return np.concatenate(parts).astype(np.int64)


def rows_with_keys(run: Run, keys) -> np.ndarray:
    """gids of this run's rows whose key is one of `keys` (read shard by shard)."""
    if not keys:
        return np.zeros(0, np.int64)
    want = pa.array(sorted(keys), pa.string())
    parts = [np.zeros(0, np.int64)]
    for name in run.shard_names():
        t = pq.read_table(run.ingest_file(name), columns=["gid", "key"])
        parts.append(t.filter(pc.is_in(t["key"], want))["gid"].to_numpy())
    return np.concatenate(parts).astype(np.int64)


def key_lookup(run: Run, gids: np.ndarray) -> Keys:
    """The keys of the given gids only (read shard by shard), the earlier runs' rows included for
    an incremental run."""
    gids = unique(np.asarray(gids, np.int64))
    parts = []
    for shard in run.shards:      # each shard's own gids (a set of them all per shard was 24 s at 10 M rows)
        lo, hi = np.searchsorted(gids, [shard.index << 32, (shard.index + 1) << 32])
        if hi == lo:
            continue
        t = pq.read_table(run.ingest_file(shard.name), columns=["gid", "key"])
        parts.append(t.filter(pc.is_in(t["gid"], pa.array(gids[lo:hi], pa.int64()))).cast(
            pa.schema([("gid", pa.int64()), ("key", pa.large_string())])))
    if run.cfg.against:
        reg = registry.Target(run.cfg.against, run.cfg.embed.model, run.root).registry
        reg = reg.loc[reg["gid"].isin(gids), ["gid", "key"]]
        parts.append(pa.table({"gid": pa.array(reg["gid"].to_numpy(np.int64)),
                               "key": pa.array(reg["key"].tolist(), pa.large_string())}))
    if not parts:
        return Keys(np.zeros(0, np.int64), pa.array([], pa.large_string()))
    t = pa.concat_tables(parts).sort_by("gid").combine_chunks()
    return Keys(t["gid"].to_numpy(), t["key"].chunk(0) if t["key"].num_chunks else pa.array([], pa.large_string()))


def shard_samples(run: Run, shard, groups: Groups) -> pd.DataFrame:
    """The sample rows of one input shard (one row per input row, in gid order), with the ingest's
    other columns (member: what the HTML report needs of the shown rows)."""
    ing = pq.read_table(run.ingest_file(shard.name)).to_pandas()
    failed = pq.read_table(run.failed_file(shard.name)).to_pandas()
    rows = pq.read_table(run.group_rows_file(shard.name)).to_pandas()
    if len(failed):
        err = ing["gid"].map(failed.set_index("gid")["error"])
        ing.loc[err.notna(), "status"] = "failed"
        ing.loc[err.notna(), "error"] = err[err.notna()]
    df = ing.merge(rows, on="gid", how="left")
    ok = df["status"] == "ok"
    df["group_id"] = df["group_id"].astype("Int64")
    df["group_size"] = df["group_size"].astype("Int64")
    df["is_representative"] = df["is_representative"].astype("boolean")
    df["is_duplicate"] = (ok & ~df["is_representative"].fillna(True)).astype("boolean")
    df.loc[~ok, ["is_representative", "is_duplicate"]] = pd.NA
    for col in ("representative_key", "nearest_key"):    # the group stage's, None for failed rows
        df[col] = df[col].astype(object).where(df[col].notna(), None)
    # decontamination: a row near an evaluation item leaks it; its whole group is removed
    df["is_leak"] = (ok & df["gid"].isin(groups.leaked)).astype("boolean")
    df.loc[~ok, "is_leak"] = pd.NA
    # a removal request (its rows, their groups, its keys) goes first: those rows never come back
    requested = df["group_id"].isin(groups.request_groups) | df["gid"].isin(groups.request_gids)
    reason = np.where(requested, "request", np.where(df["group_id"].isin(groups.leak_groups), "eval_leak",
                      np.where(df["is_duplicate"].fillna(False).astype(bool), "duplicate", None)))
    df["removed_reason"] = pd.array(np.where(ok, reason, None), dtype="string")
    return df.sort_values("gid").reset_index(drop=True)


class Shown:
    """The rows the HTML report shows, gathered while the shards stream by: the representative and
    the first members (by gid) of each of the largest groups, the rows of the borderline pairs,
    the leaked rows."""

    def __init__(self, top: pd.DataFrame, border_gids: np.ndarray):
        self.top, self.border = set(top["group_id"].tolist()), set(border_gids.tolist())
        self.rows = pd.DataFrame()
        self.leaks = pd.DataFrame()

    def add(self, df: pd.DataFrame) -> None:
        """`df`: shard_samples' rows (they carry the ingest's member names)."""
        pick = df[df["group_id"].isin(self.top) | df["gid"].isin(self.border) | df["is_leak"].fillna(False)]
        rows = pd.concat([self.rows, pick], ignore_index=True)
        if len(rows):
            rows = rows.sort_values(["is_representative", "gid"], ascending=[False, True], na_position="last")
            in_top = rows["group_id"].isin(self.top).to_numpy(bool)
            keep = ~in_top
            keep[in_top] = rows[in_top].groupby("group_id").cumcount().to_numpy() < gallery.MEMBERS_SHOWN + 1
            keep |= rows["gid"].isin(self.border) | rows["is_leak"].fillna(False).astype(bool)
            rows = rows[keep]
        self.rows = rows
        leaks = df.loc[df["is_leak"].fillna(False).astype(bool), ["gid", "key", "url", "caption", "group_id"]]
        self.leaks = pd.concat([self.leaks, leaks], ignore_index=True)


def leaks_table(run: Run, leaked_rows: pd.DataFrame) -> pd.DataFrame:
    """One row per (training row, evaluation item) pair: which eval items leaked, where, how close."""
    parts = []
    for folder in run.cfg.decontaminate.eval:
        folder = Path(folder)
        got = verify.cross_pairs(run, "leaks", folder.name).to_pandas()
        reg = registry.Target(folder, run.cfg.embed.model, run.root).registry.set_index("gid")
        parts.append(pd.DataFrame({"eval_set": folder.name, "eval_key": got["other_gid"].map(reg["key"]),
                                   "gid": got["gid"], "similarity": got["similarity"]}))
    cols = ["eval_set", "eval_key", "key", "url", "caption", "group_id", "similarity"]
    if not parts or not len(leaked_rows):
        return pd.DataFrame({c: pd.Series(dtype=object) for c in cols})
    leaks = pd.concat(parts, ignore_index=True).merge(leaked_rows, on="gid")
    return leaks.sort_values(["eval_set", "eval_key", "similarity"], ascending=[True, True, False])[cols]


def folder_bytes(root: Path) -> int:
    """Bytes of every file under `root` (links not followed)."""
    total = 0
    for folder, _, files in os.walk(root):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except OSError:
                pass
    return total


def _plot(sizes: pd.DataFrame, sim_hist: pd.DataFrame, threshold: float, title: str, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax1.plot(sizes["group_size"], sizes["num_groups"], "o-", ms=4)
    if len(sizes):
        ax1.set_xscale("log")
        ax1.set_yscale("log")
    ax1.set_xlabel("group size (rows)")
    ax1.set_ylabel("number of groups")
    ax1.set_title("groups per group size")
    ax1.grid(True, which="both", alpha=.3)
    centers = (sim_hist["bin_lo"] + sim_hist["bin_hi"]) / 2
    ax2.bar(centers, sim_hist["count"], width=sim_hist["bin_hi"] - sim_hist["bin_lo"], color="#4477aa")
    ax2.axvline(threshold, color="#cc3311", ls="--", label=f"threshold {threshold:.3f}")
    if sim_hist["count"].gt(0).any():         # a run with no pair (every row failed) has nothing to log-scale
        ax2.set_yscale("log")
    ax2.set_xlabel("exact cosine of pairs near the threshold")
    ax2.set_ylabel("pairs")
    ax2.set_title("candidate-pair similarity")
    ax2.legend()
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_name(".histogram.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def _pairs_report(edges_path: Path, out_path: Path) -> int:
    """edges.parquet -> pairs.parquet (the keys the group stage put beside the gids), in row
    batches. Returns the pairs written."""
    schema = pa.schema([("key_a", pa.string()), ("key_b", pa.string()), ("similarity", pa.float32()),
                        ("kind", pa.string()), ("pixel_score", pa.float32())])
    n = 0
    with parquet_writer(out_path, schema) as writer:
        for batch in pq.ParquetFile(edges_path).iter_batches(1_000_000, columns=schema.names):
            writer.write(pa.Table.from_batches([batch]).cast(schema))
            n += batch.num_rows
    return n


def _candidates(run: Run, lo: float, threshold: float, band: float):
    """One pass over the search's pair files: (candidate pairs, similarity histogram counts, bins,
    the gallery's borderline pairs: the closest to the threshold on each side, within `band`)."""
    keep = gallery.BORDER_PAIRS // 2
    bins = np.linspace(lo, 1.0, 51)
    counts = np.zeros(50, np.int64)
    n = 0
    above = below = pd.DataFrame({"gid_a": np.zeros(0, np.int64), "gid_b": np.zeros(0, np.int64),
                                  "similarity": np.zeros(0, np.float32)})
    for path in run.pair_files():
        for batch in pq.ParquetFile(path).iter_batches(1_000_000, columns=["gid_a", "gid_b", "similarity"]):
            t = batch.to_pandas()
            counts += np.histogram(t["similarity"].to_numpy(), bins=bins)[0]
            n += len(t)
            s = t["similarity"]
            above = pd.concat([above, t[(s >= threshold) & (s < threshold + band)]]).nsmallest(keep, "similarity")
            below = pd.concat([below, t[(s < threshold) & (s >= threshold - band)]]).nlargest(keep, "similarity")
    return n, counts, bins, pd.concat([above, below], ignore_index=True)


def run(run: Run, ex, stage_stats: dict) -> dict:
    """Write every report; `stage_stats` are the earlier stages' stats (wall time, phases). Per-row
    work streams shard by shard (the group stage's rows carry their representative's and nearest
    neighbour's keys, its edges their rows' keys): what is held is the table of groups of 2+ rows,
    the keys of the borderline pairs, and the rows the HTML shows."""
    out = run.report_dir()
    cfg = run.cfg
    n_rows = sum(pq.ParquetFile(run.group_rows_file(s.name)).metadata.num_rows for s in run.shards)
    n_groups = pq.ParquetFile(run.group_groups_file()).metadata.num_rows
    need(f"report: {n_groups:,} groups of 2+ rows in one process", n_groups * GROUP_BYTES + REPORT_BUFFERS)
    groups = Groups(run, n_rows)
    lo = max(-1.0, cfg.search.threshold - cfg.search.band - 0.01)
    n_cand, counts, bins, near = _candidates(run, lo, cfg.search.threshold, cfg.search.band or 0.03)
    border_gids = unique(np.r_[near["gid_a"].to_numpy(np.int64), near["gid_b"].to_numpy(np.int64)])
    key_of = key_lookup(run, border_gids)
    top = groups.table.head(gallery.GROUPS_PER_PAGE * gallery.MAX_PAGES)
    shown = Shown(top, border_gids)
    tally = Counts()

    def samples(shard):     # a shard's rows, and as the table written (the pandas metadata: nullable columns)
        df = shard_samples(run, shard, groups)
        return df, pa.Table.from_pandas(df[SAMPLES_SCHEMA.names], schema=SAMPLES_SCHEMA, preserve_index=False)
    # the next shard's rows are made on a thread of their own while this one's are written
    parts = ahead(samples, run.shards)
    first = next(parts)
    schema = first[1].schema
    shards = itertools.chain([first], parts)
    del first               # the first shard's rows go once they are written, like every other's
    with parquet_writer(out / "samples.parquet", schema) as writer:
        for shard, (df, table) in zip(run.shards, shards):
            tally.add(df)
            shown.add(df)
            writer.write(table)     # the file's schema (pandas metadata included) is the writer's
        n_in, kept, removed, n_failed = invariant(run, tally)   # raises before samples.parquet is published
    n_pairs = _pairs_report(run.group_edges_file(), out / "pairs.parquet")
    table = groups.table[["group_id", "size", "representative_key", "max_similarity", "min_similarity"]]
    write_parquet(out / "groups.parquet", pa.Table.from_pandas(table, preserve_index=False).cast(GROUPS_SCHEMA))

    sizes = groups.table["rows"].value_counts()
    if groups.singletons:
        sizes.loc[1] = sizes.get(1, 0) + groups.singletons
    sizes = sizes.sort_index()
    size_hist = pd.DataFrame({"group_size": sizes.index.astype(np.int64), "num_groups": sizes.values.astype(np.int64)})
    size_hist["num_rows"] = size_hist["group_size"] * size_hist["num_groups"]
    write_parquet(out / "histogram.parquet", pa.Table.from_pandas(size_hist, preserve_index=False))
    sim_hist = pd.DataFrame({"bin_lo": bins[:-1], "bin_hi": bins[1:], "count": counts})
    write_parquet(out / "similarity.parquet", pa.Table.from_pandas(sim_hist, preserve_index=False))

    n_ok = n_in - n_failed
    n_groups = groups.count
    leaks = leaks_table(run, shown.leaks)
    if run.cfg.decontaminate.eval:
        write_parquet(out / "leaks.parquet", pa.Table.from_pandas(leaks, preserve_index=False))
    codec_file = run.dir("index") / "codec.json"    # absent when every row failed (nothing indexed)
    codec = read_json(codec_file) if codec_file.exists() else {}
    summary = {
        "input_rows": n_in, "ok": n_ok, "failed": n_failed, "groups": n_groups,
        "duplicate_groups": int(len(table)), "duplicates": n_ok - n_groups,
        "duplicate_fraction": round((n_ok - n_groups) / max(n_ok, 1), 4),
        "kept": kept, "removed": removed,
        "invariant_holds": True,   # checked above (invariant), before any report was written
        "removed_by_reason": dict(tally.removed_by.most_common()),
        "removal_requests": groups.requests,    # requests in the index's log applied (dedup2b remove)
        # incremental runs: rows removed because they copy rows of earlier runs (their groups grew)
        "rows_joining_earlier_groups": groups.joining,
        "eval_leaks": {name: {"eval_items_leaked": int(part["eval_key"].nunique()), "pairs": int(len(part)),
                              "train_rows_matched": int(part["key"].nunique())}
                       for name, part in leaks.groupby("eval_set")},
        "failed_by_reason": dict(tally.failed_by.most_common()),
        "threshold": cfg.search.threshold, "model": cfg.embed.model, "codec": codec.get("factory"),
        "bytes_per_vector": codec.get("bytes_per_vector"), "candidate_pairs": n_cand,
        "verified_pairs": n_pairs, "largest_groups": table.head(10)[["representative_key", "size"]]
        .to_dict("records"), "stage_seconds": {k: v.get("wall_s") for k, v in stage_stats.items()},
        # where the embed stage spent its worker time: which phase bounds the run
        "embed_phases_s": {k: stage_stats.get("embed", {}).get(k) for k in ("read_s", "decode_s", "infer_s", "write_s")},
        "exact_copies_not_embedded": stage_stats.get("embed", {}).get("copies_skipped"),
        # the pixel check (verify stage): whether it ran, its band, pairs checked / accepted; its
        # cost apart (timings differ between runs, the counts never do)
        "pixel_check": {k: v for k, v in stage_stats.get("verify", {}).items() if k not in COST_KEYS}
                       or {"pixel_check": False},
        "pixel_check_cost": {k: v for k, v in stage_stats.get("verify", {}).items() if k in COST_KEYS},
        # what the run directory holds per input row when its report is written (vectors read in
        # place from released embeddings are not in it; the export, written after, is not counted)
        "run_dir_bytes_per_row": round(folder_bytes(run.root) / max(n_in, 1), 1),
    }
    title = (f"{n_ok:,} rows, {n_groups:,} groups: {n_ok - n_groups:,} duplicates "
             f"({100 * summary['duplicate_fraction']:.1f}%)")
    _plot(size_hist, sim_hist, cfg.search.threshold, title, out / "histogram.png")
    near = pd.DataFrame({"key_a": key_of.objects(near["gid_a"]), "key_b": key_of.objects(near["gid_b"]),
                         "similarity": near["similarity"]})
    gallery.write(run, shown.rows, table, near, summary, cfg.search.threshold, leaks=leaks)
    path = write_json(run.summary_file(), summary)
    run.marker(NAME, NAME).write(run.fingerprint(NAME), [path], rows=n_in)
    return summary
