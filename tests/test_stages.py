"""The stage protocol and the one stage list: every consumer derives from it; the Python API; run
directories and indexes of the earlier layout are refused, never misread."""
import json
from pathlib import Path

import pandas as pd
import pytest

import dedup2b
from dedup2b import cli
from dedup2b.core.run import StaleRunError
from dedup2b.driver import status
from dedup2b.lib.registry import Target, TargetError
from dedup2b.stages import FIELDS, NAMES, STAGES


def test_every_stage_has_the_protocol_and_every_consumer_follows_the_list(tmp_path):
    assert len(set(NAMES)) == len(NAMES) == len(STAGES)
    for stage in STAGES:
        assert isinstance(stage.NAME, str) and callable(stage.units) and callable(stage.run)
        assert stage.FIELDS[0] == "input" and FIELDS[stage.NAME] == stage.FIELDS
    # later stages depend on everything their inputs depend on (the fingerprint covers its inputs)
    def covered(early, late):   # a dotted field is covered by itself or by its whole section
        return all(f in late or f.split(".")[0] in late for f in early)
    assert covered(FIELDS["search"], FIELDS["verify"]) and covered(FIELDS["verify"], FIELDS["group"])
    assert covered(FIELDS["group"], FIELDS["export"]) and covered(FIELDS["index"], FIELDS["search"])
    sub = next(a for a in cli.build_parser()._actions if a.dest == "cmd")
    assert set(NAMES) <= set(sub.choices)
    from jobs import stage as job_stage
    with pytest.raises(SystemExit):
        job_stage.main(["no-such-stage", "--config", "x.yaml"])


def test_python_api_runs_and_opens_the_reports(demo_corpus, tmp_path, monkeypatch):
    _, shards = demo_corpus
    monkeypatch.chdir(tmp_path)
    stats = dedup2b.run(input=str(shards), executor="local", stages=("ingest", "embed"), log=lambda *_: None)
    assert set(stats) == {"ingest", "embed"} and stats["ingest"]["rows"] == 156
    summary = dedup2b.run(input=str(shards), executor="local", log=lambda *_: None)
    run_dir = tmp_path / "reports" / Path(shards).name          # the CLI's defaults
    assert (tmp_path / "indexes" / Path(shards).name / "registry" / "registry.parquet").exists()
    tables = dedup2b.open_reports(run_dir)
    assert tables["summary"] == summary
    s = tables["samples"]
    assert len(s) == summary["input_rows"] == 156
    assert summary["kept"] + summary["removed"] + summary["failed"] == len(s)
    assert len(tables["groups"]) == summary["duplicate_groups"] and len(tables["pairs"]) == summary["verified_pairs"]
    info = status(run_dir)
    assert list(info)[:-1] == list(NAMES) and all(v["pending"] == 0 for k, v in info.items() if k != "reports")


def test_a_run_dir_or_index_of_the_earlier_layout_is_refused(demo_corpus, tmp_path):
    _, shards = demo_corpus
    old = tmp_path / "old"
    (old / "reports").mkdir(parents=True)
    (old / "manifest.json").write_text(json.dumps({"config": {}, "fingerprints": {}, "inputs": []}))
    with pytest.raises(StaleRunError, match="earlier dedup2b.*new --run-dir"):
        dedup2b.run(input=str(shards), run_dir=str(old), executor="local", log=lambda *_: None)
    with pytest.raises(StaleRunError, match="earlier dedup2b"):
        status(old)
    index = tmp_path / "idx"
    index.mkdir()
    (index / "codec.json").write_text(json.dumps({"model": "m"}))
    (index / "registry.parquet").write_bytes(b"")
    with pytest.raises(TargetError, match="earlier dedup2b"):
        Target(index, "m")


def test_a_stage_reruns_on_an_existing_run_dir_from_its_manifest(demo_corpus, tmp_path, monkeypatch):
    """`dedup2b export --run-dir DIR --format keep`, as the README shows it: no --input needed."""
    _, shards = demo_corpus
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "reports" / "r"
    assert cli.main(["run", "--input", str(shards), "--run-dir", str(run_dir), "--executor", "local"]) == 0
    (run_dir / "export" / "keep.parquet").unlink()
    assert cli.main(["export", "--run-dir", str(run_dir), "--format", "keep", "--executor", "local"]) == 0
    assert (run_dir / "export" / "keep.parquet").exists()


@pytest.mark.parametrize("fault", ["dropped", "doubled"])
def test_the_invariant_fails_when_a_row_is_lost_or_doubled(demo_corpus, tmp_path, monkeypatch, fault):
    """Input rows are counted from the input files, kept / removed / failed from the sample rows:
    a row lost or doubled on the way stops the report."""
    from dedup2b.core.config import from_dict
    from dedup2b.core.executor import LocalExecutor
    from dedup2b.driver import run_stages
    from dedup2b.stages import report
    _, shards = demo_corpus
    cfg = from_dict({"input": {"path": str(shards)}, "run_dir": str(tmp_path / "run")})
    run_stages(cfg, LocalExecutor(), stages=NAMES[:NAMES.index("report")], log=lambda *_: None)
    real = report.shard_samples
    hit = []

    def faulty(run, shard, groups):     # one row of the first shard lost or doubled
        df = real(run, shard, groups)
        if hit:
            return df
        hit.append(shard.name)
        ok = df.index[df["status"] == "ok"]
        df = df.drop(ok[3]) if fault == "dropped" else pd.concat([df, df.loc[[ok[3]]]])
        return df.reset_index(drop=True)
    monkeypatch.setattr(report, "shard_samples", faulty)
    with pytest.raises(report.InvariantBroken, match="invariant broken: 156 input rows"):
        run_stages(cfg, LocalExecutor(), stages=("report",), log=lambda *_: None)
    assert not (cfg.run_path / "report" / "_done" / "report.json").exists()
    monkeypatch.setattr(report, "shard_samples", real)
    assert run_stages(cfg, LocalExecutor(), stages=("report",), log=lambda *_: None)["report"]["invariant_holds"]
