"""verify: candidate pairs checked by pixels (local features + geometric verification, lib/pixels.py).

A global descriptor says "the same kind of picture", not "the same picture". Where the input has
images, every candidate pair the descriptor cannot settle alone, similarity in [low, sure), is
checked on the images themselves; pairs at or above `sure` are taken on the descriptor.
  1. features (a task per input shard): the shard's images of the rows in such pairs, read once,
     decoded to a grayscale working image -> verify/features/NNNNN.npz (arrays only, no pickle);
     the pixel check makes each one's thumbnail from it, and its keypoints only when a pair needs
     them (pixels.Features: a re-encoded or resized copy is accepted on the whole frame first)
  2. decide (a task per search pair file): each pair's decision, aligned row by row with the
     pair file -> verify/decisions/<pair file name>: pixels (int8: -1 not checked, 0 rejected,
     1 accepted, 2 no pixel evidence: not accepted, and an image without local structure
     (MIN_KEYPOINTS), left to the descriptor at search.threshold, 3 implied: not checked, the
     accepted edges checked before it, most similar first, already connect its rows;
     verify.skip_connected) and
     pixel_score (the verifier's score; NaN where not checked)
  3. the same for the pairs against other runs' indexes (decontamination leaks, an incremental
     run's matches with earlier rows): the other side's images read back from its run's input
     -> verify/cross/<kind>/<pair file name>
Group reads the decisions beside the pairs (`accepted`): an edge is a pair with similarity >=
sure, or one in [low, sure) that the pixels accepted; `cross_pairs` gives the cross pairs that
stand. With verify.method off, or input without images (released embeddings), nothing is written
and group takes pairs at or above search.threshold as before; the summary says that no pixel
check ran.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..core.arrays import unique
from ..core.io import Marker, load_npy, write_parquet
from ..core.run import Run
from ..lib.nodes import PREFIX, picture_pixels, quality_rank
from ..sources import Shard, source_for

NAME = "verify"
# an image with fewer keypoints than this (smooth gradients, flat colour) gives the pixel check
# too little to reject on: a pair the pixels do not accept is then left to the descriptor at
# search.threshold (decision 2); one they accept (an alignment whose pixels agree) is a copy.
# Measured: the demo's colour wheel has 3-17 keypoints; photos, text, tiny upsampled faces 500+;
# a smooth clock face 15-28.
MIN_KEYPOINTS = 20
NO_EVIDENCE = 2
IMPLIED = 3      # not checked: accepted edges checked before it already connect its two rows
FULL_SHARE = 0.9  # a full copy (an anchor of the member check): each image holds this much of the other
ANCHORS = 3       # members with an accepted edge to the representative tried as anchors, per group
ANCHOR_ACCEPT = 0.6  # a member rejected against its representative needs a clear copy of an anchor
                     # (copies score mostly > 0.6; look-alikes <= 0.45 but one pair of faces at 0.55)
FIELDS = ("input", "embed.model", "codec", "search", "verify", "against", "decontaminate", "group.representative")
CHUNK = 1 << 20


def active(run: Run) -> bool:
    return run.cfg.pixel_check


def band(run: Run) -> tuple[float, float]:
    return run.cfg.verify.low, run.cfg.verify.sure


def _band_pairs(path: Path, low: float, sure: float):
    for batch in pq.ParquetFile(path).iter_batches(CHUNK, columns=["gid_a", "gid_b", "similarity"]):
        sim = batch.column(2).to_numpy()
        sel = (sim >= low) & (sim < sure)
        yield batch.column(0).to_numpy()[sel], batch.column(1).to_numpy()[sel], sel


def needed_gids(run: Run) -> np.ndarray:
    """This run's rows in a pair to check: its own pairs, and its side of the cross pairs."""
    low, sure = band(run)
    parts = [np.zeros(0, np.int64)]
    for path in run.pair_files():
        for a, b, _ in _band_pairs(path, low, sure):
            parts.append(unique(np.concatenate([a, b])))
    for _, _, path in cross_files(run):
        t = pq.read_table(path, columns=["gid", "similarity"])
        sim = t["similarity"].to_numpy()
        parts.append(t["gid"].to_numpy()[(sim >= low) & (sim < sure)])
    return unique(np.concatenate(parts))


def cross_files(run: Run) -> list[tuple[str, Path, Path]]:
    """(kind, target folder, pair file) of the pairs against other runs' indexes (search/against,
    search/leaks: gid, other_gid, similarity)."""
    from .search import cross_targets
    out = []
    for kind, folder in cross_targets(run):
        d = run.cross_dir(kind)
        out += [(kind, folder, p) for p in sorted(d.glob(f"{folder.name}-*.parquet"))] if d.exists() else []
    return out


def cross_decision_file(run: Run, kind: str, pair_file: Path) -> Path:
    return run.dir(NAME) / "cross" / kind / pair_file.name


def cross_pairs(run: Run, kind: str, name: str | None = None) -> pa.Table:
    """The pairs against other runs' indexes that stand: all of them without the pixel check;
    with it, those at or above verify.sure and those in the band the pixels accepted."""
    from ..lib import registry
    if not active(run):
        return registry.pairs(run, kind, name)
    low, sure = band(run)
    d = run.cross_dir(kind)
    files = sorted(d.glob(f"{name + '-' if name else ''}*.parquet")) if d.exists() else []
    keep = []
    for path in files:
        t = pq.read_table(path)
        dec = pq.read_table(cross_decision_file(run, kind, path))["pixels"].to_numpy()
        sim = t["similarity"].to_numpy()
        keep.append(t.filter(pa.array(accepted(sim, dec, low, sure, run.cfg.search.threshold))))
    return pa.concat_tables(keep) if keep else registry.pairs(run, kind, name)


def feature_file(run: Run, shard: str) -> Path:
    return run.dir(NAME) / "features" / f"{shard}.npz"


def decision_file(run: Run, pair_file: Path) -> Path:
    return run.dir(NAME) / "decisions" / pair_file.name


STORED = ("work",)      # per image, raveled and concatenated with offsets and shapes (see pack)


def pack(feats: list) -> dict[str, np.ndarray]:
    """pixels.Features of many images as flat arrays (np.savez, no pickle): the working images
    raveled and concatenated, with each one's offset and shape, and a row per image of `size`
    and `native`. Thumbnails and keypoints are made from the working image where they are needed."""
    out = {"size": np.array([f.size for f in feats], np.int64).reshape(-1, 2),
           "native": np.array([f.native for f in feats], np.int64)}
    for name in STORED:
        vals = [getattr(f, name) for f in feats]
        out[f"{name}__off"] = np.r_[0, np.cumsum([v.size for v in vals])].astype(np.int64)
        out[f"{name}__shape"] = np.array([v.shape for v in vals], np.int64).reshape(-1, 2)
        out[name] = np.concatenate([v.ravel() for v in vals]) if vals else np.zeros(0, np.uint8)
    return out


def _array(z: dict, name: str, i: int) -> np.ndarray:
    lo, hi = z[f"{name}__off"][i], z[f"{name}__off"][i + 1]
    return z[name][lo:hi].reshape(tuple(z[f"{name}__shape"][i]))


def unpack(z: dict, i: int):
    """The pixels.Features of image i of a packed file (files written before the working image
    hold the keypoints and the thumbnail instead)."""
    from ..lib import pixels
    if "work" in z:
        return pixels.from_work(_array(z, "work", i), int(z["native"][i]))
    return pixels.Features(tuple(z["size"][i].tolist()), int(z["native"][i]), _array(z, "thumb", i),
                           xy=_array(z, "xy", i), desc=_array(z, "desc", i))


def features_shard(job: dict) -> dict:
    """Features of the wanted rows of one shard -> one .npz (see pack; `slot`: each gid's image
    in it, byte-identical rows sharing one)."""
    from ..lib import pixels
    t0 = time.time()
    shard = Shard(job["index"], job["name"], Path(job["parquet"]), Path(job["data"]))
    wanted = dict(zip(job["members"], job["gids"]))

    def one(item):
        try:
            return item[0], pixels.features(item[1])
        except ValueError:                  # undecodable here: its pairs stay unchecked (rejected)
            return item[0], None

    images = source_for(job["format"]).read_images(shard, wanted)
    # the features of each distinct content once: byte-identical rows (a placeholder crawled from
    # many URLs) share them (demo: 140 rows, 125 contents)
    first: dict[bytes, int] = {}
    content = [first.setdefault(bytes(data), len(first)) for _, data in images]
    distinct = [None] * len(first)
    for (g, data), c in zip(images, content):
        if distinct[c] is None:
            distinct[c] = (g, data)
    threads = int(job.get("threads", 1))
    if threads > 1:      # decoding and SIFT release the GIL: a task alone on the machine uses its cores
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(threads) as pool:
            done = list(pool.map(one, distinct))
    else:
        done = [one(x) for x in distinct]
    packed = np.cumsum([f is not None for _, f in done]) - 1        # distinct content -> packed slot
    feats = [f for _, f in done if f is not None]
    ok = [done[c][1] is not None for c in content]
    gids = [g for (g, _), k in zip(images, ok) if k]
    errors = len(images) - len(gids)
    arrays = {"gid": np.array(gids, np.int64),
              "slot": np.array([packed[c] for c, k in zip(content, ok) if k], np.int64), **pack(feats),
              "picture": np.array([pixels.picture_share(f) for f in feats], np.float32)}
    path = Path(job["out"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
    tmp.replace(path)
    Marker(path.parent.parent, f"features-{job['name']}").write(job["fp"], [path], rows=len(gids), errors=errors)
    return {"rows": len(gids), "images": len(feats), "errors": errors, "seconds": time.time() - t0}


def picture_shares(files: dict, gids: np.ndarray) -> np.ndarray:
    """Per gid, the share of its frame that is picture (pixels.picture_share), read from the
    feature files of the gids' shards (`files`: shard index -> path) without their features; 1
    where a row has no features (no candidate pair needed them) or its file predates the share."""
    files = {int(k): v for k, v in files.items()}
    gids = np.asarray(gids, np.int64)
    share = np.ones(len(gids), np.float32)
    order = np.argsort(gids, kind="stable")
    nodes = gids[order]
    for shard in unique(nodes >> 32).tolist():
        path = files.get(shard)
        if path is None or not Path(path).exists():
            continue
        z = load_npy(path, keys=("gid", "slot", "picture"))
        if "picture" not in z:      # written before the share (and after the slots)
            continue
        g = z["gid"]
        pos = np.clip(np.searchsorted(nodes, g), 0, len(nodes) - 1)
        hit = nodes[pos] == g
        share[order[pos[hit]]] = z["picture"][z["slot"][hit]]
    return share


class FeatureStore:
    """gid -> pixels.Features over the feature files (each file loaded once, on first use; safe
    across the threads of in_order). The last `keep` images served stay in memory with the
    keypoints computed for them (a group's representative, checked against each of its members in
    turn); an image dropped from them leaves its keypoints in a temporary file (in `spill_dir`,
    gone when the store is), so no image's keypoints are computed twice and memory stays bounded."""

    def __init__(self, files: dict[int, Path], keep: int = 1024, spill_dir: Path | None = None):
        import threading
        from collections import OrderedDict
        self.files, self.loaded, self.lock = files, {}, threading.Lock()
        self.recent, self.keep = OrderedDict(), keep
        self.dropped = [0, 0.0]    # keypoints computed by the images no longer kept: count, seconds
        self.spill_dir, self.spill, self.spilled = spill_dir, None, {}   # (shard, slot) -> (offset, n)

    def keypoint_work(self, more=()) -> dict:
        """Images whose keypoints were computed through this store (and `more`), and their seconds."""
        with self.lock:
            done = [f for f in (*self.recent.values(), *more) if f.keypoint_s]
            return {"keypoints": self.dropped[0] + len(done),
                    "keypoint_s": self.dropped[1] + sum(f.keypoint_s for f in done)}

    def get(self, gid: int):
        gid = int(gid)
        shard = gid >> 32
        with self.lock:
            if shard not in self.loaded:
                path = self.files.get(shard)
                z = load_npy(path) if path and path.exists() else None
                slots = (z["slot"] if "slot" in z else np.arange(len(z["gid"]))) if z else []
                self.loaded[shard] = (z, dict(zip(z["gid"].tolist(), np.asarray(slots).tolist())) if z else {})
            z, pos = self.loaded[shard]
            i = pos.get(gid)
            if i is None:
                return None
            key = (shard, i)                         # byte-identical rows share their slot
            f = self.recent.get(key)
            if f is not None:
                self.recent.move_to_end(key)
                return f
            f = self.recent[key] = self._restored(key, unpack(z, i))
            if len(self.recent) > self.keep:
                self._drop(*self.recent.popitem(last=False))
            return f

    def _drop(self, key, f) -> None:
        if not f.keypoint_s:          # no keypoints computed here (none, from the file, or spilled already)
            return
        import tempfile
        self.dropped[0] += 1
        self.dropped[1] += f.keypoint_s
        xy, desc = f.keypoints()
        if self.spill is None:
            if self.spill_dir is not None:
                Path(self.spill_dir).mkdir(parents=True, exist_ok=True)
            self.spill = tempfile.TemporaryFile(dir=self.spill_dir)
        self.spilled[key] = (self.spill.seek(0, 2), len(xy))
        self.spill.write(np.ascontiguousarray(xy, np.float32).tobytes())
        self.spill.write(np.ascontiguousarray(desc, np.uint8).tobytes())

    def _restored(self, key, f):
        """f with the keypoints it left in the temporary file, if any."""
        if key not in self.spilled:
            return f
        from ..lib import pixels
        off, n = self.spilled[key]
        self.spill.seek(off)
        buf = self.spill.read(n * (8 + 128))
        return pixels.Features(f.size, f.native, f.thumb, work=f.work,
                               xy=np.frombuffer(buf[:8 * n], np.float32).reshape(n, 2),
                               desc=np.frombuffer(buf[8 * n:], np.uint8).reshape(n, 128))


def _decide(pixels, fa, fb, missing: int = 0) -> tuple[int, float]:
    """(decision, score) of one pair: 1 copy, 0 not, NO_EVIDENCE where the pixels do not accept
    it and an image has too little local structure to reject on; an image without features
    (could not be read) gives `missing`."""
    if fa is None or fb is None:
        return missing, 0.0 if missing == 0 else float("nan")
    ok, score = pixels.verify(fa, fb)
    if not ok and min(len(fa.xy), len(fb.xy)) < MIN_KEYPOINTS:
        return NO_EVIDENCE, float("nan")     # too little structure to reject on: not a no
    return int(ok), score


def accepted(sim: np.ndarray, dec: np.ndarray, low: float, sure: float, threshold: float) -> np.ndarray:
    """Which pairs are edges: at/above `sure`; in [low, sure) when the pixels accepted them, or,
    without pixel evidence, when the descriptor reaches `threshold`."""
    return (sim >= sure) | ((sim >= low) & ((dec == 1) | ((dec == NO_EVIDENCE) & (sim >= threshold))))


class _Forest:
    """Union-find over a pair file's rows (Python ints: one find per checked pair)."""

    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, x: int) -> int:
        p = self.parent
        while p[x] != x:
            p[x] = p[p[x]]
            x = p[x]
        return x

    def union(self, a: int, b: int) -> None:
        self.parent[self.find(a)] = self.find(b)


def _preference(job: dict, nodes: np.ndarray) -> np.ndarray:
    """Per node (sorted gids), its place in the group stage's representative order as far as the
    ingest numbers and the features tell it: most pixels (picture_pixels: the padding of a frame
    discounted), then most bytes, then input order (quality), or input order (first). Read from
    the ingest files of the nodes' shards and their feature files."""
    if job.get("representative", "quality") != "quality" or not job.get("ingest"):
        return np.arange(len(nodes))
    pixels = np.zeros(len(nodes), np.int64)
    nbytes = np.zeros(len(nodes), np.int64)
    for shard in unique(nodes >> 32).tolist():
        path = job["ingest"].get(str(shard), job["ingest"].get(shard))
        if path is None:
            continue
        t = pq.read_table(path, columns=["gid", "width", "height", "nbytes"])
        g = t["gid"].to_numpy()
        keep = np.isin(g, nodes)
        at = np.searchsorted(nodes, g[keep])
        w, h, b = (t[c].fill_null(0).to_numpy().astype(np.int64)[keep] for c in ("width", "height", "nbytes"))
        pixels[at], nbytes[at] = w * h, b
    if job.get("features"):
        pixels = picture_pixels(pixels, picture_shares(job["features"], nodes))
    # the group stage's rule without its key tie-break (empty key prefixes: ties go by gid)
    return quality_rank(nodes, pixels, nbytes, np.zeros(len(nodes), f"S{PREFIX}"), None)


def in_order(items: list, check, threads: int = 1, settled=None):
    """(item, check(item)) in the order of `items`, or (item, None) where `settled(item)` is true
    when its turn comes (the caller's state then: what it did with every item before). With
    threads > 1 the checks run ahead on a thread pool (OpenCV and numpy release the GIL): an item
    not settled when it is scanned is checked speculatively, and its result dropped if it is
    settled by its turn. What comes out is what checking one by one gives; only the work differs.
    `check` is called in the worker threads: it must not change the caller's state."""
    if threads <= 1:
        for x in items:
            yield x, (None if settled is not None and settled(x) else check(x))
        return
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor
    ahead = deque()                       # (item, future or None: settled when scanned)
    it = iter(items)
    with ThreadPoolExecutor(threads) as pool:
        while True:
            while sum(f is not None for _, f in ahead) < 2 * threads:   # keep every thread busy
                x = next(it, it)
                if x is it:
                    break
                known = settled is not None and settled(x)      # settled now: settled at its turn too
                ahead.append((x, None if known else pool.submit(check, x)))
            if not ahead:
                return
            x, fut = ahead.popleft()
            if fut is None or (settled is not None and settled(x)):
                if fut is not None:
                    fut.cancel()
                yield x, None
            else:
                yield x, fut.result()


def decide_file(job: dict) -> dict:
    """Decisions for one pair file, aligned with its rows. With `skip_connected`, pairs are checked
    in groups by their better row, the rows the group stage would keep first (most pixels, then
    bytes: _preference), each group's pairs most similar first; a pair whose rows the accepted edges
    before it already connect is not checked (IMPLIED): its edge could not change any component,
    and the group stage checks every member against its representative anyway. The accepted edges
    then form stars around the rows that will be kept, so the member check finds most members
    joined to their representative directly: a group of n copies costs about n checks, not n^2 / 2
    (nor 2n, as trees grown most similar first did)."""
    from ..lib import pixels
    t0 = time.time()
    store = FeatureStore({int(k): Path(v) for k, v in job["features"].items()}, spill_dir=Path(job["out"]).parent)
    t = pq.read_table(job["pairs"], columns=["gid_a", "gid_b", "similarity"])
    a, b, sim = (t.column(i).to_numpy() for i in range(3))
    dec = np.full(len(sim), -1, np.int8)
    score = np.full(len(sim), np.nan, np.float32)
    nodes, local = unique(np.r_[a, b], return_inverse=True)
    la, lb = local[:len(sim)].tolist(), local[len(sim):].tolist()
    forest = _Forest(len(nodes))
    for r in np.flatnonzero(sim >= job["sure"]):            # edges on the descriptor alone
        forest.union(la[r], lb[r])
    band = np.flatnonzero((sim >= job["low"]) & (sim < job["sure"]))
    if job["skip_connected"]:
        pref = _preference(job, nodes)
        better = np.minimum(pref[local[:len(sim)]], pref[local[len(sim):]])
        order = band[np.lexsort((-sim[band], better[band]))]
    else:
        order = band[np.argsort(-sim[band], kind="stable")]
    checked = accepted_n = implied = 0
    check = lambda r: _decide(pixels, store.get(a[r]), store.get(b[r]))   # noqa: E731
    for r, result in in_order(order.tolist(), check, int(job.get("threads", 1)),
                              (lambda r: forest.find(la[r]) == forest.find(lb[r])) if job["skip_connected"] else None):
        if result is None:
            dec[r] = IMPLIED
            implied += 1
            continue
        dec[r], score[r] = result
        checked += 1
        accepted_n += int(dec[r] == 1)
        if accepted(sim[r:r + 1], dec[r:r + 1], job["low"], job["sure"], job["threshold"])[0]:
            forest.union(la[r], lb[r])      # an edge of the group stage: the same rule
    path = write_parquet(Path(job["out"]), pa.table({"pixels": dec, "pixel_score": score}))
    Marker(path.parent.parent, f"decide-{path.stem}").write(job["fp"], [path], checked=checked,
                                                            accepted=accepted_n, implied=implied)
    return {"checked": checked, "accepted": accepted_n, "implied": implied, "seconds": time.time() - t0,
            **store.keypoint_work()}


def decide_members(job: dict) -> dict:
    """Decisions for (member, representative) pairs the group stage asks about. A member the pixels
    reject against its representative is a copy all the same when it is a clear copy (pixel score
    >= ANCHOR_ACCEPT) of an anchor (`alt`: members with an accepted edge to the representative)
    that is a full copy of the representative: each holds >= FULL_SHARE of the other's content
    (the unedited photo of a representative that is the photo on a canvas). Through a full copy a
    member still holds about half of the representative or more, so two members still share some
    of it. A member that is a part of its representative (rejected by the share rule alone) is
    never rescued. A member without pixel evidence against its representative (too few
    keypoints to reject on) is tried through the anchors too."""
    from ..lib import pixels
    store = FeatureStore({int(k): Path(v) for k, v in job["features"].items()})
    full: dict[tuple[int, int], bool] = {}

    def is_full(x: int, r: int) -> bool:
        if (x, r) not in full:
            fx, fr = store.get(x), store.get(r)
            full[(x, r)] = bool(fx is not None and fr is not None
                                and pixels.explain(fx, fr, {"min_share": FULL_SHARE}, stop=True)["copy"])
        return full[(x, r)]

    def is_part(a: int, r: int) -> bool:
        # rejected by the share rule alone: the pixels agree where the two overlap, but the member
        # holds less than pixels.MIN_SHARE of the representative (a quarter of a photo against the
        # half it lies in). No anchor makes a part a copy: through an edited anchor whose smooth
        # areas lost their detail (gamma, a brighter sky) the same part can pass the rule
        fa, fr = store.get(a), store.get(r)
        return fa is not None and fr is not None and bool(pixels.explain(fa, fr, {"min_share": 0.0}, stop=True)["copy"])

    out, via = [], 0
    for a, b, alt in zip(job["a"], job["b"], job.get("alt") or [()] * len(job["a"])):
        d = _decide(pixels, store.get(a), store.get(b), missing=NO_EVIDENCE)[0]
        if d in (0, NO_EVIDENCE) and not is_part(a, b):
            for x in (x for x in alt if x != a):
                d2, score = _decide(pixels, store.get(a), store.get(x))
                if d2 == 1 and score >= ANCHOR_ACCEPT and is_full(x, b):
                    d, via = 1, via + 1
                    break
        out.append(d)
    return {"pixels": out, "via_full_copy": via}


def check_members(run: Run, ex, members: np.ndarray, reps: np.ndarray, sims: np.ndarray,
                  anchors: list | None = None, per_task: int = 2048) -> tuple[np.ndarray, int]:
    """Is each member a copy of its representative? The pixels decide (directly, or through one of
    the member's `anchors` that is a full copy of the representative: decide_members); where an
    image has no pixel evidence (or no features: a row no candidate pair needed), the descriptor
    at search.threshold. Tasks of `per_task` pairs, grouped by the representative's shard.
    Returns the answers and how many members passed through an anchor."""
    files = {s.index: str(feature_file(run, s.name)) for s in run.shards}
    order = np.lexsort((members >> 32, reps >> 32))
    anchors = anchors if anchors is not None else [[] for _ in range(len(members))]
    jobs = [{"a": members[order[i:i + per_task]].tolist(), "b": reps[order[i:i + per_task]].tolist(),
             "alt": [list(anchors[j]) for j in order[i:i + per_task]], "features": files}
            for i in range(0, len(order), per_task)]
    dec = np.empty(len(members), np.int8)
    done = ex.map(decide_members, jobs, desc="group: members vs representatives", num_cpus=1)
    dec[order] = np.concatenate([np.array(r["pixels"], np.int8) for r in done]) if done else []
    ok = accepted(sims, dec, -np.inf, run.cfg.verify.sure, run.cfg.search.threshold)
    return ok, sum(r.get("via_full_copy", 0) for r in done)


def decide_cross(job: dict) -> dict:
    """Decisions for one cross pair file (this run's rows vs another run's registered rows), the
    other side's images read back from its run's input."""
    from ..lib import pixels
    from ..lib.registry import Target
    from ..lookup import row_images
    t0 = time.time()
    t = pq.read_table(job["pairs"])
    sim = t["similarity"].to_numpy()
    sel = np.flatnonzero((sim >= job["low"]) & (sim < job["sure"]))
    mine, other = t["gid"].to_numpy()[sel], t["other_gid"].to_numpy()[sel]
    store = FeatureStore({int(k): Path(v) for k, v in job["features"].items()}, spill_dir=Path(job["out"]).parent)
    theirs = {}
    for gid, data in row_images(Target(job["target"], job["model"], job["run_dir"]).runs, unique(other)).items():
        try:
            theirs[gid] = pixels.features(data)
        except ValueError:
            pass
    dec = np.full(len(sim), -1, np.int8)
    score = np.full(len(sim), np.nan, np.float32)
    check = lambda k: _decide(pixels, store.get(mine[k]), theirs.get(int(other[k])))   # noqa: E731
    for k, result in in_order(list(range(len(sel))), check, int(job.get("threads", 1))):
        dec[sel[k]], score[sel[k]] = result
    path = write_parquet(Path(job["out"]), pa.table({"pixels": dec, "pixel_score": score}))
    Marker(Path(job["root"]), job["unit"]).write(job["fp"], [path], checked=len(sel), accepted=int((dec == 1).sum()))
    work = store.keypoint_work(theirs.values())
    return {"checked": len(sel), "accepted": int((dec == 1).sum()), "seconds": time.time() - t0, **work}


def units(run: Run) -> list[Marker]:
    if not active(run):
        return [run.marker(NAME, "off")]
    out = [run.marker(NAME, f"features-{s.name}") for s in run.shards]
    out += [run.marker(NAME, f"decide-{p.stem}") for p in run.pair_files()]
    return out + [run.marker(NAME, f"cross-{k}-{p.stem}") for k, _, p in cross_files(run)]


def run(run: Run, ex, stats: dict) -> dict:
    fp = run.fingerprint(NAME)
    if not active(run):
        why = "verify.method off" if run.cfg.verify.method == "off" else "input has no images"
        if run.pending(NAME, ["off"]):
            run.marker(NAME, "off").write(fp, [], reason=why)
        return {"pixel_check": False, "reason": why}
    t0 = time.time()
    low, sure = band(run)
    need = needed_gids(run)
    jobs = []
    for s in run.shards:
        if not run.pending(NAME, [f"features-{s.name}"]):
            continue
        t = pq.read_table(run.ingest_file(s.name), columns=["gid", "member"])
        g = t["gid"].to_numpy()
        sel = np.isin(g, need)
        jobs.append({"index": s.index, "name": s.name, "parquet": str(s.parquet), "data": str(s.data),
                     "format": run.cfg.input.format, "gids": g[sel].tolist(),
                     "members": [m for m, k in zip(t["member"].to_pylist(), sel) if k],
                     "out": str(feature_file(run, s.name)), "fp": fp})
    # in this process (local executor) one shard's task at a time, its images decoded on every
    # core: shards hold unequal numbers of candidate rows, so a task per core left cores idle
    # (demo: 25 ms an image against 15); on Ray a task has its one core
    cores = (os.cpu_count() or 1) if getattr(ex, "kind", "") == "local" else 1
    for job in jobs:
        job["threads"] = cores
    feats = ex.map(features_shard, jobs, desc="verify: features", num_cpus=cores)
    t_feat = sum(r["seconds"] for r in feats)
    files = {s.index: str(feature_file(run, s.name)) for s in run.shards}
    # edges the group stage may drop after the pixels (a caption mismatch) could leave a pair
    # needed; search.pairs all asks for every pair, checked
    skip = (run.cfg.verify.skip_connected and run.cfg.group.duplicate_key == "image"
            and run.cfg.search.pairs == "forest")
    ingest = {str(s.index): str(run.ingest_file(s.name)) for s in run.shards} if skip else {}
    todo = [{"pairs": str(p), "out": str(decision_file(run, p)), "features": files, "low": low, "sure": sure,
             "threshold": run.cfg.search.threshold, "skip_connected": skip, "fp": fp, "ingest": ingest,
             "representative": run.cfg.group.representative}
            for p in run.pair_files() if run.pending(NAME, [f"decide-{p.stem}"])]
    todo_cross = [{"pairs": str(p), "out": str(cross_decision_file(run, kind, p)), "features": files, "low": low,
                   "sure": sure, "fp": fp, "target": str(folder), "model": run.cfg.embed.model,
                   "run_dir": str(run.root), "root": str(run.dir(NAME)), "unit": f"cross-{kind}-{p.stem}"}
                  for kind, folder, p in cross_files(run) if run.pending(NAME, [f"cross-{kind}-{p.stem}"])]
    # fewer pair files than cores (a small run; the local executor): each task checks its pairs
    # on several threads, ahead of its order (in_order); on Ray a task has its one core
    def shared(jobs: list) -> int:      # the cores each task gets: its threads
        per = max(1, cores // max(len(jobs), 1))
        for job in jobs:
            job["threads"] = per
        return per
    done = ex.map(decide_file, todo, desc="verify: pixels", num_cpus=shared(todo))
    done += ex.map(decide_cross, todo_cross, desc="verify: pixels against other indexes", num_cpus=shared(todo_cross))
    checked = sum(r["checked"] for r in done)
    t_dec = sum(r["seconds"] for r in done)
    return {"pixel_check": True, "band": [low, sure], "rows_with_features": sum(r["rows"] for r in feats),
            "feature_errors": sum(r["errors"] for r in feats), "pairs_checked": checked,
            "pairs_accepted": sum(r["accepted"] for r in done),
            "pairs_implied": sum(r.get("implied", 0) for r in done),
            "images_with_features": sum(r["images"] for r in feats),
            "ms_per_image_features": round(1000 * t_feat / max(1, sum(r["images"] for r in feats)), 2),
            # keypoints are made in the pixel tasks, only for images a pair needed them for
            "images_with_keypoints": sum(r.get("keypoints", 0) for r in done),
            "ms_per_image_keypoints": round(1000 * sum(r.get("keypoint_s", 0) for r in done)
                                            / max(1, sum(r.get("keypoints", 0) for r in done)), 2),
            "ms_per_pair": round(1000 * t_dec / max(checked, 1), 2),
            "worker_s_per_million_pairs": round(1e6 * t_dec / max(checked, 1), 1),
            "seconds": round(time.time() - t0, 3)}
