"""Real img2dataset, fetching from a local HTTP server on 127.0.0.1, fed through the pipeline."""
import io
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from dedup2b import demo
from dedup2b.core.executor import LocalExecutor
from dedup2b.driver import run_stages

from conftest import make_config


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def http_server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                            cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 20
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.1)
    yield root, f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=10)


def test_img2dataset_output_through_the_pipeline(tmp_path, http_server):
    if shutil.which("img2dataset") is None and not Path(sys.executable).with_name("img2dataset").exists():
        pytest.fail("img2dataset is not installed (it is a dependency of dedup2b)")
    www, base = http_server
    bases = {name: img for name, img in demo.base_images() if name in ("coffee", "astronaut", "rocket", "chelsea")}
    urls, expect = [], {}
    for name, img in bases.items():
        for q in (92, 75):
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=q)
            (www / f"{name}_{q}.jpg").write_bytes(buf.getvalue())
            urls.append(f"{base}/{name}_{q}.jpg")
            expect[urls[-1]] = name
    urls.append(f"{base}/missing.jpg")                     # a 404: img2dataset marks it failed
    (tmp_path / "urls.txt").write_text("\n".join(urls) + "\n")
    out = tmp_path / "shards"
    exe = str(Path(sys.executable).with_name("img2dataset"))
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled"}
    subprocess.run([exe, "--url_list", str(tmp_path / "urls.txt"), "--input_format", "txt",
                    "--output_folder", str(out), "--output_format", "webdataset",
                    "--processes_count", "1", "--thread_count", "4", "--resize_mode", "no",
                    "--disable_all_reencoding", "True", "--enable_wandb", "False",
                    "--distributor", "multiprocessing", "--retries", "0", "--timeout", "5"],
                   check=True, env=env, timeout=300, capture_output=True)
    assert (out / "00000.tar").exists() and (out / "00000.parquet").exists()
    cfg = make_config(tmp_path, out)
    run_stages(cfg, LocalExecutor(), log=lambda *_: None)
    s = pq.read_table(cfg.run_path / "report" / "samples.parquet").to_pandas()
    assert len(s) == len(urls)
    assert (s.status == "failed").sum() == 1 and s.loc[s.status == "failed", "url"].iloc[0].endswith("missing.jpg")
    ok = s[s.status == "ok"]
    by_name = ok.groupby(ok.url.map(expect)).group_id.nunique()
    assert (by_name == 1).all()                            # both qualities of a photo grouped
    assert ok.group_id.nunique() == len(bases)             # distinct photos stay apart
