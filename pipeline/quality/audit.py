"""The pair audit: sample flagged pairs, re-check them; with labels, precision with a Wilson 95 % interval.

vectors  up to `pairs` near-duplicate pairs from report/pairs.parquet, drawn uniformly (seeded);
         each pair's cosine is recomputed from the stored vectors; confirmed = it agrees with the
         similarity the report gives (within AGREE). This is a consistency check of the reports
         against the stored vectors (stale or damaged vectors, a report of another run), NOT a
         precision estimate: the vectors that flagged a pair cannot say it is wrong. Precision
         comes from labels, or from calibrate's synthetic copies and look-alikes.
labels   with a labels file: a parquet of human labels, either key pairs
         (key_a, key_b, is_duplicate) or clusters (key, cluster: rows of one cluster are copies).
         Pair labels: precision over the labelled pairs the run flags (same group), recall over the
         labelled duplicates. Cluster labels: precision over the audit sample.
The sample is written to calibration/audit_pairs.parquet (key_a, key_b, similarity, recheck,
is_duplicate): fill is_duplicate by hand and pass the file back as --labels.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ..core.io import write_parquet

# fp16 vectors stored, fp32 products: a pair verified at the threshold may recompute a hair below it
TOLERANCE = 1e-3
AGREE = 2e-3   # |recomputed - reported| for the vectors check (fp16 storage, fp32 products)


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion k / n (95 % for z = 1.96); (0, 1) when n = 0."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _r(x) -> float | None:
    return None if x != x else round(float(x), 4)      # NaN (nothing to measure) -> null in JSON


def _row(method: str, threshold: float, k: int, n: int, recall: float = float("nan")) -> dict:
    lo, hi = wilson(k, n)
    return {"source": "audit", "method": method, "threshold": threshold, "precision": k / n if n else float("nan"),
            "precision_lo": lo, "precision_hi": hi, "recall": recall, "n": n, "confirmed": k}


def read_labels(path) -> pd.DataFrame:
    cols = set(pq.read_schema(path).names)
    if {"key_a", "key_b", "is_duplicate"} <= cols:
        return pq.read_table(path, columns=["key_a", "key_b", "is_duplicate"]).to_pandas()
    if {"key", "cluster"} <= cols:
        return pq.read_table(path, columns=["key", "cluster"]).to_pandas()
    raise ValueError(f"{path}: labels need columns key_a, key_b, is_duplicate (pair labels) "
                     f"or key, cluster (cluster labels); found {sorted(cols)}")


def run_audit(pairs_file: Path, out_dir: Path, samples: pd.DataFrame, store, threshold: float, pairs: int, seed: int,
              labels=None) -> tuple[list[dict], dict]:
    """Audit rows for calibration.parquet and a summary dict, from the report's pairs.parquet;
    writes out_dir/audit_pairs.parquet."""
    flagged = pq.read_table(pairs_file).to_pandas()
    gid = samples[samples["status"] == "ok"].set_index("key")["gid"]
    # near pairs between this run's rows (an incremental run also reports pairs with earlier runs' rows)
    flagged = flagged[(flagged["kind"] != "bytes") & flagged["key_a"].isin(gid.index)
                      & flagged["key_b"].isin(gid.index)].reset_index(drop=True)
    pick = np.sort(np.random.default_rng(seed).choice(len(flagged), size=min(pairs, len(flagged)), replace=False))
    sample = flagged.iloc[pick][["key_a", "key_b", "similarity"]].reset_index(drop=True)
    if len(sample):
        a, b = store.get(sample["key_a"].map(gid).to_numpy()), store.get(sample["key_b"].map(gid).to_numpy())
        sample["recheck"] = np.einsum("ij,ij->i", a, b)
    else:
        sample["recheck"] = np.zeros(0, np.float32)
    k = int((np.abs(sample["recheck"] - sample["similarity"]) <= AGREE).sum())
    rows = [_row("vectors", threshold, k, len(sample))]
    out = {"pairs": len(sample), "confirmed": k, "agreement": _r(rows[0]["precision"]),
           "ci95": [_r(rows[0]["precision_lo"]), _r(rows[0]["precision_hi"])]}
    sample["is_duplicate"] = pd.Series([None] * len(sample), dtype="boolean")
    if labels is not None:
        rows.append(_labelled(labels, sample, samples, threshold))
        r = rows[-1]
        out["labels"] = {"pairs": r["n"], "duplicates": r["confirmed"], "precision": _r(r["precision"]),
                         "ci95": [_r(r["precision_lo"]), _r(r["precision_hi"])], "recall": _r(r["recall"])}
    write_parquet(Path(out_dir) / "audit_pairs.parquet", pa.Table.from_pandas(sample, preserve_index=False))
    return rows, out


def _labelled(labels: pd.DataFrame, sample: pd.DataFrame, samples: pd.DataFrame, threshold: float) -> dict:
    if "cluster" in labels:
        cluster = labels.set_index("key")["cluster"]
        ca, cb = sample["key_a"].map(cluster), sample["key_b"].map(cluster)
        sample["is_duplicate"] = (ca.notna() & (ca == cb)).astype("boolean")
        return _row("labels", threshold, int(sample["is_duplicate"].sum()), len(sample))
    labels = labels.dropna(subset=["is_duplicate"])          # unlabelled rows of a half-filled sheet
    group = samples[samples["status"] == "ok"].set_index("key")["group_id"]
    ga, gb = labels["key_a"].map(group), labels["key_b"].map(group)
    is_dup = labels["is_duplicate"].astype(bool)
    flagged = (ga.notna() & (ga == gb)).to_numpy()
    by_pair = {frozenset(p): bool(d) for p, d in zip(zip(labels["key_a"], labels["key_b"]), labels["is_duplicate"])}
    sample["is_duplicate"] = pd.Series([by_pair.get(frozenset(p)) for p in zip(sample["key_a"], sample["key_b"])],
                                       dtype="boolean")
    recall = float(flagged[is_dup.to_numpy()].mean()) if is_dup.any() else float("nan")
    return _row("labels", threshold, int((flagged & is_dup.to_numpy()).sum()), int(flagged.sum()), recall)
