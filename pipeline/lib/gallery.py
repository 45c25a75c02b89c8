"""The HTML report: a static, self-contained gallery that opens from disk.

report/index.html         summary figures, the histogram, the largest groups (page 1) and the
                          borderline pairs just above and just below the threshold
report/groups_N.html      further pages of groups, GROUPS_PER_PAGE each
report/top_groups.parquet   the most-duplicated groups: representative key, size, url, caption
Thumbnails are small JPEGs inlined as data URIs, read by key from the input tars.
Every caption, key and url is escaped; only http(s) urls become links (javascript:, data: and any
other scheme are shown as text), and a Content-Security-Policy lets no script run but the page's
own load handler (by its hash), nothing load but inline images, no form post anywhere.
"""
from __future__ import annotations

import base64
import hashlib
import html
import io
from urllib.parse import urlsplit
from pathlib import Path

import pandas as pd
import pyarrow as pa

from ..core.io import write_bytes, write_parquet

GROUPS_PER_PAGE = 40
MAX_PAGES = 10
MEMBERS_SHOWN = 8
BORDER_PAIRS = 24
LEAKS_SHOWN = 60


def _thumbs(run, members: pd.DataFrame, px: int = 128) -> dict[int, str]:
    """gid -> data URI of a thumbnail, reading only the wanted members of each tar."""
    from PIL import Image
    out: dict[int, str] = {}
    if not run.source.HAS_IMAGES or members.empty:
        return out
    for shard in run.shards:
        want = members[members["shard"] == shard.name]
        if want.empty:
            continue
        for gid, data in run.source.read_images(shard, dict(zip(want["member"], want["gid"]))):
            try:
                img = Image.open(io.BytesIO(data)).convert("RGB")
                img.thumbnail((px, px))
                buf = io.BytesIO()
                img.save(buf, format="JPEG", quality=80)
                out[int(gid)] = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
            except Exception:   # a row that failed to decode has no thumbnail; the text says so
                pass
    return out


def _card(row, thumbs: dict, note: str = "") -> str:
    src = thumbs.get(int(row["gid"]))
    img = f'<img src="{src}" alt="{html.escape(str(row["key"]))}">' if src else '<div class="noimg">no image</div>'
    cap = html.escape(str(row.get("caption") or ""))[:160]
    return (f'<figure class="card">{img}<figcaption><b>{html.escape(str(row["key"]))}</b> {note}<br>'
            f'<span class="cap">{cap}</span><br>{link(row.get("url"))}</figcaption></figure>')


def link(url, shown: int = 60) -> str:
    """An http(s) url as a link that opens without access to this page; anything else as text."""
    text = str(url or "")
    try:
        clickable = urlsplit(text.strip()).scheme.lower() in ("http", "https")
    except ValueError:          # not a url at all
        clickable = False
    label = html.escape(text[:shown])
    if not clickable:
        return f'<span class="url">{label}</span>'
    return f'<a href="{html.escape(text.strip(), quote=True)}" rel="noopener noreferrer nofollow">{label}</a>'


_STYLE = """<style>body{font-family:sans-serif;margin:1.5em;color:#222}
.group{border:1px solid #ccc;border-radius:6px;margin:1em 0;padding:.5em}
.row{display:flex;flex-wrap:wrap;gap:.5em}.card{width:150px;margin:0;font-size:11px}
.card img{width:128px;height:128px;object-fit:contain;background:#f4f4f4}
.noimg{width:128px;height:128px;background:#eee;display:flex;align-items:center;justify-content:center}
.cap{color:#555}table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}
.pair{display:flex;gap:.5em;align-items:center;border-bottom:1px solid #eee;padding:.3em 0}
.card a{word-break:break-all}</style>"""
# after load, the page records how many of its images decoded (a browser test reads it back)
_LOAD_JS = """window.addEventListener('load',function(){var im=Array.prototype.slice.call(document.images);
document.body.setAttribute('data-images',im.length);document.body.setAttribute('data-loaded',
im.filter(function(x){return x.complete&&x.naturalWidth>0;}).length);});"""
# the only script allowed to run: this one, by its hash; images only inline (data:), styles inline
CSP = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
       f"script-src 'sha256-{base64.b64encode(hashlib.sha256(_LOAD_JS.encode()).digest()).decode()}'; "
       "base-uri 'none'; form-action 'none'")


def _page(title: str, body: str) -> bytes:
    return (f"<!doctype html><html><head><meta charset='utf-8'>"
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            f"<meta name='referrer' content='no-referrer'><title>{html.escape(title)}</title>{_STYLE}"
            f"<script>{_LOAD_JS}</script></head><body><h1>{html.escape(title)}</h1>{body}</body></html>").encode()


def write(run, samples: pd.DataFrame, groups: pd.DataFrame, pairs_near: pd.DataFrame, summary: dict,
          threshold: float, leaks: pd.DataFrame | None = None) -> list[Path]:
    out = run.report_dir()
    ok = samples[samples["status"] == "ok"]     # the rows shown (report.Shown), with their member names
    reps = ok[ok["is_representative"].astype(bool)].set_index("group_id")
    top = groups.head(GROUPS_PER_PAGE * MAX_PAGES).copy()
    top["url"] = top["group_id"].map(reps["url"])
    top["caption"] = top["group_id"].map(reps["caption"])
    write_parquet(out / "top_groups.parquet", pa.Table.from_pandas(
        top[["group_id", "representative_key", "size", "url", "caption", "min_similarity"]], preserve_index=False))

    members = ok[ok["group_id"].isin(top["group_id"])].sort_values(["group_id", "is_representative", "gid"],
                                                                  ascending=[True, False, True])
    shown = members.groupby("group_id").head(MEMBERS_SHOWN)
    by_key = ok.set_index("key")
    border = pd.concat([pairs_near[pairs_near["similarity"] >= threshold].nsmallest(BORDER_PAIRS // 2, "similarity"),
                        pairs_near[pairs_near["similarity"] < threshold].nlargest(BORDER_PAIRS // 2, "similarity")])
    border_rows = by_key.loc[by_key.index.intersection(pd.concat([border["key_a"], border["key_b"]]))].reset_index()
    leaks = leaks if leaks is not None else pd.DataFrame({"eval_set": [], "eval_key": [], "key": []})
    leak_rows = by_key.loc[by_key.index.intersection(leaks["key"].head(LEAKS_SHOWN))].reset_index()
    thumbs = _thumbs(run, pd.concat([shown, border_rows, leak_rows])[["gid", "shard", "member"]].dropna()
                     .drop_duplicates())

    pages = [top.iloc[i:i + GROUPS_PER_PAGE] for i in range(0, len(top), GROUPS_PER_PAGE)] or [top]
    names = ["index.html"] + [f"groups_{i + 1}.html" for i in range(1, len(pages))]
    nav = " ".join(f'<a href="{n}">page {i + 1}</a>' for i, n in enumerate(names))
    files = []
    for p, (name, chunk) in enumerate(zip(names, pages)):
        parts = []
        if p == 0:
            s = summary
            rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in (
                ("input rows", s["input_rows"]), ("ok / failed", f'{s["ok"]} / {s["failed"]}'),
                ("groups", s["groups"]), ("duplicates", f'{s["duplicates"]} ({100 * s["duplicate_fraction"]:.1f}%)'),
                ("kept / removed", f'{s["kept"]} / {s["removed"]}'),
                ("removed by reason", ", ".join(f"{k}: {v}" for k, v in s.get("removed_by_reason", {}).items()) or "-"),
                ("threshold", s["threshold"]),
                ("model", s["model"]), ("codec", f'{s["codec"]} ({s["bytes_per_vector"]} B/vector)')))
            png = (out / "histogram.png").read_bytes()
            parts.append(f'<table class="summary">{rows}</table><p><img alt="histograms" style="max-width:100%" '
                         f'src="data:image/png;base64,{base64.b64encode(png).decode()}"></p>')
            prs = []
            for _, pr in border.sort_values("similarity", ascending=False).iterrows():
                side = lambda k: _card(by_key.loc[k].to_dict() | {"key": k}, thumbs) if k in by_key.index else ""  # noqa: E731
                tag = "duplicate" if pr["similarity"] >= threshold else "not duplicate"
                prs.append(f'<div class="pair">{side(pr["key_a"])}{side(pr["key_b"])}'
                           f'<div>cosine {pr["similarity"]:.4f}<br>{tag}</div></div>')
            parts.append(f'<h2>Borderline pairs (threshold {threshold})</h2><div id="borderline">{"".join(prs)}</div>')
            if len(leaks):
                parts.append(_leak_section(leaks, by_key, thumbs))
        parts.append(f"<h2>Largest groups</h2><p>{nav}</p>")
        for _, g in chunk.iterrows():
            cards = "".join(_card(r, thumbs, _label(r)) for _, r in shown[shown["group_id"] == g["group_id"]].iterrows())
            parts.append(f'<div class="group" data-size="{int(g["size"])}"><b>{int(g["size"])} rows</b>, '
                         f'min similarity to the kept row {g["min_similarity"]:.3f}<div class="row">{cards}</div></div>')
        files.append(write_bytes(out / name, _page("dedup2b report" if p == 0 else f"dedup2b groups, page {p + 1}",
                                                   "".join(parts))))
    return files


def _label(r) -> str:
    """What a group member's card says: the kept row, a row removed for another reason than being
    a copy (a removal request, an evaluation leak), or a copy's similarity to the kept row."""
    reason = r.get("removed_reason")
    if isinstance(reason, str) and reason != "duplicate":
        return f"(removed: {reason})"
    return "(kept)" if r["is_representative"] else f'{r["rep_similarity"]:.3f}'


def _leak_section(leaks: pd.DataFrame, by_key: pd.DataFrame, thumbs: dict) -> str:
    """Evaluation items found in the training rows: which item, how many times, where."""
    items = []
    for (name, eval_key), part in list(leaks.head(LEAKS_SHOWN).groupby(["eval_set", "eval_key"], sort=False)):
        cards = "".join(_card(by_key.loc[k].to_dict() | {"key": k}, thumbs, f"{s:.3f}")
                        for k, s in zip(part["key"], part["similarity"]) if k in by_key.index)
        items.append(f'<div class="group leak"><b>{html.escape(str(name))} / {html.escape(str(eval_key))}</b>: '
                     f'in {len(part)} training rows (removed)<div class="row">{cards}</div></div>')
    return (f'<h2>Evaluation-set leaks</h2><p>{leaks["eval_key"].nunique()} evaluation items found in '
            f'{leaks["key"].nunique()} training rows; see leaks.parquet.</p><div id="leaks">{"".join(items)}</div>')
