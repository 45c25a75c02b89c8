"""calibrate: threshold -> precision / recall for a finished run, and a recommended threshold.

Two estimates, written to RUN/calibration/ (this command's own folder: it never edits the
report's files; summary.json stays the report stage's):
  synthetic  web-crawl-style copies of sampled rows, embedded with the run's model (synthcopies.py):
             a table over a threshold grid (step 0.01, from the run's threshold - 0.30 up) of pair
             precision with a bootstrap 95 % interval, copy recall and estimated pair counts
  groups     sampled removed rows checked by pixels against the row their group keeps: merges
             inside groups, which the synthetic estimate cannot see (its negatives are rows
             outside the row's group)
  audit      sampled flagged pairs recomputed from the stored vectors (a consistency check of the
             reports, not a precision) and, with a labels file, checked against human labels:
             precision with a Wilson 95 % interval (audit.py)
  calibration.parquet  both: source (synthetic|audit), method, threshold, precision, precision_lo/hi,
                       recall, n, counts
  calibration.png      precision (with its interval) and recall against the threshold, the run's and
                       the recommended thresholds marked, the audit at the run's threshold
  calibration.json     the recommended threshold for the target precision, the estimate at the run's
                       threshold, the audit, and under "summary" their digest at the run's threshold
  audit_pairs.parquet  the sampled flagged pairs, re-checked (fill in is_duplicate to label them)
The recommended threshold is the smallest on the grid from which up every estimate reaches the target.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ..core.io import write_json, write_parquet
from ..core.run import Run
from ..core.vectors import VectorStore
from ..driver import open_existing
from . import audit, synthcopies

# A removal cannot be undone, and union-find turns a 1 % pair error into merged groups of distinct
# images; 0.99 is the lowest pair precision we recommend deleting at (the paper audited 0.81).
DEFAULT_TARGET = 0.99
GRID_SPAN, GRID_STEP = 0.30, 0.01
COLUMNS = ["key", "gid", "sha256", "status", "group_id", "group_size", "shard"]


def _r(x) -> float:
    return round(float(x), 4)


def open_run(run_dir) -> Run:
    return open_existing(run_dir)


def threshold_grid(threshold: float) -> np.ndarray:
    lo = max(-1.0, round(threshold - GRID_SPAN, 2))
    return np.unique(np.r_[np.round(np.arange(lo, 1.0 - 1e-9, GRID_STEP), 4), round(threshold, 6)])


def recommend(table: pd.DataFrame, target: float):
    """The row of the smallest threshold from which up every precision estimate is >= target."""
    p = table["precision"].to_numpy()
    ok = np.minimum.accumulate(p[::-1])[::-1] >= target
    return table.iloc[int(np.argmax(ok))] if ok.any() else None


def synthetic(run: Run, samples: pd.DataFrame, store: VectorStore, n: int, copies: int, seed: int,
              log=print) -> pd.DataFrame:
    grid = threshold_grid(run.cfg.search.threshold)
    rows = synthcopies.sample_rows(run, samples, n, seed)
    src = store.get(rows["gid"].to_numpy())
    scores = synthcopies.copy_scores(run, rows, src, copies, seed, log)
    ok = samples[samples["status"] == "ok"]
    fp = synthcopies.negative_counts(store, ok.set_index("gid")["group_id"].astype(np.int64), rows, src, grid)
    return synthcopies.estimate(rows, scores, fp, grid, len(ok), seed=seed)


def group_check(run: Run, samples: pd.DataFrame, n: int, seed: int) -> dict:
    """What the synthetic estimate cannot see, merges inside groups: `n` removed duplicates (seeded)
    each checked by pixels against the row their group keeps (lib/pixels.py on the input images).
    The share confirmed is the precision of the removals, with a Wilson 95 % interval."""
    from ..lib import pixels
    ok = samples[samples["status"] == "ok"]
    dup = ok[(ok["group_size"] > 1) & (ok["group_id"] != ok["gid"])]
    pick = dup.sample(min(n, len(dup)), random_state=seed) if len(dup) else dup
    images = run.images(np.r_[pick["gid"].to_numpy(np.int64), pick["group_id"].to_numpy(np.int64)])
    feats: dict[int, object] = {}
    for gid, data in images.items():
        try:
            feats[int(gid)] = pixels.features(data)
        except ValueError:
            pass
    from ..stages.verify import MIN_KEYPOINTS
    both = [(int(a), int(b)) for a, b in zip(pick["gid"], pick["group_id"]) if int(a) in feats and int(b) in feats]
    # images without local structure cannot be checked by pixels: counted apart, not as errors
    checked = [(a, b) for a, b in both if min(len(feats[a].xy), len(feats[b].xy)) >= MIN_KEYPOINTS]
    k = sum(pixels.verify(feats[a], feats[b])[0] for a, b in checked)
    lo, hi = audit.wilson(k, len(checked))
    return {"removed_rows_checked": len(checked), "copies_of_kept_row": int(k),
            "without_pixel_evidence": len(both) - len(checked),
            "precision": _r(k / len(checked)) if checked else None, "ci95": [_r(lo), _r(hi)]}


def calibrate(run_dir, target: float = DEFAULT_TARGET, samples: int = 200, copies: int = 3,
              audit_pairs: int = 1000, labels=None, seed: int = 0, log=print) -> dict:
    """Both estimates for a finished run; writes the reports, prints the table, returns calibration.json."""
    run = open_run(run_dir)
    labels = audit.read_labels(labels) if labels else None      # a bad file fails before any work
    cfg, reports, out = run.cfg, run.report_dir(), run.calibration_dir()
    for name in ("samples.parquet", "pairs.parquet"):
        if not (reports / name).exists():
            raise FileNotFoundError(f"{reports / name}: missing; run the pipeline up to the report stage first")
    t_run = float(cfg.search.threshold)
    table = pq.read_table(reports / "samples.parquet", columns=COLUMNS).to_pandas()
    store = run.vectors()
    result: dict = {"model": cfg.embed.model, "threshold": t_run, "target_precision": target, "seed": seed}
    parts = []
    if run.source.HAS_IMAGES and samples > 0 and copies > 0:
        syn = synthetic(run, table, store, samples, copies, seed, log)
        parts.append(syn)
        at = syn.iloc[int((syn["threshold"] - t_run).abs().argmin())]
        rec = recommend(syn, target)
        result.update(samples=int(at["n"]), copies_per_sample=copies, estimated_precision=_r(at["precision"]),
                      precision_ci95=[_r(at["precision_lo"]), _r(at["precision_hi"])], recall=_r(at["recall"]),
                      recommended_threshold=None if rec is None else _r(rec["threshold"]),
                      recommended_precision=None if rec is None else _r(rec["precision"]),
                      recommended_recall=None if rec is None else _r(rec["recall"]))
        result["groups"] = group_check(run, table, samples, seed)
    else:
        log("calibrate: no synthetic estimate (it needs the input images); audit only")
    rows, result["audit"] = audit.run_audit(reports / "pairs.parquet", out, table, store, t_run, audit_pairs, seed,
                                            labels)
    result["summary"] = summary_entry(result, t_run)
    full = pd.concat(parts + [pd.DataFrame(rows)], ignore_index=True)
    write_parquet(out / "calibration.parquet", pa.Table.from_pandas(full, preserve_index=False))
    _plot(full, result, out / "calibration.png")
    write_json(out / "calibration.json", result)
    for line in format_table(full, result):
        log(line)
    return result


def summary_entry(c: dict, threshold: float) -> dict:
    """The digest of a calibration at the run's threshold: estimated and audited precision."""
    keys = ("estimated_precision", "precision_ci95", "recall", "recommended_threshold", "target_precision")
    out = {"threshold": threshold, **{k: c.get(k) for k in keys}}
    # the vectors audit is a consistency check of the reports, not a precision (see audit.py)
    if c.get("groups"):
        out.update(group_precision=c["groups"]["precision"], group_precision_ci95=c["groups"]["ci95"])
    out.update(audit_agreement=c["audit"]["agreement"], audit_pairs=c["audit"]["pairs"])
    if "labels" in c["audit"]:
        out.update(labels_precision=c["audit"]["labels"]["precision"], labels_ci95=c["audit"]["labels"]["ci95"])
    return out


def format_table(full: pd.DataFrame, result: dict) -> list[str]:
    t_run, rec = result["threshold"], result.get("recommended_threshold")
    syn = full[full["source"] == "synthetic"]
    lines = []
    if len(syn):
        lines += [f"synthetic: {result['samples']} rows x {result['copies_per_sample']} web-crawl copies, "
                  f"model {result['model']} (95 % interval: bootstrap over rows)",
                  "  threshold  precision  95% interval    recall  est. dup pairs  est. false pairs"]
        show = syn[(np.round(syn["threshold"] * 100) % 5 == 0) | np.isclose(syn["threshold"], t_run)
                   | (np.isclose(syn["threshold"], rec) if rec is not None else False)]
        for _, r in show.iterrows():
            tag = ("  <- run" if np.isclose(r["threshold"], t_run) else "") + \
                  ("  <- recommended" if rec is not None and np.isclose(r["threshold"], rec) else "")
            lines.append(f"  {r['threshold']:9.2f}  {r['precision']:9.3f}  [{r['precision_lo']:.3f}, "
                         f"{r['precision_hi']:.3f}]  {r['recall']:6.3f}  {r['est_true_pairs']:14,.0f}  "
                         f"{r['est_false_pairs']:16,.1f}{tag}")
        lines.append(f"recommended threshold for precision >= {result['target_precision']}: " + (
            "none on the grid" if rec is None else f"{rec:.2f} (precision {result['recommended_precision']:.3f}, "
            f"recall {result['recommended_recall']:.3f})") + f"; run threshold {t_run}: precision "
            f"{result['estimated_precision']:.3f}, recall {result['recall']:.3f}")
    g = result.get("groups")
    if g and g["removed_rows_checked"]:
        lines.append(f"groups: {g['removed_rows_checked']} removed rows checked by pixels against the row their "
                     f"group keeps: {g['copies_of_kept_row']} are copies, precision {g['precision']:.3f} "
                     f"[{g['ci95'][0]:.3f}, {g['ci95'][1]:.3f}] (merges inside groups, which the synthetic "
                     "estimate above cannot see)")
    a = result["audit"]
    lines.append(f"audit: {a['pairs']} flagged pairs recomputed from the stored vectors: {a['confirmed']} agree with "
                 "the report (a consistency check of the reports, not a precision estimate; label the sample in "
                 "audit_pairs.parquet and pass --labels for one)")
    if "labels" in a:
        lb = a["labels"]
        lines.append(f"labels: {lb['pairs']} flagged pairs labelled, {lb['duplicates']} of them duplicates" + _prec(lb)
                     + (f", recall {lb['recall']:.3f}" if lb["recall"] is not None else ""))
    return lines


def _prec(d: dict) -> str:
    if d["precision"] is None:
        return ", nothing to measure"
    return f", precision {d['precision']:.3f} [{d['ci95'][0]:.3f}, {d['ci95'][1]:.3f}]"


def _plot(full: pd.DataFrame, result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    syn = full[full["source"] == "synthetic"]
    if len(syn):
        ax.fill_between(syn["threshold"], syn["precision_lo"], syn["precision_hi"], color="#4477aa", alpha=.2)
        ax.plot(syn["threshold"], syn["precision"], "-", color="#4477aa", label="precision (synthetic)")
        ax.plot(syn["threshold"], syn["recall"], "-", color="#228833", label="recall of web-crawl copies")
        ax.axhline(result["target_precision"], color="#999999", ls=":", label=f"target {result['target_precision']}")
    if result.get("recommended_threshold") is not None:
        ax.axvline(result["recommended_threshold"], color="#228833", ls="--",
                   label=f"recommended {result['recommended_threshold']:.2f}")
    ax.axvline(result["threshold"], color="#cc3311", ls="--", label=f"run threshold {result['threshold']}")
    for _, r in full[full["source"] == "audit"].iterrows():
        if r["n"] > 0:
            err = [[max(0.0, r["precision"] - r["precision_lo"])], [max(0.0, r["precision_hi"] - r["precision"])]]
            ax.errorbar([r["threshold"]], [r["precision"]], yerr=err, fmt="o" if r["method"] == "vectors" else "s",
                        color="#cc3311" if r["method"] == "vectors" else "#aa3377", label=f"audit ({r['method']})")
    ax.set_xlabel("cosine threshold")
    ax.set_ylabel("pair precision / recall")
    ax.set_title(f"calibration: {result['model']}")
    ax.grid(True, alpha=.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    tmp = path.with_name(".calibration.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
