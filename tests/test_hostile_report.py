"""Hostile captions, keys and urls in the HTML report: escaped, never live, no script runs but the
page's own (real pipeline, real headless Chromium where installed)."""
import re
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dedup2b.core.executor import LocalExecutor
from dedup2b.driver import run_stages
from dedup2b.stages import NAMES
from dedup2b.lib.gallery import CSP, link

from conftest import chromium_dom, make_config

PWN = "document.body.setAttribute('data-pwned','{}')"
URLS = [f"javascript:{PWN.format('js-link')}", " JaVaScRiPt:" + PWN.format("js-case"),
        "java\tscript:" + PWN.format("js-tab"), f"data:text/html,<script>{PWN.format('data')}</script>",
        "vbscript:msgbox(1)", "https://example.com/a?q=<b>&x=\"y\"", "http://example.com/ok"]
CAPTION = (f"<script>{PWN.format('caption')}</script><img src=x onerror=\"{PWN.format('onerror')}\">"
           "\"'><svg onload=alert(1)>")


def test_only_http_links_are_clickable():
    for url in URLS[:5] + [None, "", "not a url", "//evil.example/x"]:
        assert "<a " not in link(url), url
    for url in URLS[5:]:
        out = link(url)
        assert out.startswith('<a href="http') and 'rel="noopener noreferrer nofollow"' in out and "<b>" not in out


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory, demo_corpus):
    _, shards = demo_corpus
    root = tmp_path_factory.mktemp("hostile")
    folder = root / "shards"
    shutil.copytree(shards, folder)
    for p in sorted(folder.glob("*.parquet")):
        t = pq.read_table(p)
        n = t.num_rows
        t = t.set_column(t.schema.get_field_index("url"), "url", pa.array([URLS[i % len(URLS)] for i in range(n)]))
        t = t.set_column(t.schema.get_field_index("caption"), "caption", pa.array([CAPTION] * n))
        pq.write_table(t, p)
    cfg = make_config(root, folder)
    run_stages(cfg, LocalExecutor(), stages=NAMES[:NAMES.index("report") + 1],
               log=lambda *_: None)
    return cfg


def test_report_pages_carry_the_policy_and_no_live_payload(hostile_run):
    pages = sorted((hostile_run.run_path / "report").glob("*.html"))
    assert pages
    for page in pages:
        text = page.read_text()
        assert CSP in text and "script-src 'sha256-" in text and "'unsafe-inline'" not in CSP.split("script-src")[1]
        hrefs = re.findall(r'<a href="([^"]*)"', text)
        assert all(h.startswith(("http://", "https://")) or re.fullmatch(r"(index|groups_\d+)\.html", h) for h in hrefs)
        assert "<script>document" not in text and "<img src=x" not in text and "<svg" not in text


def test_nothing_hostile_runs_in_chromium(hostile_run, tmp_path):
    dom = chromium_dom(hostile_run.run_path / "report" / "index.html", tmp_path / "profile")
    body = re.search(r"<body[^>]*>", dom).group(0)
    assert 'data-images="' in body, "the page's own script did not run (policy hash wrong?)"
    assert "data-pwned" not in body, body                 # no caption, key or url payload ran
    assert int(re.search(r'data-images="(\d+)"', body).group(1)) > 0
    assert not re.search(r'href="\s*(javascript|data|vbscript):', dom, re.I)
