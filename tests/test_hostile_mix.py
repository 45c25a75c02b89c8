"""Random mixes of hostile img2dataset shards (seeded): every run ends either with a report whose
invariant holds, counted here from the input files (input rows = kept + removed + failed, every row
once, no key both kept and removed, each row's outcome the one its defect calls for), or with an
error at ingest naming the file, and no report.

Row defects (a row each):   outcome
  good, copy                  ok (kept or removed)
  undecodable image           failed (empty, text, truncated, broken PNG; repeats are exact copies)
  member twice in the tar     failed
  key twice in the parquet    the repeat failed
  symlink member              failed (never followed: the image is missing)
  key in two tar folders      failed
  image missing               failed
  image without a parquet row failed (an input row of its own)
  img2dataset failed row      failed
Shard defects:              integer keys (0 among them), binary non-UTF-8 captions, uid column with
                            non-hex / hex / empty uids: the rows' outcomes above, unchanged
Fatal (error at ingest):    `..` member (names the tar), parquet without a key column (names the
                            parquet), a key in two shards (names both shards)
Mix 0 is every row failed; every fourth mix carries a fatal defect.
"""
import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dedup2b.core.executor import LocalExecutor, ShardFailed
from dedup2b.driver import run_stages
from dedup2b.sources.base import InputError

from conftest import make_config

MIXES = 12
ROW_KINDS = {"good": "ok", "copy": "ok", "undecodable": "failed", "member_twice": "failed",
             "key_twice": "failed", "symlink": "failed", "two_folders": "failed", "missing": "failed",
             "extra_image": "failed", "download_failed": "failed"}
FAILING = [k for k, v in ROW_KINDS.items() if v == "failed"]
SHARD_KINDS = ("int_keys", "binary_captions", "odd_uids")
FATAL_KINDS = ("dotdot_member", "no_key_column", "key_in_two_shards")
GARBAGE = (b"", b"this is not an image", b"\xff\xd8\xff\xe0" + b"\x00" * 60, b"\x89PNG broken")


class Mix:
    """One mix's shards, written as they are drawn, and what each row must come out as."""

    def __init__(self, folder: Path, seed: int):
        self.folder, self.rng = folder, np.random.default_rng(seed)
        self.expected: Counter = Counter()          # (key, status) -> rows
        self.images: list[bytes] = []
        self.kinds: set[str] = set()
        self.fatal: dict[str, str] = {}             # fatal kind -> the file name the error must carry
        self.n_int = self.n_str = 0
        folder.mkdir(parents=True)

    def image(self) -> bytes:
        px = self.rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(px).save(buf, format="PNG")
        self.images.append(buf.getvalue())
        return buf.getvalue()

    def key(self, int_keys: bool):
        if int_keys:
            self.n_int += 1
            return self.n_int - 1                   # 0 is the first integer key
        self.n_str += 1
        return f"k{self.n_str}"

    def shard(self, index: int, kinds: list[str], flags: set[str]) -> None:
        rows, members = [], []                      # parquet rows; (name, bytes | None for a symlink)
        int_keys = "int_keys" in flags
        for kind in kinds:
            if kind == "key_twice" and not rows:
                kind = "good"
            self.kinds.add(kind)
            key = rows[int(self.rng.integers(len(rows)))]["key"] if kind == "key_twice" else self.key(int_keys)
            status, err = "success", None
            if kind in ("good", "copy", "undecodable", "member_twice", "two_folders"):
                data = (self.images[int(self.rng.integers(len(self.images)))] if kind == "copy" and self.images
                        else GARBAGE[int(self.rng.integers(len(GARBAGE)))] if kind == "undecodable" else self.image())
                members.append((f"{key}.png", data))
                if kind == "member_twice":
                    members.append((f"{key}.png", self.image()))
                if kind == "two_folders":
                    members.append((f"sub/{key}.png", self.image()))
            elif kind == "symlink":
                members.append((f"{key}.png", None))
            elif kind == "download_failed":
                status, err = "failed_to_download", "HTTP Error 404"
            if kind == "extra_image":
                stem = f"x{index}_{len(members)}"
                members.append((f"{stem}.png", self.image()))
                self.expected[(stem, "failed")] += 1
                continue
            if kind != "key_twice":                 # the repeat names the first row's members
                members.append((f"{key}.txt", f"caption {key}".encode()))
            rows.append({"key": key, "url": f"http://example.com/{key}", "status": status, "error_message": err,
                         "caption": b"caf\xe9 \xff" if "binary_captions" in flags else f"caption {key}",
                         "uid": ["not-hex!", "ABCDEF0123456789ABCDEF0123456789", None][len(rows) % 3]})
            self.expected[(str(key), ROW_KINDS[kind])] += 1
        self.kinds |= flags
        self._write(index, rows, members, flags)

    def _write(self, index: int, rows: list[dict], members: list, flags: set[str]) -> None:
        name = f"{index:05d}"
        with tarfile.open(self.folder / f"{name}.tar", "w") as tar:
            for member, data in members:
                info = tarfile.TarInfo(member)
                if data is None:
                    info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd" if len(members) % 2 else "../../x.png"
                    tar.addfile(info)
                else:
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        cols = {"key": pa.array([r["key"] for r in rows], pa.int64() if "int_keys" in flags else pa.string())}
        for col in ("url", "status", "error_message"):
            cols[col] = pa.array([r[col] for r in rows], pa.string())
        cols["caption"] = pa.array([r["caption"] for r in rows],
                                   pa.binary() if "binary_captions" in flags else pa.string())
        if "odd_uids" in flags:
            cols["uid"] = pa.array([r["uid"] for r in rows], pa.string())
        pq.write_table(pa.table(cols), self.folder / f"{name}.parquet")

    def make_fatal(self, kind: str, n_shards: int) -> None:
        self.kinds.add(kind)
        target = int(self.rng.integers(n_shards))
        name = f"{target:05d}"
        if kind == "dotdot_member":
            with tarfile.open(self.folder / f"{name}.tar", "a") as tar:
                info = tarfile.TarInfo("../evil.png")
                info.size = 3
                tar.addfile(info, io.BytesIO(b"abc"))
            self.fatal[kind] = str(self.folder / f"{name}.tar")
        elif kind == "no_key_column":
            path = self.folder / f"{name}.parquet"
            t = pq.read_table(path)
            pq.write_table(t.drop_columns(["key"]), path)
            self.fatal[kind] = str(path)
        else:                                       # a key of the first shard again in the last
            first = pq.read_table(self.folder / "00000.parquet")
            last = self.folder / f"{n_shards - 1:05d}.parquet"
            t = pq.read_table(last)
            extra = first.slice(0, 1).cast(t.schema)
            pq.write_table(pa.concat_tables([t, extra]), last)
            self.fatal[kind] = f"shard {n_shards - 1:05d}"


def draw(folder: Path, seed: int) -> Mix:
    mix = Mix(folder, seed)
    rng = mix.rng
    n_shards = 2 if seed % 4 == 3 else int(rng.integers(1, 4))
    fatal = seed % 4 == 3
    for index in range(n_shards):
        pool = FAILING if seed == 0 else list(ROW_KINDS)
        kinds = [pool[int(i)] for i in rng.integers(len(pool), size=int(rng.integers(3, 9)))]
        flags = {k for k in SHARD_KINDS if rng.random() < 0.4}
        if fatal:       # a parquet row to repeat in another shard, keys of one type
            kinds, flags = ["good", *kinds], flags - {"int_keys"}
        mix.shard(index, kinds, flags)
    if fatal:
        mix.make_fatal(FATAL_KINDS[(seed // 4) % len(FATAL_KINDS)], n_shards)
    return mix


def rows_in_files(folder: Path) -> int:
    """Input rows counted from the files: parquet rows, plus tar images no parquet row names."""
    n = 0
    for parquet in sorted(folder.glob("*.parquet")):
        t = pq.read_table(parquet)
        keys = {str(k) for k in t["key"].to_pylist()}
        with tarfile.open(parquet.with_suffix(".tar")) as tar:
            stems = {Path(m.name).stem for m in tar if m.isreg() and m.name.endswith(".png")}
        n += t.num_rows + len(stems - keys)
    return n


@pytest.mark.parametrize("seed", range(MIXES))
def test_a_hostile_mix_ends_in_a_true_report_or_an_error_naming_the_file(tmp_path, seed):
    mix = draw(tmp_path / "in", seed)
    cfg = make_config(tmp_path, mix.folder)
    if mix.fatal:
        with pytest.raises((InputError, ShardFailed)) as err:
            run_stages(cfg, LocalExecutor(), log=lambda *_: None)
        assert any(name in str(err.value) for name in mix.fatal.values()), (mix.fatal, str(err.value))
        assert not (cfg.run_path / "embed" / "_done").exists()            # it stopped at ingest
        assert not (cfg.run_path / "report" / "summary.json").exists()
        return
    run_stages(cfg, LocalExecutor(), log=lambda *_: None)
    n_in = rows_in_files(mix.folder)
    assert n_in == sum(mix.expected.values())
    s = pq.read_table(cfg.run_path / "report" / "samples.parquet").to_pandas()
    assert len(s) == n_in and not s.duplicated(["shard", "row"]).any()
    ok = s.status == "ok"
    kept, removed, failed = s[ok & s.removed_reason.isna()], s[ok & s.removed_reason.notna()], s[~ok]
    assert len(kept) + len(removed) + len(failed) == n_in and set(s.status) <= {"ok", "failed"}
    assert not set(kept.key) & set(removed.key) and not s[ok].key.duplicated().any()
    assert Counter(zip(s.key, s.status)) == mix.expected
    assert failed.error.str.len().gt(0).all()
    summary = json.loads((cfg.run_path / "report" / "summary.json").read_text())
    assert (summary["input_rows"], summary["kept"], summary["removed"], summary["failed"]) == \
        (n_in, len(kept), len(removed), len(failed))
    exported = [str(k) for p in sorted((cfg.run_path / "export" / "webdataset").glob("*.parquet"))
                for k in pq.read_table(p)["key"].to_pylist()]
    assert sorted(exported) == sorted(kept.key)          # one row per kept sample, whatever the key types
    hf = [k for p in sorted((cfg.run_path / "export" / "hf").glob("*.parquet")) for k in pq.read_table(p)["key"].to_pylist()]
    assert sorted(hf) == sorted(kept.key)
    if seed == 0:
        assert len(failed) == n_in


def test_the_mixes_cover_every_defect(tmp_path):
    kinds = set()
    for seed in range(MIXES):
        kinds |= draw(tmp_path / str(seed), seed).kinds
    assert kinds == set(ROW_KINDS) | set(SHARD_KINDS) | set(FATAL_KINDS), kinds
