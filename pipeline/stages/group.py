"""group: exact connected components over verified edges, with a guard against chaining.

Nodes are the rows that have a vector. Edges are exact-byte pairs (equal sha256, kind bytes), near
pairs at or above the threshold (kind descriptor) or, where the verify stage ran, pairs at or above
verify.sure (descriptor) and pairs in [verify.low, sure) the pixel check accepted (kind pixels). Components come from the vectorised union-find
(unionfind.py), fed in bounded chunks. Each group gets one representative by a deterministic
rule: most pixels, then most bytes, then the smallest key (group.representative: quality), or
the first row in input order (first). Chaining guard: a member less similar than
`min_rep_similarity` to its representative is split off, and where the pixel check runs
(group.member_check) so is a member that is not a copy of its representative (no accepted edge
between the two, and their pixels say no: MemberCheck); the split-off members are regrouped
among themselves (by the edges between them) and the rule repeats until every member passes.
Writes group/rows.parquet (gid, group_id, group_size, is_representative, rep_similarity,
nearest_gid, nearest_similarity) and group/edges.parquet (gid_a, gid_b, similarity, kind, pixel_score).
The group id is the representative's gid: stable and deterministic.
Incremental runs (config `against`): each earlier group touched by this run's rows joins as one
node ranked before every new row, so earlier rows keep their status and new copies are removed.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..core.arrays import unique
from ..core.io import Marker, parquet_writer
from ..core.memory import need
from ..core.run import Run
from ..core.vectors import StoreUnion, VectorStore, meta_path
from ..lib import registry
from ..lib.nodes import GidIndex, keys_of, quality_rank, read_nodes
from ..lib.unionfind import UnionFind, exact_edges
from . import verify

NAME = "group"
FIELDS = ("input", "embed.model", "codec", "search", "verify", "group", "against", "decontaminate")


CHUNK = 5_000_000   # edges held at once: the bounded buffer of every pass over the edges
ROW_BYTES = 110     # held per row at the stage's peak (89 B measured at 10 M rows: bench/results/stage_memory.md)
GROUP_BUFFERS = 512 << 20   # an edge chunk and its copies, member / representative vectors
SIM_ROWS = 16384    # member / representative vector pairs compared at once (768-d: 2 x 50 MB of float32;
                    # 65,536 held 500 MB, the stage's largest buffer at 1 M rows)


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
                confirm: Callable | None = None, max_rounds: int = 50):
    """Labels (representative node index per node) and each node's similarity to its representative.
    `edges()` streams the edges as (a, b) node-index chunks; it is called once per pass.
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
        multi, sim = _rep_similarity(gids, rep, store)
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
    multi, sim = _rep_similarity(gids, rep, store)
    bad = sim < guard                         # still failing after max_rounds: alone
    if confirm is not None:
        bad[multi] |= ~confirmed[multi] | (asked[multi] != rep[multi])
    rep[bad] = np.nonzero(bad)[0]
    sim[bad] = 1.0
    return rep, sim


def _rep_similarity(gids, rep, store) -> tuple[np.ndarray, np.ndarray]:
    """The nodes that are not their own representative, and every node's cosine to its
    representative (1 for representatives)."""
    n = len(gids)
    multi = np.nonzero(rep != np.arange(n))[0]
    sim = np.ones(n, np.float32)
    for i in range(0, len(multi), SIM_ROWS):     # bounded memory: SIM_ROWS vector pairs at a time
        m = multi[i:i + SIM_ROWS]
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


class Edges:
    """A run's verified edges, never all in memory: exact-byte edges (copy -> first copy), then
    near pairs read pair file by pair file in chunks of CHUNK, then (incremental runs) edges to
    earlier runs' rows. Node indexes are positions in `gids`; node n + k is earlier group k."""

    def __init__(self, run: Run, gids: np.ndarray, texts: np.ndarray, exact: tuple, old: dict | None):
        self.files = run.pair_files()
        self.pixels = verify.active(run)
        self.decisions = [verify.decision_file(run, p) for p in self.files]
        # without the pixel check the descriptor decides at the threshold; with it, at `sure`,
        # and pairs in [low, sure) are edges where the pixels accepted them
        self.threshold = run.cfg.search.threshold
        self.low, self.sure = verify.band(run) if self.pixels else (self.threshold,) * 2
        self.by_text = run.cfg.group.duplicate_key == "image+text"
        self.gids, self.texts, self.old = gids, texts, old
        self.position = GidIndex(gids)
        self.ea, self.eb = exact
        self.head = np.full(len(gids), -1, np.int64)   # a near pair equal to an exact edge is dropped
        self.head[self.eb] = self.ea

    def _batches(self, path: Path, decisions: Path):
        cols = ["gid_a", "gid_b", "similarity"]
        pairs = pq.ParquetFile(path).iter_batches(CHUNK, columns=cols)
        if not self.pixels:
            for batch in pairs:
                yield batch, None, None
            return
        for batch, dec in zip(pairs, pq.ParquetFile(decisions).iter_batches(CHUNK)):   # aligned row by row
            if dec.num_rows != batch.num_rows:
                raise RuntimeError(f"{decisions}: decisions out of step with {path}; rerun the verify stage")
            yield batch, dec.column(0).to_numpy(), dec.column(1).to_numpy()

    def near(self):
        """(lo, hi, similarity, by pixels, pixel score) node-index chunks of the descriptor and
        pixel-verified edges."""
        for path, decisions in zip(self.files, self.decisions):
            for batch, px, score in self._batches(path, decisions):
                sim = batch.column(2).to_numpy()
                sel = sim >= self.sure if px is None else verify.accepted(sim, px, self.low, self.sure, self.threshold)
                lo = self.position(batch.column(0).to_numpy()[sel])
                hi = self.position(batch.column(1).to_numpy()[sel])
                keep = self.head[hi] != lo
                if self.by_text:   # the same picture under another text is not a duplicate
                    keep &= self.texts[lo] == self.texts[hi]
                by_px = ((sim[sel] < self.sure) & (px[sel] == 1) if px is not None else np.zeros(int(sel.sum()), bool))[keep]
                sc = score[sel][keep] if score is not None else np.full(int(keep.sum()), np.nan, np.float32)
                yield lo[keep], hi[keep], sim[sel][keep].astype(np.float32), by_px, sc

    def pairs(self):
        """(a, b) chunks for union-find, the earlier groups' nodes included."""
        n = len(self.gids)
        for i in range(0, len(self.ea), CHUNK):
            yield self.ea[i:i + CHUNK], self.eb[i:i + CHUNK]
        for lo, hi, *_ in self.near():
            yield lo, hi
        if self.old is not None:
            yield self.old["a"], n + self.old["b"]

    def scored(self):
        """(node a, node b, gid a, gid b, similarity, kind, pixel score) chunks: every edge of the
        report (node n + k: earlier group k, as in `pairs`); kind: bytes | descriptor | pixels."""
        g = self.gids
        for i in range(0, len(self.ea), CHUNK):
            a, b = self.ea[i:i + CHUNK], self.eb[i:i + CHUNK]
            yield a, b, g[a], g[b], np.ones(len(a), np.float32), "bytes", None
        for lo, hi, sim, by_px, score in self.near():   # in file order, whatever the chunk size
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
                        ("nearest_gid", pa.int64()), ("nearest_similarity", pa.float32())])
EDGE_SCHEMA = pa.schema([("gid_a", pa.int64()), ("gid_b", pa.int64()), ("similarity", pa.float32()),
                         ("kind", pa.string()), ("pixel_score", pa.float32())])


def units(run: Run) -> list[Marker]:
    return [run.marker(NAME, NAME)]


def run(run: Run, ex, stats: dict) -> dict:
    if not run.pending(NAME, [NAME]):
        return {"skipped": True}
    t0 = time.time()
    cfg = run.cfg
    by_text = cfg.group.duplicate_key == "image+text"
    # per-row numbers only, read shard by shard (lib/nodes.py): no key or digest string per row;
    # captions only for duplicate_key image+text, keys only for an incremental run's clash check
    embedded = {n: pq.read_table(meta_path(run.embed_dir(), n), columns=["gid"])["gid"].to_numpy()
                for n in run.shard_names()}
    n_rows = sum(len(g) for g in embedded.values())
    need(f"group: {n_rows:,} rows in one process", n_rows * ROW_BYTES + GROUP_BUFFERS)
    nodes = read_nodes(run, embedded, captions=by_text, keys=bool(cfg.against))
    del embedded
    gids = nodes.gids
    n = len(gids)
    if cfg.group.representative == "first":
        rank = np.arange(n, dtype=np.int64)   # gids are sorted: input order
    else:                                     # most pixels, most bytes, smallest key
        rank = quality_rank(gids, nodes.pixels, nodes.nbytes, nodes.prefix, lambda g: keys_of(run, g))
    nodes.pixels = nodes.nbytes = nodes.prefix = None    # the rank's inputs: 32 B a row, no longer needed
    texts = np.array([normalize_text(t) for t in nodes.captions], dtype=object) if by_text else None
    if cfg.group.exact_bytes and nodes.sha is not None:
        exact = exact_edges(np.array([d.hex() for d in nodes.sha.tolist()], object) + "\x00" + texts if by_text
                            else nodes.sha)
    else:
        exact = (np.zeros(0, np.int64), np.zeros(0, np.int64))
    keys = np.array(nodes.keys, dtype=object) if cfg.against else None
    del nodes

    store = run.vectors()
    old = _old_groups(run, gids, keys, texts, store) if cfg.against else None
    edges = Edges(run, gids, texts, tuple(np.asarray(e, np.int64) for e in exact), old)
    all_gids = np.concatenate([gids, old["group_ids"]]) if old is not None else gids
    check = (MemberCheck(run, ex, all_gids, edges.pairs, n, cfg.group.member_hops)
             if verify.active(run) and cfg.group.member_check else None)
    if old is not None:   # earlier runs' groups join as one node each, ranked first: old rows never change
        all_rank = np.concatenate([rank, np.arange(len(old["group_ids"])) - len(old["group_ids"])])
        rep, rep_sim = group_nodes(all_gids, all_rank, edges.pairs, old["store"], cfg.group.min_rep_similarity,
                                   check)
        rep, rep_sim = rep[:n], rep_sim[:n]
        group_ids = all_gids[rep]
        earlier = old["sizes"].reindex(group_ids).fillna(0).to_numpy(np.int64)   # earlier members of the group
        size = np.bincount(rep, minlength=len(all_gids))[rep] + earlier
    else:
        rep, rep_sim = group_nodes(gids, rank, edges.pairs, store, cfg.group.min_rep_similarity, check)
        group_ids = gids[rep]
        size = np.bincount(rep, minlength=n)[rep]
    del rank

    # one pass more: each node's nearest verified neighbour, and every edge into edges.parquet
    nearest = Nearest(n)
    n_edges = n_verified = 0
    # search.pairs forest: the edges that join components, in the order they come (exact bytes
    # first): a spanning forest of the threshold graph, n - components edges whatever the pairs
    forest = UnionFind(n + (len(old["group_ids"]) if old is not None else 0)) if cfg.search.pairs == "forest" else None
    with parquet_writer(run.group_edges_file(), EDGE_SCHEMA) as writer:
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
                                   "pixel_score": pa.array(score, mask=np.isnan(score))}, schema=EDGE_SCHEMA))
            n_edges += len(ga)
    n_reps = 0
    with parquet_writer(run.group_rows_file(), ROW_SCHEMA) as writer:
        for i in range(0, len(gids), 1 << 20):     # a row group at a time: no Arrow copy of every row
            s = slice(i, i + (1 << 20))
            found = nearest.gid[s] >= 0
            is_rep = rep[s] == np.arange(i, i + len(found))
            n_reps += int(is_rep.sum())
            writer.write(pa.table({"gid": gids[s], "group_id": group_ids[s], "group_size": size[s].astype(np.int64),
                                   "is_representative": is_rep,
                                   "rep_similarity": rep_sim[s], "nearest_gid": pa.array(nearest.gid[s], mask=~found),
                                   "nearest_similarity": pa.array(nearest.sim[s], mask=~found)}, schema=ROW_SCHEMA))
    files = [run.group_rows_file(), run.group_edges_file()]
    # each group of this run's rows has its representative among them; an earlier run's group does not
    n_groups = n_reps if old is None else int(len(unique(group_ids)))
    run.marker(NAME, NAME).write(run.fingerprint(NAME), files, rows=len(gids), groups=n_groups)
    stats = {"rows": len(gids), "groups": n_groups, "edges": n_edges, "verified_edges_read": n_verified,
             "seconds": round(time.time() - t0, 3), **(check.stats if check is not None else {})}
    if old is not None:
        stats.update(rows_joining_earlier_groups=int(np.isin(group_ids, old["group_ids"]).sum()),
                     earlier_groups_grown=int(np.isin(old["group_ids"], group_ids).sum()))
    return stats


def _old_groups(run: Run, gids: np.ndarray, keys: np.ndarray, texts: np.ndarray, store: VectorStore) -> dict:
    """Verified edges from this run's rows to earlier runs' rows, as edges to one node per earlier group."""
    import pandas as pd
    cfg = run.cfg
    target = registry.Target(cfg.against, cfg.embed.model, run.root)
    cross = verify.cross_pairs(run, "against", Path(cfg.against).name).to_pandas()
    reg = target.registry.set_index("gid")
    clash = set(target.registry["key"]) & set(keys.tolist())
    if clash:
        raise ValueError(f"keys {sorted(clash)[:3]} are already in {cfg.against}; "
                         "keys must be unique across increments")
    a = np.searchsorted(gids, cross["gid"].to_numpy())
    other = cross["other_gid"].to_numpy()
    ok = (a < len(gids)) & (gids[np.minimum(a, len(gids) - 1)] == cross["gid"].to_numpy())
    if cfg.group.duplicate_key == "image+text":
        ok &= texts[np.minimum(a, len(gids) - 1)] == reg["text"].reindex(other).to_numpy()
    a, other, sim = a[ok], other[ok], cross["similarity"].to_numpy()[ok]
    old_group = reg["group_id"].reindex(other).to_numpy(np.int64)
    group_ids, b = unique(old_group, return_inverse=True)
    sizes = target.registry.groupby("group_id").size()
    return {"group_ids": group_ids, "a": a.astype(np.int64), "b": b.astype(np.int64), "other": other,
            "sim": sim.astype(np.float32), "sizes": pd.Series(sizes), "store": StoreUnion([store, *target.stores])}
