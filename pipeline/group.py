"""group: exact connected components over verified edges, with a guard against chaining.

Nodes are the rows that have a vector. Edges are verified near pairs (exact cosine >= threshold)
and exact-byte pairs (equal sha256). Components come from the vectorised union-find
(unionfind.py), fed in bounded chunks. Each group gets one representative by a deterministic
rule: most pixels, then most bytes, then the smallest key (group.representative: quality), or
the first row in input order (first). Chaining guard: a member less similar than
`min_rep_similarity` to its representative is split off; the split-off members are regrouped
among themselves (by the edges between them) and the rule repeats until every member is close
to its representative.
Writes group/rows.parquet (gid, group_id, group_size, is_representative, rep_similarity,
nearest_gid, nearest_similarity) and group/edges.parquet (gid_a, gid_b, similarity, kind).
The group id is the representative's gid: stable and deterministic.
Incremental runs (config `against`): each earlier group touched by this run's rows joins as one
node ranked before every new row, so earlier rows keep their status and new copies are removed.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import crossindex
from .ingest import exact_edges
from .io import write_parquet
from .run import Run
from .search import pair_files
from .unionfind import UnionFind
from .vectors import StoreUnion, VectorStore


def components(n: int, a: np.ndarray, b: np.ndarray, chunk: int = 5_000_000) -> np.ndarray:
    """Component label per node (its smallest member), edges fed in bounded chunks."""
    return UnionFind(n).union_stream((a[i:i + chunk], b[i:i + chunk])
                                     for i in range(0, len(a), chunk)).labels()


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


def group(gids, rank, edges_a, edges_b, store: VectorStore, guard: float, max_rounds: int = 50):
    """Labels (representative node index per node) and each node's similarity to its representative."""
    n = len(gids)
    labels = components(n, edges_a, edges_b)
    sim = np.ones(n, np.float32)
    for _ in range(max_rounds):
        rep = representatives(labels, rank)
        multi = np.nonzero(rep != np.arange(n))[0]
        sim = np.ones(n, np.float32)
        if len(multi):
            sim[multi] = np.einsum("ij,ij->i", store.get(gids[multi]), store.get(gids[rep[multi]]))
        bad = sim < guard
        if not bad.any():
            return rep, sim
        # regroup the split-off members among themselves, by edges inside their old component
        keep = bad[edges_a] & bad[edges_b] & (labels[edges_a] == labels[edges_b])
        idx = np.nonzero(bad)[0]
        local = np.full(n, -1, np.int64)
        local[idx] = np.arange(len(idx))
        sub = components(len(idx), local[edges_a[keep]], local[edges_b[keep]])
        labels = labels.copy()
        labels[idx] = labels.max() + 1 + sub
    rep = representatives(labels, rank)
    return rep, sim


def run_stage(run: Run) -> dict:
    if not run.pending("group", ["group"]):
        return {"skipped": True}
    t0 = time.time()
    cfg = run.cfg
    ingest = pa.concat_tables([pq.read_table(run.dir("ingest") / f"{n}.parquet") for n in run.shard_names()])
    embedded = pa.concat_tables([pq.read_table(run.dir("embed") / "metadata" / f"metadata_{n}.parquet",
                                               columns=["gid"]) for n in run.shard_names()])
    nodes = ingest.filter(pc.is_in(ingest["gid"], embedded["gid"])).sort_by("gid")
    gids = nodes["gid"].to_numpy()
    pixels = (nodes["width"].fill_null(0).to_numpy() * nodes["height"].fill_null(0).to_numpy()).astype(np.int64)
    nbytes = nodes["nbytes"].fill_null(0).to_numpy()
    keys = np.array(nodes["key"].to_pylist(), dtype=object)
    rank = np.empty(len(gids), np.int64)   # lower is better: most pixels, most bytes, smallest key
    rank[np.lexsort((keys, -nbytes, -pixels))] = np.arange(len(gids))
    if cfg.group.representative == "first":
        rank = np.arange(len(gids), dtype=np.int64)   # gids are sorted: input order

    near = pa.concat_tables([pq.read_table(p, columns=["gid_a", "gid_b", "similarity"],
                                           filters=[("similarity", ">=", cfg.search.threshold)])
                             for p in pair_files(run.dir("search"))])
    na = np.searchsorted(gids, near["gid_a"].to_numpy())
    nb = np.searchsorted(gids, near["gid_b"].to_numpy())
    nsim = near["similarity"].to_numpy()
    by_text = cfg.group.duplicate_key == "image+text"
    texts = np.array([normalize_text(t) for t in nodes["caption"].to_pylist()], dtype=object)
    if cfg.group.exact_bytes and nodes["sha256"].null_count == 0:
        sha = np.array(nodes["sha256"].to_pylist(), dtype=object)
        ea, eb = exact_edges(sha + "\x00" + texts if by_text else sha)
    else:
        ea = eb = np.zeros(0, np.int64)
    if by_text:   # the same picture under another text is not a duplicate
        same = texts[na] == texts[nb]
        na, nb, nsim = na[same], nb[same], nsim[same]
    a = np.concatenate([ea, na]).astype(np.int64)
    b = np.concatenate([eb, nb]).astype(np.int64)
    sim = np.concatenate([np.ones(len(ea), np.float32), nsim]).astype(np.float32)
    kind = np.array(["exact"] * len(ea) + ["near"] * len(na), dtype=object)
    # one edge per pair; exact wins over near
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    order = np.lexsort((kind != "exact", hi, lo))
    first = np.ones(len(order), bool)
    first[1:] = (lo[order][1:] != lo[order][:-1]) | (hi[order][1:] != hi[order][:-1])
    sel = order[first]
    lo, hi, sim, kind = lo[sel], hi[sel], sim[sel], kind[sel]

    store = VectorStore(run.dir("embed"), {s.index: s.name for s in run.shards})
    n = len(gids)
    old = _old_groups(run, gids, keys, texts, store) if cfg.against else None
    if old is not None:   # earlier runs' groups join as one node each, ranked first: old rows never change
        all_gids = np.concatenate([gids, old["group_ids"]])
        all_rank = np.concatenate([rank, np.arange(len(old["group_ids"])) - len(old["group_ids"])])
        ga = np.concatenate([lo, old["a"]]); gb = np.concatenate([hi, n + old["b"]])
        rep, rep_sim = group(all_gids, all_rank, ga, gb, old["store"], cfg.group.min_rep_similarity)
        rep, rep_sim = rep[:n], rep_sim[:n]
        group_ids = all_gids[rep]
        earlier = old["sizes"].reindex(group_ids).fillna(0).to_numpy(np.int64)   # earlier members of the group
        size = np.bincount(rep, minlength=len(all_gids))[rep] + earlier
    else:
        rep, rep_sim = group(gids, rank, lo, hi, store, cfg.group.min_rep_similarity)
        group_ids = gids[rep]
        size = np.bincount(rep, minlength=n)[rep]
    # nearest verified neighbour of each node
    both_n = np.concatenate([lo, hi])
    both_o = np.concatenate([gids[hi], gids[lo]])
    both_s = np.concatenate([sim, sim])
    if old is not None:
        both_n = np.concatenate([both_n, old["a"]]); both_o = np.concatenate([both_o, old["other"]])
        both_s = np.concatenate([both_s, old["sim"]])
    o = np.lexsort((both_o, -both_s, both_n))
    firsts = np.ones(len(o), bool)
    firsts[1:] = both_n[o][1:] != both_n[o][:-1]
    nearest = np.full(n, -1, np.int64)
    nearest_sim = np.full(n, np.nan, np.float32)
    nearest[both_n[o][firsts]] = both_o[o][firsts]
    nearest_sim[both_n[o][firsts]] = both_s[o][firsts]
    if old is not None:   # the edges to earlier runs' rows are part of this run's report
        lo_g = np.concatenate([gids[lo], gids[old["a"]]]); hi_g = np.concatenate([gids[hi], old["other"]])
        sim = np.concatenate([sim, old["sim"]])
        kind = np.concatenate([kind, np.array(["near"] * len(old["a"]), object)])
    else:
        lo_g, hi_g = gids[lo], gids[hi]

    out = run.dir("group")
    rows = pa.table({"gid": gids, "group_id": group_ids, "group_size": size.astype(np.int64),
                     "is_representative": rep == np.arange(len(gids)), "rep_similarity": rep_sim,
                     "nearest_gid": pa.array(nearest, mask=nearest < 0),
                     "nearest_similarity": pa.array(nearest_sim, mask=np.isnan(nearest_sim))})
    edges = pa.table({"gid_a": lo_g, "gid_b": hi_g, "similarity": sim,
                      "kind": pa.array(kind.tolist(), pa.string())})
    files = [write_parquet(out / "rows.parquet", rows), write_parquet(out / "edges.parquet", edges)]
    n_groups = int(len(np.unique(group_ids)))
    registered = crossindex.register(run, rows, keys.tolist(), texts.tolist())
    run.marker("group", "group").write(cfg.fingerprint("group"), files, rows=len(gids), groups=n_groups)
    stats = {"rows": len(gids), "groups": n_groups, "edges": len(lo_g), "seconds": round(time.time() - t0, 3),
             "registered": registered}
    if old is not None:
        stats.update(rows_joining_earlier_groups=int(np.isin(group_ids, old["group_ids"]).sum()),
                     earlier_groups_grown=int(np.isin(old["group_ids"], group_ids).sum()))
    return stats


def _old_groups(run: Run, gids: np.ndarray, keys: np.ndarray, texts: np.ndarray, store: VectorStore) -> dict:
    """Verified edges from this run's rows to earlier runs' rows, as edges to one node per earlier group."""
    import pandas as pd
    cfg = run.cfg
    target = crossindex.Target(cfg.against, cfg.embed.model, run.root)
    cross = crossindex.pairs(run, "against", Path(cfg.against).name).to_pandas()
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
    group_ids, b = np.unique(old_group, return_inverse=True)
    sizes = target.registry.groupby("group_id").size()
    return {"group_ids": group_ids, "a": a.astype(np.int64), "b": b.astype(np.int64), "other": other,
            "sim": sim.astype(np.float32), "sizes": pd.Series(sizes), "store": StoreUnion([store, *target.stores])}
