"""`dedup2b calibrate` on the demo corpus: the estimate against the demo's ground truth, the audit,
the outputs and the summary entry."""
import json
import shutil

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dedup2b.quality import audit, calibrate
from dedup2b.cli import main
from dedup2b.core.executor import LocalExecutor
from dedup2b.driver import run_stages
from dedup2b.stages import NAMES
from dedup2b.core.vectors import VectorStore

from conftest import make_config


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, demo_corpus):
    root, shards = demo_corpus
    cfg = make_config(tmp_path_factory.mktemp("calibrate"), shards, search={"pairs": "all"})   # audit: every pair
    run_stages(cfg, LocalExecutor(), stages=NAMES[:-1], log=lambda *_: None)
    return cfg, root


@pytest.fixture(scope="module")
def calibrated(demo_run):
    """The defaults of `dedup2b calibrate`, once for the module."""
    cfg, _ = demo_run
    lines = []
    result = calibrate.calibrate(cfg.run_path, log=lines.append)
    return result, lines


def true_pair_precision(cfg, truth_path, t: float) -> float:
    """Exhaustive: of all pairs of ok rows whose stored vectors have cosine >= t, the share the demo's
    ground truth puts in one cluster."""
    samples = pq.read_table(cfg.run_path / "report" / "samples.parquet").to_pandas()
    ok = samples[samples.status == "ok"]
    run = calibrate.open_run(cfg.run_path)
    vecs = VectorStore(run.dir("embed"), {s.index: s.name for s in run.shards}).get(ok.gid.to_numpy())
    cluster = pq.read_table(truth_path).to_pandas().set_index("key")["cluster"].reindex(ok.key).to_numpy()
    i, j = np.triu_indices(len(ok), 1)
    flagged = np.einsum("ij,ij->i", vecs[i], vecs[j]) >= t
    return float((cluster[i] == cluster[j])[flagged].mean())


def test_recommended_threshold_is_as_precise_as_printed(demo_run, calibrated):
    cfg, root = demo_run
    result, lines = calibrated
    rec = result["recommended_threshold"]
    assert rec is not None and 0.5 <= rec <= 0.95, result
    assert result["recommended_precision"] >= result["target_precision"] == 0.99
    printed = next(line for line in lines if line.startswith("recommended threshold"))
    assert f"{rec:.2f} (precision {result['recommended_precision']:.3f}" in printed
    truth = true_pair_precision(cfg, root / "ground_truth.parquet", rec)
    assert abs(truth - result["recommended_precision"]) <= 0.03, (rec, truth, result)
    # and at the run's own threshold
    truth_run = true_pair_precision(cfg, root / "ground_truth.parquet", cfg.search.threshold)
    assert abs(truth_run - result["estimated_precision"]) <= 0.03
    assert result["precision_ci95"][0] <= result["estimated_precision"] <= result["precision_ci95"][1]
    assert result["precision_ci95"][0] < 1.0         # no false pair seen is not certainty


def test_outputs_table_and_summary_entry(demo_run, calibrated):
    cfg, _ = demo_run
    result, lines = calibrated
    rep = cfg.run_path / "calibration"
    for name in ("calibration.parquet", "calibration.png", "calibration.json", "audit_pairs.parquet"):
        assert (rep / name).stat().st_size > 0, name
    table = pq.read_table(rep / "calibration.parquet").to_pandas()
    assert set(table.source) == {"synthetic", "audit"}
    syn = table[table.source == "synthetic"]
    assert syn.threshold.is_monotonic_increasing and np.isclose(syn.threshold, cfg.search.threshold).any()
    assert syn.recall.is_monotonic_decreasing and (syn.precision_lo <= syn.precision + 1e-9).all()
    assert syn.n.iloc[0] == 151 and syn.copies.iloc[0] == 151 * 3          # every ok row of the demo
    assert json.loads((rep / "calibration.json").read_text()) == result
    entry = result["summary"]
    assert entry["threshold"] == cfg.search.threshold
    assert entry["estimated_precision"] == result["estimated_precision"]
    assert entry["recommended_threshold"] == result["recommended_threshold"]
    assert any("<- recommended" in line for line in lines) and any("<- run" in line for line in lines)
    # calibrate writes its own folder alone: the report's summary and done marker are untouched, so a
    # report rerun has nothing to redo and the calibration stays
    run = calibrate.open_run(cfg.run_path)
    assert "calibration" not in json.loads((cfg.run_path / "report" / "summary.json").read_text())
    assert run.marker("report", "report").valid(run.fingerprint("report"))
    run_stages(cfg, LocalExecutor(), stages=("report",), log=lambda *_: None)
    assert json.loads((rep / "calibration.json").read_text())["summary"] == entry


def test_audit_rechecks_flagged_pairs_and_follows_labels(demo_run, tmp_path):
    cfg, root = demo_run
    rep = cfg.run_path / "report"
    shutil.copy(rep / "pairs.parquet", tmp_path / "pairs.parquet")
    samples = pq.read_table(rep / "samples.parquet").to_pandas()
    run = calibrate.open_run(cfg.run_path)
    store = VectorStore(run.dir("embed"), {s.index: s.name for s in run.shards})
    t = cfg.search.threshold
    rows, out = audit.run_audit(tmp_path / "pairs.parquet", tmp_path, samples, store, t, 200, seed=0)
    assert out["pairs"] == 200 and out["confirmed"] == 200 and out["agreement"] == 1.0
    assert 0.97 < out["ci95"][0] < 1.0
    sample = pq.read_table(tmp_path / "audit_pairs.parquet").to_pandas()
    assert len(sample) == 200 and np.allclose(sample.recheck, sample.similarity, atol=audit.AGREE)
    # a report that does not match the stored vectors (another run's, damaged) fails the check
    bad = pq.read_table(tmp_path / "pairs.parquet").to_pandas()
    bad["similarity"] = bad["similarity"] - 0.05
    bad.to_parquet(tmp_path / "bad.parquet")
    _, off = audit.run_audit(tmp_path / "bad.parquet", tmp_path / "x", samples, store, t, 200, seed=0)
    assert off["confirmed"] == 0

    # human labels: a quarter of the sampled pairs judged not duplicates
    labels = sample[["key_a", "key_b"]].assign(is_duplicate=np.arange(len(sample)) % 4 != 0)
    _, out = audit.run_audit(tmp_path / "pairs.parquet", tmp_path, samples, store, t, 200, seed=0, labels=labels)
    lab = out["labels"]
    assert lab["pairs"] == 200 and lab["duplicates"] == 150 and lab["precision"] == 0.75
    assert lab["ci95"][0] < 0.75 < lab["ci95"][1] < 0.85
    written = pq.read_table(tmp_path / "audit_pairs.parquet").to_pandas()
    assert written.is_duplicate.sum() == 150

    # a labelled duplicate the run did not flag lowers recall, not precision; an unlabelled row is ignored
    ok = samples[samples.status == "ok"]
    a, b = ok.groupby("group_id").head(1).key.iloc[:2]
    extra = pd.DataFrame({"key_a": [a, "x"], "key_b": [b, "y"], "is_duplicate": [True, None]})
    _, out = audit.run_audit(tmp_path / "pairs.parquet", tmp_path, samples, store, t, 200, seed=0, labels=pd.concat([labels, extra]))
    assert out["labels"]["precision"] == 0.75 and out["labels"]["recall"] == pytest.approx(150 / 151, abs=1e-4)

    # cluster labels (the demo's ground truth): every sampled pair is a true copy
    _, out = audit.run_audit(tmp_path / "pairs.parquet", tmp_path, samples, store, t, 200, seed=0,
                             labels=audit.read_labels(root / "ground_truth.parquet"))
    assert out["labels"]["precision"] == 1.0


def test_wilson_interval():
    lo, hi = audit.wilson(81, 100)
    assert lo == pytest.approx(0.7222, abs=1e-3) and hi == pytest.approx(0.8749, abs=1e-3)
    assert audit.wilson(0, 0) == (0.0, 1.0)
    lo, hi = audit.wilson(1000, 1000)
    assert 0.995 < lo < 1.0 and hi == 1.0


def test_cli_is_deterministic_and_reads_a_labels_file(demo_run, tmp_path, capsys):
    cfg, root = demo_run
    copy = tmp_path / "run"
    shutil.copytree(cfg.run_path, copy)
    labels = tmp_path / "labels.parquet"
    pq.write_table(pa.Table.from_pandas(pq.read_table(root / "ground_truth.parquet").to_pandas()), labels)
    args = ["calibrate", "--run-dir", str(copy), "--samples", "16", "--copies", "1", "--audit-pairs", "40"]
    assert main(args + ["--labels", str(labels)]) == 0
    out = capsys.readouterr().out
    assert "threshold  precision" in out and "labels: 40 flagged pairs labelled, 40 of them duplicates" in out
    first = pq.read_table(copy / "calibration" / "calibration.parquet").to_pandas()
    assert main(args + ["--labels", str(labels)]) == 0
    assert first.equals(pq.read_table(copy / "calibration" / "calibration.parquet").to_pandas())
    assert main(["calibrate", "--run-dir", str(tmp_path / "nothing")]) == 2
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"a": [1]}), bad)
    assert main(args + ["--labels", str(bad)]) == 2


def test_group_check_sees_merges_inside_groups(demo_run, calibrated, tmp_path, demo_corpus):
    """The pixel check of removed rows against their kept row: the demo's groups (all copies)
    pass; a run that merges distinct photos (no pixel check, a threshold far too low) is caught,
    which the synthetic estimate (negatives outside the groups) cannot see."""
    result, lines = calibrated
    g = result["groups"]
    assert g["removed_rows_checked"] >= 50 and g["precision"] >= 0.97
    assert any(line.startswith("groups: ") for line in lines)
    _, shards = demo_corpus
    cfg = make_config(tmp_path, shards, search={"threshold": 0.3}, verify={"method": "off"})
    run_stages(cfg, LocalExecutor(), stages=NAMES[:-1], log=lambda *_: None)
    bad = calibrate.calibrate(cfg.run_path, samples=60, copies=1, log=lambda *_: None)["groups"]
    assert bad["removed_rows_checked"] >= 40 and bad["precision"] < 0.8
