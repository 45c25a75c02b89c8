"""group: exact connected components over verified edges, with a guard against chaining.

Nodes are the rows that have a vector. Edges are exact-byte pairs (equal sha256, kind bytes), near
pairs at or above the threshold (kind descriptor) or, where the verify stage ran, pairs at or above
verify.sure (descriptor) and pairs in [verify.low, sure) the pixel check accepted (kind pixels).
Each group gets one representative by a deterministic rule: most pixels (where the pixel check ran,
a frame's padding discounted: nodes.picture_pixels), then most bytes, then the smallest key
(group.representative: quality), or the first row in input order (first). Chaining
guard: a member less similar than `min_rep_similarity` to its representative is split off, and
where the pixel check runs (group.member_check) so is a member that is not a copy of its
representative (no accepted edge between the two, and their pixels say no: MemberCheck); the
split-off members are regrouped among themselves (by the edges between them) and the rule repeats
until every member passes. The group id is the representative's gid: stable and deterministic.

Memory, in three passes:
1. Components of every edge (streamed in chunks of CHUNK into the vectorised union-find,
   unionfind.py): a gid and a parent per node (HEAD_BYTES), exact copies found a bucket of
   digests at a time. These components may be a little coarser than the groups (rows whose
   digests share 8 bytes, the same image under another caption): the next pass finds the exact
   ones.
2. The rows of components of 2+ nodes and the edges, partitioned by component into buckets of
   about BUCKET_ROWS rows through files (lib/spill.py), then a task per bucket (one after another
   on the driver where the member check runs: its pixel checks are tasks of their own): the rank,
   the components again exactly, the guard, the member check, the nearest verified neighbour, the
   edges to keep. A component is never split, so a bucket holds at least its largest component.
3. A rows file per shard: the bucket results of its grouped rows, every other row its own group.

Writes group/rows/NNNNN.parquet (gid, group_id, group_size, is_representative, rep_similarity,
nearest_gid, nearest_similarity, representative_key, nearest_key; a parquet dataset read as one
table), group/edges.parquet (gid_a, gid_b, similarity, kind, pixel_score, key_a, key_b; bucket by
bucket) and group/groups.parquet (GROUP_SCHEMA: a row per group of 2+ rows). The keys come from
the bucket's rows, so the report looks none up.
Incremental runs (config `against`): each earlier group touched by this run's rows joins as one
node ranked before every new row, so earlier rows keep their status and new copies are removed.
"""
from __future__ import annotations

import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..core.arrays import unique
from ..core.io import Marker, parquet_writer, write_parquet
from ..core.memory import need
from ..core.run import Run
from ..core.vectors import StoreUnion, meta_path
from ..lib import registry
from ..lib.nodes import GidIndex, Keys, column_of, key_prefix, keys_of, picture_pixels, quality_rank, raw_digest
from ..lib import spill
from ..lib.spill import Spill
from ..lib.unionfind import UnionFind, exact_edges
from . import verify

NAME = "group"
FIELDS = ("input", "embed.model", "codec", "search", "verify", "group", "against", "decontaminate")


CHUNK = 5_000_000   # edges held at once: the bounded buffer of every pass over the edges
ROW_BYTES = 250     # held per row of a bucket at its peak, its keys included (with GROUP_BUFFERS: two buckets of
                    # 2.2 M rows at once peaked at 1.57 GB, bench/results/stage_memory.md)
GROUP_BUFFERS = 512 << 20   # an edge chunk and its copies, member / representative vectors
SIM_ROWS = 16384    # member / representative vector pairs compared at once (768-d: 2 x 50 MB of float32;
                    # 65,536 held 500 MB, the stage's largest buffer at 1 M rows)

HEAD_BYTES = 17     # held per row while the components are found: gid, union-find parent, a flag
BUCKET_ROWS = 4_000_000   # grouped rows per bucket (ROW_BYTES each at a bucket's peak); a
                          # component is never split, so a bucket holds at least its largest one
DIGEST_ROWS = 8_000_000   # rows per bucket of the exact-copy pass (24 B each while sorted)

ROW_SPILL = pa.schema([("gid", pa.int64()), ("width", pa.int64()), ("height", pa.int64()), ("nbytes", pa.int64()),
                       ("key", pa.string()), ("sha256", pa.string()), ("caption", pa.string()),
                       ("picture", pa.float32())])   # the share of its frame that is picture (1: not measured)
EDGE_SPILL = pa.schema([("gid_a", pa.int64()), ("gid_b", pa.int64()), ("similarity", pa.float32()),
                        ("pixels", pa.bool_()), ("pixel_score", pa.float32())])


def components(n: int, chunks: Iterable[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Component label per node (its smallest member), edges fed as (a, b) chunks."""
    return UnionFind(n).union_stream(chunks).labels()


def representatives(labels: np.ndarray, rank: np.ndarray) -> np.ndarray:
    """For each node, the node index of its component's best-ranked member (lowest rank)."""
    order = np.lexsort((rank, labels))
    first = np.ones(len(order), bool)
    first[1:] = labels[order][1:] != labels[order][:-1]
    best = np.empty(labels.max() + 1 if len(labels) else 0, np.int64)
    best[labels[order][first]] = order[first]
    return best[labels]


def normalize_text(text) -> str:
    """The documented caption rule for duplicate_key image+text: NFKC, case-folded, whitespace
    runs collapsed to one space, stripped; a missing caption is the empty text."""
    import unicodedata
    return " ".join(unicodedata.normalize("NFKC", text or "").casefold().split())


def group_nodes(gids, rank, edges: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]], store, guard: float,
                confirm: Callable | None = None, max_rounds: int = 50, similar: Callable | None = None):
    """Labels (representative node index per node) and each node's similarity to its representative.
    `edges()` streams the edges as (a, b) node-index chunks; it is called once per pass.
    `similar()`, where given, streams them as (a, b, similarity): a member joined to its
    representative by an edge takes the edge's similarity, the others are read from `store`.
    `confirm(nodes, rep, sims)`, where given, says which of `nodes` are copies of their
    representative (rep: every node's); it is asked once per (member, representative), for
    members the guard keeps.
    Members that fail either test are split off and regrouped among themselves; after
    `max_rounds` any still failing stands alone."""
    n = len(gids)
    labels = components(n, edges())
    asked = np.full(n, -1, np.int64)      # the representative a member was confirmed against
    confirmed = np.zeros(n, bool)
    for _ in range(max_rounds):
        rep = representatives(labels, rank)
        multi, sim = _rep_similarity(gids, rep, store, similar)
        bad = sim < guard
        if confirm is not None:
            ask = multi[~bad[multi] & (asked[multi] != rep[multi])]
            if len(ask):
                confirmed[ask] = confirm(ask, rep, sim[ask])
                asked[ask] = rep[ask]
            bad[multi] |= ~confirmed[multi]
        if not bad.any():
            return rep, sim
        # regroup the split-off members among themselves, by edges inside their old component
        idx = np.nonzero(bad)[0]
        local = np.full(n, -1, np.int64)
        local[idx] = np.arange(len(idx))
        def inside(labels=labels):
            for a, b in edges():
                k = bad[a] & bad[b] & (labels[a] == labels[b])
                yield local[a[k]], local[b[k]]
        labels = labels.copy()
        labels[idx] = labels.max() + 1 + components(len(idx), inside())
    rep = representatives(labels, rank)
    multi, sim = _rep_similarity(gids, rep, store, similar)
    bad = sim < guard                         # still failing after max_rounds: alone
    if confirm is not None:
        bad[multi] |= ~confirmed[multi] | (asked[multi] != rep[multi])
    rep[bad] = np.nonzero(bad)[0]
    sim[bad] = 1.0
    return rep, sim


def _rep_similarity(gids, rep, store, similar: Callable | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The nodes that are not their own representative, and every node's cosine to its
    representative (1 for representatives): an edge's similarity where `similar()` has an edge
    between the two (one pass over the edges; 87 % of the members at 1 M rows, bench-scale
    corpus), else the product of their vectors."""
    n = len(gids)
    multi = np.nonzero(rep != np.arange(n))[0]
    sim = np.ones(n, np.float32)
    todo = multi
    if similar is not None and len(multi):
        known = np.full(n, np.nan, np.float32)
        for a, b, s in similar():
            hit = rep[a] == b
            known[a[hit]] = s[hit]
            hit = rep[b] == a
            known[b[hit]] = s[hit]
        got = ~np.isnan(known[multi])
        sim[multi[got]] = known[multi[got]]
        todo = multi[~got]
        del known
    for i in range(0, len(todo), SIM_ROWS):     # bounded memory: SIM_ROWS vector pairs at a time
        m = todo[i:i + SIM_ROWS]
        # each representative read once, in gid order (a memory map read forward), not once per member
        reps, inv = unique(rep[m], return_inverse=True)
        sim[m] = np.einsum("ij,ij->i", store.get(gids[m]), store.get(gids[reps])[inv])
    return multi, sim


class MemberCheck:
    """confirm() for group_nodes where the pixel check runs: a member is a copy of its
    representative when an accepted edge joins the two, else when the pixels of the two say so,
    directly or through an anchor that is a full copy of the representative (checked in parallel
    tasks over the verify stage's features: verify.decide_members), and where an image has no pixel
    evidence (too few keypoints, or no features) when the descriptor reaches search.threshold.
    Members of an earlier run's group (incremental runs) are taken as the guard left them: that
    group's images belong to another run."""

    def __init__(self, run: Run, ex, gids: np.ndarray, edges: Callable, n_own: int, hops: int = 1):
        self.run, self.ex, self.gids, self.edges, self.n_own, self.hops = run, ex, gids, edges, n_own, hops
        self.stats = {"member_checks": 0, "member_checks_direct": 0, "member_checks_two_hops": 0,
                      "member_checks_pixels": 0, "member_checks_via_full_copy": 0, "member_checks_failed": 0,
                      "member_check_s": 0.0}

    def __call__(self, nodes: np.ndarray, rep: np.ndarray, sims: np.ndarray) -> np.ndarray:
        t0 = time.time()
        direct = np.zeros(len(self.gids), bool)      # an accepted edge to its representative
        for a, b in self.edges():
            direct[a[rep[a] == b]] = True
            direct[b[rep[b] == a]] = True
        ok = direct[nodes] | (rep[nodes] >= self.n_own)
        n_direct = int(ok.sum())
        if self.hops >= 2 and not ok.all():           # an accepted edge to a member that has one
            via = np.zeros(len(self.gids), bool)
            for a, b in self.edges():
                same = rep[a] == rep[b]
                via[a[same & direct[b]]] = True
                via[b[same & direct[a]]] = True
            ok |= via[nodes]
        n_two = int(ok.sum()) - n_direct
        todo = np.nonzero(~ok)[0]
        via = 0
        if len(todo):
            anchors = self._anchors(nodes[todo], rep, direct)
            ok[todo], via = verify.check_members(self.run, self.ex, self.gids[nodes[todo]],
                                                 self.gids[rep[nodes[todo]]], sims[todo], anchors)
        s = self.stats
        s["member_checks"] += len(nodes)
        s["member_checks_direct"] += n_direct
        s["member_checks_two_hops"] += n_two
        s["member_checks_pixels"] += len(todo)
        s["member_checks_via_full_copy"] += via
        s["member_checks_failed"] += int((~ok).sum())
        s["member_check_s"] = round(s["member_check_s"] + time.time() - t0, 3)
        return ok

    def _anchors(self, todo: np.ndarray, rep: np.ndarray, direct: np.ndarray) -> list[list[int]]:
        """Per member to check, the gids of up to verify.ANCHORS members of its group with an
        accepted edge to the representative (the first in gid order), the member itself left out."""
        reps = unique(rep[todo])
        cand = np.nonzero(direct & np.isin(rep, reps) & (rep != np.arange(len(rep))))[0]
        by_rep: dict[int, list[int]] = {}
        for x in cand[np.argsort(rep[cand], kind="stable")].tolist():
            got = by_rep.setdefault(int(rep[x]), [])
            if len(got) <= verify.ANCHORS:
                got.append(x)
        return [[int(self.gids[x]) for x in by_rep.get(int(rep[m]), []) if x != m][:verify.ANCHORS]
                for m in todo.tolist()]


def verified_edges(run: Run):
    """The run's accepted near pairs, pair file by pair file in chunks of CHUNK: tables of gid_a,
    gid_b, similarity, pixels (accepted by the pixel check, below verify.sure) and pixel_score.
    Without the pixel check the descriptor decides at the threshold; with it, at `sure`, and pairs
    in [low, sure) are edges where the pixels accepted them."""
    pixels = verify.active(run)
    threshold = run.cfg.search.threshold
    low, sure = verify.band(run) if pixels else (threshold, threshold)
    cols = ["gid_a", "gid_b", "similarity"]
    for path in run.pair_files():
        batches = pq.ParquetFile(path).iter_batches(CHUNK, columns=cols)
        if pixels:
            decisions = verify.decision_file(run, path)
            batches = zip(batches, pq.ParquetFile(decisions).iter_batches(CHUNK))   # aligned row by row
        for item in batches:
            batch, dec = item if pixels else (item, None)
            sim = batch.column(2).to_numpy()
            if dec is None:
                sel = sim >= sure
                by_px = np.zeros(int(sel.sum()), bool)
                score = np.full(int(sel.sum()), np.nan, np.float32)
            else:
                if dec.num_rows != batch.num_rows:
                    raise RuntimeError(f"{decisions}: decisions out of step with {path}; rerun the verify stage")
                px, sc = dec.column(0).to_numpy(), dec.column(1).to_numpy()
                sel = verify.accepted(sim, px, low, sure, threshold)
                by_px = (sim[sel] < sure) & (px[sel] == 1)
                score = np.asarray(sc[sel], np.float32)
            yield pa.table({"gid_a": batch.column(0).to_numpy()[sel], "gid_b": batch.column(1).to_numpy()[sel],
                            "similarity": sim[sel].astype(np.float32), "pixels": by_px, "pixel_score": score},
                           schema=EDGE_SPILL)


class Edges:
    """One bucket's verified edges, in the order the run's edges come: exact-byte edges (copy ->
    first copy), then the near pairs in pair-file order, then (incremental runs) edges to earlier
    runs' rows. Node indexes are positions in the bucket's `gids`; node n + k is the bucket's
    earlier group k. A near pair equal to an exact edge is dropped; with duplicate_key image+text,
    so is a pair whose normalized captions differ."""

    def __init__(self, gids: np.ndarray, texts: np.ndarray | None, exact: tuple,
                 near: Callable[[], Iterable[pa.Table]], old: dict | None):
        self.gids, self.texts, self._near, self.old = gids, texts, near, old
        self.ea, self.eb = exact
        self.head = np.full(len(gids), -1, np.int64)   # a near pair equal to an exact edge is dropped
        self.head[self.eb] = self.ea

    def near(self):
        """(lo, hi, similarity, by pixels, pixel score) node-index chunks of the near pairs, read
        anew at every pass (a chunk held at a time)."""
        for t in self._near():
            lo = np.searchsorted(self.gids, t.column("gid_a").to_numpy())
            hi = np.searchsorted(self.gids, t.column("gid_b").to_numpy())
            keep = self.head[hi] != lo
            if self.texts is not None:   # the same picture under another text is not a duplicate
                keep &= self.texts[lo] == self.texts[hi]
            yield (lo[keep], hi[keep], t.column("similarity").to_numpy()[keep],
                   t.column("pixels").to_numpy(zero_copy_only=False)[keep], t.column("pixel_score").to_numpy()[keep])

    def pairs(self):
        """(a, b) chunks for union-find, the earlier groups' nodes included."""
        for a, b, _ in self.similar():
            yield a, b
        if self.old is not None:
            yield self.old["a"], len(self.gids) + self.old["b"]

    def similar(self):
        """(a, b, similarity) chunks of the edges between this run's rows (exact bytes: 1); an
        edge to an earlier group is to one of its rows, not to the node that stands for it."""
        for i in range(0, len(self.ea), CHUNK):
            a, b = self.ea[i:i + CHUNK], self.eb[i:i + CHUNK]
            yield a, b, np.ones(len(a), np.float32)
        for lo, hi, sim, *_ in self.near():
            yield lo, hi, sim

    def scored(self):
        """(node a, node b, gid a, gid b, similarity, kind, pixel score) chunks: every edge of the
        report (node n + k: earlier group k, as in `pairs`); kind: bytes | descriptor | pixels."""
        g = self.gids
        for i in range(0, len(self.ea), CHUNK):
            a, b = self.ea[i:i + CHUNK], self.eb[i:i + CHUNK]
            yield a, b, g[a], g[b], np.ones(len(a), np.float32), "bytes", None
        for lo, hi, sim, by_px, score in self.near():
            yield lo, hi, g[lo], g[hi], sim, np.where(by_px, "pixels", "descriptor"), score
        if self.old is not None:
            a = self.old["a"]
            yield a, len(g) + self.old["b"], g[a], self.old["other"], self.old["sim"], "descriptor", None


class Nearest:
    """Each node's most similar verified neighbour (ties: the smallest gid), updated chunk by chunk."""

    def __init__(self, n: int):
        self.gid = np.full(n, -1, np.int64)
        self.sim = np.full(n, -np.inf, np.float32)

    def update(self, node: np.ndarray, other: np.ndarray, sim: np.ndarray) -> None:
        """Scatter-max then scatter-min, no sort (a 3-key lexsort per chunk was 40x slower)."""
        before = self.sim[node]
        np.maximum.at(self.sim, node, sim)                  # best similarity per node so far
        best = self.sim[node]
        self.gid[node[best > before]] = np.iinfo(np.int64).max   # a better one: earlier ties no longer count
        tie = sim == best
        np.minimum.at(self.gid, node[tie], other[tie])      # the smallest gid among the best


ROW_SCHEMA = pa.schema([("gid", pa.int64()), ("group_id", pa.int64()), ("group_size", pa.int64()),
                        ("is_representative", pa.bool_()), ("rep_similarity", pa.float32()),
                        ("nearest_gid", pa.int64()), ("nearest_similarity", pa.float32()),
                        ("representative_key", pa.string()), ("nearest_key", pa.string())])
EDGE_SCHEMA = pa.schema([("gid_a", pa.int64()), ("gid_b", pa.int64()), ("similarity", pa.float32()),
                         ("kind", pa.string()), ("pixel_score", pa.float32()),
                         ("key_a", pa.string()), ("key_b", pa.string())])
# a group of 2+ rows: its size (an earlier run's members included), its representative's key, the
# highest similarity of the kept edges inside it (NaN: none, a row joining an earlier group), the
# lowest of its members to the representative, this run's rows in it, whether it is an earlier run's
GROUP_SCHEMA = pa.schema([("group_id", pa.int64()), ("size", pa.int64()), ("representative_key", pa.string()),
                          ("max_similarity", pa.float32()), ("min_similarity", pa.float32()),
                          ("rows", pa.int64()), ("earlier", pa.bool_())])


def units(run: Run) -> list[Marker]:
    return [run.marker(NAME, NAME)]


def run(run: Run, ex, stats: dict) -> dict:
    if not run.pending(NAME, [NAME]):
        return {"skipped": True}
    t0 = time.time()
    cfg = run.cfg
    shards = sorted(run.shards, key=lambda sh: sh.index)       # gid order: shard high
    gids = np.concatenate([_embedded(run, sh.name) for sh in shards] or [np.zeros(0, np.int64)])
    n = len(gids)
    need(f"group: the components of {n:,} rows", n * HEAD_BYTES + GROUP_BUFFERS)
    position = GidIndex(gids)
    old = _old_groups(run, gids) if cfg.against else None
    n_old = len(old["group_ids"]) if old is not None else 0
    work = run.dir(NAME) / "_work"

    # 1. components over every edge (a superset where digests share 8 bytes or captions differ:
    #    each bucket's components are found again exactly): one parent per node
    uf = UnionFind(n + n_old)
    if cfg.group.exact_bytes:
        for a, b in _same_digest(run, shards, position, work):
            uf.union(a, b)
    for t in verified_edges(run):
        uf.union(position(t.column(0).to_numpy()), position(t.column(1).to_numpy()))
    if old is not None:
        uf.union(position(old["gid_a"]), n + old["b"])
    labels = uf.labels()
    del uf
    grouped = np.zeros(len(labels), bool)              # in a component of 2+ nodes
    for i in range(0, len(labels), 1 << 20):
        s = labels[i:i + (1 << 20)]
        grouped[i:i + len(s)] = s != np.arange(i, i + len(s))
    grouped[labels[grouped]] = True
    n_buckets = max(1, -(-int(grouped[:n].sum()) // BUCKET_ROWS))
    bucket_of = lambda nodes, labels=labels: _bucket(labels[nodes], n_buckets)   # noqa: E731

    # 2. the grouped rows and the edges, partitioned by component into buckets
    by_text = cfg.group.duplicate_key == "image+text"
    rows = Spill(work / "rows", n_buckets, ROW_SPILL)
    quality, pixel_check = cfg.group.representative == "quality", verify.active(run)
    for sh in shards:
        lo, hi = np.searchsorted(gids, [sh.index << 32, (sh.index + 1) << 32])
        sel = gids[lo:hi][grouped[lo:hi]]
        if len(sel):
            t = pq.read_table(run.ingest_file(sh.name), columns=ROW_SPILL.names[:-2] + ["caption"] * by_text)
            t = t.filter(pc.is_in(t["gid"], pa.array(sel, pa.int64())))
            if not by_text:
                t = t.append_column("caption", pa.nulls(len(t), pa.string()))
            share = (verify.picture_shares({sh.index: verify.feature_file(run, sh.name)}, t["gid"].to_numpy())
                     if quality and pixel_check else np.ones(len(t), np.float32))
            t = t.append_column("picture", pa.array(share, pa.float32()))
            rows.write(bucket_of(position(t["gid"].to_numpy())), t)
    edges = None                  # one bucket: its edges are the pair files' own, read at every pass
    if n_buckets > 1:
        edges = Spill(work / "edges", n_buckets, EDGE_SPILL)
        for t in verified_edges(run):
            edges.write(bucket_of(position(t.column(0).to_numpy())), t)
        edges.finish()
    old_bucket = bucket_of(n + np.arange(n_old)) if old is not None else None
    old_edge_bucket = bucket_of(position(old["gid_a"])) if old is not None else None
    del labels, grouped, position, gids, bucket_of       # nothing per row is held from here on

    # 3. the buckets: rank, representatives, guard, member check, nearest, forest; as tasks, except
    #    where the member check runs (its pixel checks are tasks of their own): one after another
    rows.finish()
    out = work / "out"
    out.mkdir(parents=True, exist_ok=True)
    jobs = [{"run": run, "b": b, "rows": rows.folder, "edges": edges.folder if edges is not None else None,
             "old": _old_part(old, old_bucket == b, old_edge_bucket == b) if old is not None else None, "out": out}
            for b in range(n_buckets)]
    if verify.active(run) and cfg.group.member_check:
        done = [_bucket_task(dict(job, ex=ex)) for job in jobs]
    else:
        done = ex.map(_bucket_task, jobs, desc="group: buckets", num_cpus=1)
    shard_range = {sh.index: i * n_buckets // max(len(shards), 1) for i, sh in enumerate(shards)}
    results = Spill(work / "results", n_buckets, ROW_SCHEMA)
    totals = Counter()
    with parquet_writer(run.group_edges_file(), EDGE_SCHEMA) as writer, \
            parquet_writer(run.group_groups_file(), GROUP_SCHEMA) as group_writer:
        for b, st in enumerate(done):          # in bucket order, whatever order the tasks ended in
            for t in spill.file_batches(out / "edges", b):
                writer.write(t)
            group_writer.write(spill.read_file(out / "groups", b, GROUP_SCHEMA))
            got = spill.read_file(out / "rows", b, ROW_SCHEMA)
            results.write(_ranges(got["gid"].to_numpy(), shard_range), got)
            totals.update(st)
    rows.close()
    if edges is not None:
        edges.close()

    # 4. rows, a file per shard: the grouped rows' results, every other row alone
    files, n_rows, n_alone = [], 0, 0
    current, res, res_gid = -1, None, np.zeros(0, np.int64)
    for sh in shards:
        if shard_range[sh.index] != current:
            current = shard_range[sh.index]
            res = results.read(current).sort_by("gid")
            res_gid = res["gid"].to_numpy()
        g = _embedded(run, sh.name)
        lo, hi = np.searchsorted(res_gid, [sh.index << 32, (sh.index + 1) << 32])
        keys = pq.read_table(run.ingest_file(sh.name), columns=["gid", "key"])
        keys = keys.filter(pc.is_in(keys["gid"], pa.array(g, pa.int64()))).sort_by("gid")["key"]
        files.append(write_parquet(run.group_rows_file(sh.name), _shard_rows(g, keys, res.slice(lo, hi - lo))))
        n_rows += len(g)
        n_alone += len(g) - (hi - lo)
    results.close()
    shutil.rmtree(work, ignore_errors=True)
    n_groups = int(n_alone + totals["groups"])
    files += [run.group_edges_file(), run.group_groups_file()]
    run.marker(NAME, NAME).write(run.fingerprint(NAME), files, rows=n_rows, groups=n_groups)
    member = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in totals.items() if k.startswith("member_")}
    stats = {"rows": n_rows, "groups": n_groups, "edges": totals["edges"], "verified_edges_read": totals["verified"],
             "buckets": n_buckets, "seconds": round(time.time() - t0, 3), **member}
    if old is not None:
        stats.update(rows_joining_earlier_groups=totals["joining"], earlier_groups_grown=totals["grown"])
    return stats


def _embedded(run: Run, shard: str) -> np.ndarray:
    """A shard's rows with a vector (the group stage's nodes), in gid order."""
    return np.sort(pq.read_table(meta_path(run.embed_dir(), shard), columns=["gid"])["gid"].to_numpy())


def _bucket(labels: np.ndarray, n: int) -> np.ndarray:
    """The bucket of each component label (a multiplicative hash: components spread evenly)."""
    if n == 1:
        return np.zeros(len(labels), np.int64)
    h = labels.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    return ((h >> np.uint64(33)) % np.uint64(n)).astype(np.int64)


def _ranges(gids: np.ndarray, shard_range: dict) -> np.ndarray:
    shard = gids >> 32
    ids, inv = unique(shard, return_inverse=True)
    return np.array([shard_range[int(i)] for i in ids], np.int64)[inv]


def _same_digest(run: Run, shards, position: GidIndex, work: Path):
    """(a, b) node chunks joining rows whose sha256 digests share their first 8 bytes (every exact
    copy, and with a chance of 2^-64 a pair more: the buckets find exact copies by whole digests),
    found a bucket of digests at a time."""
    k = max(1, -(-len(position.gids) // DIGEST_ROWS))
    spill = Spill(work / "digests", k, pa.schema([("head", pa.uint64()), ("node", pa.int64())]))
    for sh in shards:
        t = pq.read_table(run.ingest_file(sh.name), columns=["gid", "sha256"]).drop_null()
        g = t["gid"].to_numpy()
        keep = np.isin(g, position.gids[slice(*np.searchsorted(position.gids, [sh.index << 32, (sh.index + 1) << 32]))])
        if not keep.any():
            continue
        t = t.filter(pa.array(keep))
        raw = raw_digest(t["sha256"])
        head = np.frombuffer(raw.tobytes(), np.uint8).reshape(len(raw), -1)[:, :8].copy().view("<u8").ravel()
        spill.write((head % np.uint64(k)).astype(np.int64),
                    pa.table({"head": head, "node": position(t["gid"].to_numpy())}))
    for b in range(k):
        t = spill.read(b)
        a, c = exact_edges(t["head"].to_numpy())
        node = t["node"].to_numpy()
        yield node[a], node[c]
    spill.close()


def _shard_rows(gids: np.ndarray, keys: pa.ChunkedArray, res: pa.Table) -> pa.Table:
    """A shard's rows file: the bucket results of its grouped rows, every other row its own group
    (`keys`: the shard's keys, aligned with `gids`)."""
    n = len(gids)
    pos = np.searchsorted(gids, res["gid"].to_numpy())
    group_id, size, is_rep = gids.copy(), np.ones(n, np.int64), np.ones(n, bool)
    rep_sim = np.ones(n, np.float32)
    near_gid, near_sim, found = np.zeros(n, np.int64), np.zeros(n, np.float32), np.zeros(n, bool)
    group_id[pos] = res["group_id"].to_numpy()
    size[pos] = res["group_size"].to_numpy()
    is_rep[pos] = res["is_representative"].to_numpy(zero_copy_only=False)
    rep_sim[pos] = res["rep_similarity"].to_numpy()
    found[pos] = res["nearest_gid"].is_valid().to_numpy(zero_copy_only=False)
    near_gid[pos] = res["nearest_gid"].fill_null(0).to_numpy()
    near_sim[pos] = res["nearest_similarity"].fill_null(0).to_numpy()
    # the keys: a row alone is its own representative; the grouped rows' keys come from their bucket
    slot = np.full(n, -1, np.int64)
    slot[pos] = np.arange(len(pos))
    from_res = pa.array(slot >= 0)
    rep_key = pc.if_else(from_res, res["representative_key"].combine_chunks().take(pa.array(np.maximum(slot, 0))),
                         keys) if len(pos) else keys
    near_key = (res["nearest_key"].combine_chunks().take(pa.array(slot, mask=slot < 0)) if len(pos)
                else pa.nulls(n, pa.string()))
    return pa.table({"gid": gids, "group_id": group_id, "group_size": size, "is_representative": is_rep,
                     "rep_similarity": rep_sim, "nearest_gid": pa.array(near_gid, mask=~found),
                     "nearest_similarity": pa.array(near_sim, mask=~found),
                     "representative_key": rep_key, "nearest_key": near_key}, schema=ROW_SCHEMA)


def _bucket_task(job: dict) -> dict:
    """One bucket (a task): its rows and edges read from the spill files, its results written to
    out/{rows,groups,edges}/BBBBBB.arrow; returns its counts. `ex` (not in a task): the executor
    the member check's pixel checks run on."""
    run, b, out = job["run"], job["b"], Path(job["out"])
    rows = spill.read_file(job["rows"], b, ROW_SPILL)
    near = ((lambda: verified_edges(run)) if job["edges"] is None
            else (lambda: spill.file_batches(job["edges"], b)))
    for d in ("rows", "groups", "edges"):
        (out / d).mkdir(parents=True, exist_ok=True)
    with pa.ipc.new_file(spill.bucket_file(out / "edges", b), EDGE_SCHEMA) as writer:
        got, groups, st = _group_bucket(run, job.get("ex"), rows, near, job["old"], writer)
    spill.write_file(spill.bucket_file(out / "groups", b), groups)
    spill.write_file(spill.bucket_file(out / "rows", b), got)
    return st


def _group_bucket(run: Run, ex, rows: pa.Table, near: Callable[[], Iterable[pa.Table]], old: dict | None,
                  writer) -> tuple[pa.Table, pa.Table, dict]:
    """One bucket's components, exactly: its rows (gid order), its edges (`near()`: the near
    pairs' tables, read anew at every pass), its earlier groups.
    Writes its edges to `writer`; returns its rows' results, its groups of 2+ rows and counts."""
    cfg = run.cfg
    rows = rows.sort_by("gid")
    gids = rows["gid"].to_numpy()
    n = len(gids)
    need(f"group: a bucket of {n:,} rows", n * ROW_BYTES + GROUP_BUFFERS)
    if cfg.group.representative == "first":
        rank = np.arange(n, dtype=np.int64)   # gids are sorted: input order
    else:                                     # most (picture) pixels, most bytes, smallest key
        pixels = (pc.cast(rows["width"].fill_null(0), pa.int64()).to_numpy()
                  * pc.cast(rows["height"].fill_null(0), pa.int64()).to_numpy())
        pixels = picture_pixels(pixels, rows["picture"].to_numpy())   # a photo, not its copy on a canvas
        rank = quality_rank(gids, pixels, pc.cast(rows["nbytes"].fill_null(0), pa.int64()).to_numpy(),
                            key_prefix(rows["key"].to_pylist()), lambda g: keys_of(run, g))
    by_text = cfg.group.duplicate_key == "image+text"
    texts = np.array([normalize_text(t) for t in rows["caption"].to_pylist()], dtype=object) if by_text else None
    has_sha = rows["sha256"].is_valid().to_numpy(zero_copy_only=False)
    if cfg.group.exact_bytes and has_sha.any():
        idx = np.flatnonzero(has_sha)
        sha = raw_digest(rows["sha256"].filter(pa.array(has_sha)))
        ea, eb = exact_edges(np.array([d.hex() for d in sha.tolist()], object) + "\x00" + texts[idx] if by_text
                             else sha)
        exact = (idx[ea].astype(np.int64), idx[eb].astype(np.int64))
    else:
        exact = (np.zeros(0, np.int64), np.zeros(0, np.int64))
    key = _bucket_keys(gids, rows["key"].combine_chunks(), old).take
    del rows
    store = run.vectors()
    local_old = None
    if old is not None:
        local_old = {"a": np.searchsorted(gids, old["gid_a"]), "b": old["b"], "other": old["other"], "sim": old["sim"]}
    edges = Edges(gids, texts, exact, near, local_old)
    all_gids = np.concatenate([gids, old["group_ids"]]) if old is not None else gids
    check = (MemberCheck(run, ex, all_gids, edges.pairs, n, cfg.group.member_hops)
             if verify.active(run) and cfg.group.member_check else None)
    if old is not None:   # earlier runs' groups join as one node each, ranked first: old rows never change
        k = len(old["group_ids"])
        all_rank = np.concatenate([rank, np.arange(k) - k])
        target = registry.Target(cfg.against, cfg.embed.model, run.root)
        rep, rep_sim = group_nodes(all_gids, all_rank, edges.pairs, StoreUnion([store, *target.stores]),
                                   cfg.group.min_rep_similarity, check, similar=edges.similar)
        rep, rep_sim = rep[:n], rep_sim[:n]
        group_ids = all_gids[rep]
        earlier = old["sizes"].reindex(group_ids).fillna(0).to_numpy(np.int64)   # earlier members of the group
        size = np.bincount(rep, minlength=len(all_gids))[rep] + earlier
    else:
        rep, rep_sim = group_nodes(gids, rank, edges.pairs, store, cfg.group.min_rep_similarity, check,
                                   similar=edges.similar)
        group_ids = gids[rep]
        size = np.bincount(rep, minlength=n)[rep]
    del rank

    # one pass more: each node's nearest verified neighbour, and every edge into edges.parquet
    nearest = Nearest(n)
    n_edges = n_verified = 0
    # search.pairs forest: the edges that join components, in the order they come (exact bytes
    # first): a spanning forest of the threshold graph, n - components edges whatever the pairs
    forest = UnionFind(len(all_gids)) if cfg.search.pairs == "forest" else None
    inner_max = np.full(len(all_gids), -np.inf, np.float32)   # per representative: its group's best kept edge
    for a, b, ga, gb, sim, kind, score in edges.scored():
        inside = b < n                       # this run's rows (not an earlier group's node)
        nearest.update(np.concatenate([a, b[inside]]), np.concatenate([gb, ga[inside]]),
                       np.concatenate([sim, sim[inside]]))
        n_verified += len(ga)
        score = np.full(len(ga), np.nan, np.float32) if score is None else score
        if forest is not None:
            keep = forest.forest(a, b)
            a, b, ga, gb, sim, score = a[keep], b[keep], ga[keep], gb[keep], sim[keep], score[keep]
        writer.write(pa.table({"gid_a": ga, "gid_b": gb, "similarity": sim,
                               "kind": pa.repeat(pa.scalar(kind), len(ga)) if isinstance(kind, str)
                               else pa.array(kind[keep] if forest is not None else kind, pa.string()),
                               "pixel_score": pa.array(score, mask=np.isnan(score)),
                               "key_a": key(ga), "key_b": key(gb)}, schema=EDGE_SCHEMA))
        n_edges += len(ga)
        inner = b < n
        inner[inner] = rep[a[inner]] == rep[b[inner]]
        np.maximum.at(inner_max, rep[a[inner]], sim[inner])
    found = nearest.gid >= 0
    is_rep = rep == np.arange(n)
    rep_key = key(group_ids)
    out = pa.table({"gid": gids, "group_id": group_ids, "group_size": size.astype(np.int64),
                    "is_representative": is_rep, "rep_similarity": rep_sim,
                    "nearest_gid": pa.array(nearest.gid, mask=~found),
                    "nearest_similarity": pa.array(nearest.sim, mask=~found),
                    "representative_key": rep_key, "nearest_key": key(nearest.gid)}, schema=ROW_SCHEMA)
    groups = _groups_of(group_ids, rep, size, rep_sim, inner_max, rep_key, n)
    st = {"edges": n_edges, "verified": n_verified, **(check.stats if check is not None else {})}
    if old is None:    # each group of this run's rows has its representative among them
        st["groups"] = int(is_rep.sum())
    else:
        st["groups"] = int(len(unique(group_ids)))
        st["joining"] = int(np.isin(group_ids, old["group_ids"]).sum())
        st["grown"] = int(np.isin(old["group_ids"], group_ids).sum())
    return out, groups, st


def _groups_of(group_ids, rep, size, rep_sim, inner_max, rep_key: pa.Array, n: int) -> pa.Table:
    """A bucket's groups of 2+ rows (GROUP_SCHEMA), by one sort of its rows."""
    multi = np.flatnonzero(size > 1)
    order = multi[np.argsort(group_ids[multi], kind="stable")]
    q = group_ids[order]
    if not len(q):
        return GROUP_SCHEMA.empty_table()
    starts = np.flatnonzero(np.r_[True, q[1:] != q[:-1]])
    first = order[starts]
    r = rep[first]
    best = inner_max[r]
    return pa.table({"group_id": q[starts], "size": size[first].astype(np.int64),
                     "representative_key": rep_key.take(pa.array(first)),
                     "max_similarity": pa.array(best, mask=~np.isfinite(best)),
                     "min_similarity": np.minimum.reduceat(rep_sim[order], starts),
                     "rows": np.diff(np.r_[starts, len(q)]).astype(np.int64), "earlier": r >= n},
                    schema=GROUP_SCHEMA)


def _bucket_keys(gids: np.ndarray, keys: pa.Array, old: dict | None) -> Keys:
    """gid -> key within a bucket: its rows' keys, and (incremental runs) the earlier runs' rows
    it touches (the earlier groups' representatives, the rows of edges to them)."""
    g, k = [gids], [keys]
    if old is not None:
        g += [old["group_ids"], old["other"]]
        k += [pa.array(old["group_keys"], pa.string()), pa.array(old["other_keys"], pa.string())]
    g = np.concatenate(g)
    order = np.argsort(g, kind="stable")
    return Keys(g[order], pa.concat_arrays([a.cast(pa.string()) for a in k]).take(pa.array(order)))


def _old_part(old: dict, groups: np.ndarray, edges: np.ndarray) -> dict:
    """A bucket's share of the earlier groups: its groups (renumbered from 0) and their edges."""
    renumber = np.cumsum(groups) - 1
    return {"group_ids": old["group_ids"][groups], "group_keys": old["group_keys"][groups],
            "gid_a": old["gid_a"][edges], "b": renumber[old["b"][edges]], "other": old["other"][edges],
            "other_keys": old["other_keys"][edges], "sim": old["sim"][edges],
            "sizes": old["sizes"].reindex(old["group_ids"][groups])}      # only its groups' sizes go to its task


def _old_groups(run: Run, gids: np.ndarray) -> dict:
    """Verified edges from this run's rows to earlier runs' rows, as edges to one node per earlier
    group: gid_a (this run's row), b (the earlier group's index in group_ids), other (the earlier
    row's gid), sim. Refuses keys already in the earlier runs (read shard by shard)."""
    import pandas as pd
    cfg = run.cfg
    target = registry.Target(cfg.against, cfg.embed.model, run.root)
    cross = verify.cross_pairs(run, "against", Path(cfg.against).name).to_pandas()
    reg = target.registry.set_index("gid")
    earlier_keys = pa.array(target.registry["key"].tolist(), pa.string())
    for name in run.shard_names():
        t = pq.read_table(run.ingest_file(name), columns=["key"])
        clash = t.filter(pc.is_in(t["key"], earlier_keys))["key"].to_pylist()
        if clash:
            raise ValueError(f"keys {sorted(set(clash))[:3]} are already in {cfg.against}; "
                             "keys must be unique across increments")
    g = cross["gid"].to_numpy(np.int64)
    ok = np.isin(g, gids)
    if cfg.group.duplicate_key == "image+text":
        captions = np.array([normalize_text(c) for c in column_of(run, g[ok], "caption")], dtype=object)
        ok[ok] = captions == reg["text"].reindex(cross["other_gid"].to_numpy()[ok]).to_numpy()
    other, sim = cross["other_gid"].to_numpy()[ok], cross["similarity"].to_numpy()[ok]
    old_group = reg["group_id"].reindex(other).to_numpy(np.int64)
    group_ids, b = unique(old_group, return_inverse=True)
    sizes = target.registry.groupby("group_id").size()
    return {"group_ids": group_ids, "group_keys": reg["key"].reindex(group_ids).to_numpy(object),
            "gid_a": g[ok], "b": b.astype(np.int64), "other": other,
            "other_keys": reg["key"].reindex(other).to_numpy(object), "sim": sim.astype(np.float32),
            "sizes": pd.Series(sizes)}
