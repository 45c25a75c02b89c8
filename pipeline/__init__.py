"""dedup2b: near-duplicate finding and removal for web-scale image-text corpora.

The Python API, for notebooks and scripts (the CLI and the Ray jobs build the same config):

    import dedup2b
    summary = dedup2b.run(input="shards/", run_dir="reports/laion-part", executor="local",
                          sets=["search.threshold=0.9"])
    tables = dedup2b.open_reports("reports/laion-part")     # {"samples": DataFrame, "pairs": ..., ...}
    copies = dedup2b.find("indexes/laion-part", ["takedown/photo.jpg"])   # rows that copy these images
"""
import os as _os

# Measured on a 2-core box: FAISS k-means with libgomp's default busy-waiting is 10-90x slower
# (PQ32x8 training on 2,000 vectors: 54 s vs 0.6 s). Passive waiting costs nothing measurable.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.2.0"

REPORT_TABLES = ("samples", "pairs", "groups", "histogram", "similarity", "top_groups", "leaks")


def run(config=None, *, input=None, run_dir=None, index_dir=None, sets=None, stages=None,
        executor="ray", fresh=False, log=print) -> dict:
    """Run the pipeline (all stages, or `stages`) on a YAML config and/or named paths; relative paths
    are taken against the current directory, defaults as the CLI's. Returns summary.json (or, when
    the report stage did not run, every stage's stats)."""
    from .core import config as config_mod
    from .core.run import report_dir
    from .driver import execute
    from .stages import NAMES
    overrides = {k: v for k, v in (("input.path", input), ("run_dir", run_dir), ("index_dir", index_dir)) if v}
    cfg = config_mod.build(config, sets, _os.getcwd(), overrides, log=log)
    stats = execute(cfg, tuple(stages or NAMES), executor, fresh=fresh, log=log)
    summary = report_dir(cfg.run_path) / "summary.json"
    if summary.exists() and "report" in (stages or NAMES):
        import json
        return json.loads(summary.read_text())
    return stats


def open_reports(run_dir) -> dict:
    """A finished run's report tables as pandas DataFrames (those present), and its summary."""
    import json

    import pandas as pd

    from .driver import open_existing
    folder = open_existing(run_dir).report_dir()
    out = {name: pd.read_parquet(folder / f"{name}.parquet") for name in REPORT_TABLES
           if (folder / f"{name}.parquet").exists()}
    out["summary"] = json.loads((folder / "summary.json").read_text())
    return out


def find(index, images=(), threshold=None, **kwargs):
    """The rows of a built index (indexes/NAME, or an index folder) that are copies of the given
    images (files, or folders of images): a DataFrame of query, key, url, caption, similarity, gid,
    pixel_check. See `dedup2b.lookup.find` for query vectors and the pixel verifier hook."""
    from .lookup import find as _find
    from .lookup import index_folder
    return _find(index_folder(index), images, threshold, **kwargs)
