"""Decontamination: training rows that are near duplicates of evaluation rows are removed."""
import json
import shutil

import pyarrow.parquet as pq
import pytest

from dedup2b import demo
from dedup2b.cli import main


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    """The demo corpus split into a training part (3 shards) and an evaluation set (1 shard);
    the ground truth says which evaluation photos were planted in the training part."""
    root = tmp_path_factory.mktemp("decon")
    shards = demo.build(root / "corpus", rows_per_shard=40)
    for part, names in (("train", ["00000", "00001", "00002"]), ("eval", ["00003"])):
        (root / part).mkdir()
        for n in names:
            for ext in (".tar", ".parquet"):
                shutil.copy(shards / f"{n}{ext}", root / part / f"{n}{ext}")
    truth = pq.read_table(root / "corpus" / "ground_truth.parquet").to_pandas().set_index("key")["cluster"]
    args = ["decontaminate", "--train", str(root / "train"), "--eval", str(root / "eval"), "--executor", "local",
            "--run-dir", str(root / "run"), "--index-dir", str(root / "idx"), "--eval-index-root", str(root / "evalidx")]
    assert main(args) == 0
    return root, truth, args


def _own_checked(run):
    """The run's own pairs the pixels decided (not: -1 outside the band, IMPLIED already connected)."""
    from dedup2b.stages.verify import IMPLIED
    dec = [pq.read_table(p)["pixels"].to_numpy() for p in (run / "verify" / "decisions").glob("*")]
    return sum(int(((d >= 0) & (d != IMPLIED)).sum()) for d in dec)


def test_every_planted_leak_is_removed_and_reported(split):
    root, truth, _ = split
    samples = pq.read_table(root / "run" / "report" / "samples.parquet").to_pandas()
    ok = samples[samples.status == "ok"]
    eval_keys = set(pq.read_table(root / "eval" / "00003.parquet")["key"].to_pylist())
    eval_clusters = set(truth[list(eval_keys)].dropna())
    planted = set(ok.key[ok.key.map(truth).isin(eval_clusters)])
    assert planted and ok.removed_reason.eq("eval_leak").sum() == len(planted)
    assert set(ok.key[ok.removed_reason == "eval_leak"]) == planted
    leaks = pq.read_table(root / "run" / "report" / "leaks.parquet").to_pandas()
    assert set(leaks.eval_key) <= eval_keys and set(leaks.key) <= planted
    assert (leaks.similarity >= json.loads((root / "run" / "report" / "summary.json").read_text())["threshold"]).all()
    assert all(truth[a] == truth[b] for a, b in zip(leaks.key, leaks.eval_key))   # each leak is a true copy
    # the export holds none of them; the invariant still holds
    keep = set(pq.read_table(root / "run" / "export" / "keep.parquet")["key"].to_pylist())
    assert not keep & planted and keep == set(ok.key[ok.removed_reason.isna()])
    summary = json.loads((root / "run" / "report" / "summary.json").read_text())
    assert summary["invariant_holds"] and summary["removed_by_reason"]["eval_leak"] == len(planted)
    assert summary["eval_leaks"]["eval-eval"]["eval_items_leaked"] == leaks.eval_key.nunique()
    # the leak pairs below verify.sure were decided by the pixel check, against the eval rows' images
    decisions = list((root / "run" / "verify" / "cross" / "leaks").glob("*.parquet"))
    checked = sum(int((pq.read_table(p)["pixels"].to_numpy() >= 0).sum()) for p in decisions)
    assert decisions and 0 < checked == summary["pixel_check"]["pairs_checked"] - _own_checked(root / "run")
    page = (root / "run" / "report" / "index.html").read_text()
    assert 'id="leaks"' in page and "Evaluation-set leaks" in page


def test_the_evaluation_index_is_built_once_and_reused(split):
    root, _, args = split
    folder = root / "evalidx" / "eval-eval"
    before = {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}
    assert main(args) == 0
    after = {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}
    changed = {p.name for p, t in after.items() if before.get(p) != t}
    assert changed <= {"stage_stats.json", "manifest.json"}, changed
    stats = json.loads((folder / "run" / "stage_stats.json").read_text())
    assert stats["embed"]["shards"] == 0 and stats["index"].get("skipped")


def test_two_evaluation_sets_with_one_folder_name_are_told_apart(split, tmp_path, capsys):
    """A second set in another folder of the same name never reuses (or rebuilds over) the first
    set's index: the error names the index, both inputs and what to do."""
    root, _, args = split
    other = tmp_path / "elsewhere" / "eval"
    shutil.copytree(root / "eval", other)
    argv = list(args)
    argv[argv.index("--eval") + 1] = str(other)
    argv[argv.index("--run-dir") + 1] = str(tmp_path / "run2")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "evalidx/eval-eval: this evaluation index was built from" in err and str(other) in err
    assert "rename one of the two folders" in err and "--eval-index-root" in err
