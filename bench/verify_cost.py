"""What the pixel check adds to the demo's wall time: `dedup2b demo` with verify.method=pixels
(the default) and =off, side by side, interleaved rounds, the least of each counts.

    python -m bench.verify_cost --rounds 2          # about 3 min on 2 cores

Each run builds the demo corpus and runs every stage (local executor, no calibration) into a fresh
folder; the stage wall times come from its stage_stats.json. Writes bench/results/verify_cost.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def one(work: Path, method: str) -> dict:
    from dedup2b.cli import main as cli
    out = work / method
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.time()
    rc = cli(["demo", "--out", str(out), "--no-calibrate", "--executor", "local", "--set", f"verify.method={method}"])
    if rc:
        raise SystemExit(f"dedup2b demo failed ({rc})")
    wall = time.time() - t0
    stats = json.loads((out / "stage_stats.json").read_text())
    return {"wall_s": round(wall, 1), "verify": stats.get("verify", {}), "group": stats.get("group", {}),
            "stages_s": {k: round(v.get("wall_s", 0), 2) for k, v in stats.items() if isinstance(v, dict)}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--work", default="/tmp/dedup2b-bench-verify-cost")
    ap.add_argument("--note", default="box to itself", help="what else ran on the box")
    args = ap.parse_args(argv)
    work = Path(args.work)
    runs: dict[str, list[dict]] = {"pixels": [], "off": []}
    for _ in range(args.rounds):
        for method in ("off", "pixels"):
            runs[method].append(one(work, method))
    best = {m: min(r, key=lambda x: x["wall_s"]) for m, r in runs.items()}
    ratio = best["pixels"]["wall_s"] / best["off"]["wall_s"]
    v = best["pixels"]["verify"]
    cmd = "python -m bench.verify_cost " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = [f"Command: `{cmd}` ({os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}, {args.note}); the demo "
             f"corpus, every stage, local executor, {args.rounds} interleaved round(s), the least counts", "",
             "| verify.method | wall s (least) | every run, s | verify stage s | group stage s |", "|---|---|---|---|---|"]
    for m in ("off", "pixels"):
        lines.append(f"| {m} | {best[m]['wall_s']} | {', '.join(str(r['wall_s']) for r in runs[m])} | "
                     f"{best[m]['stages_s'].get('verify')} | {best[m]['stages_s'].get('group')} |")
    lines += ["", f"The pixel check adds {100 * (ratio - 1):.0f} % to the demo's wall time (target <= 30 %).",
              f"Pixel check: {v.get('pairs_checked')} pairs checked, {v.get('pairs_implied')} not checked (already "
              f"connected), {v.get('pairs_accepted')} accepted, {v.get('ms_per_pair')} ms per pair (keypoints "
              f"included), {v.get('ms_per_image_features')} ms per image read; keypoints for "
              f"{v.get('images_with_keypoints')} of {v.get('images_with_features')} images, "
              f"{v.get('ms_per_image_keypoints')} ms each; member check: "
              f"{best['pixels']['group'].get('member_checks_pixels')} members checked by pixels."]
    md = "\n".join(lines) + "\n"
    print(md)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "verify_cost.md").write_text(md)
    (RESULTS / "verify_cost.json").write_text(json.dumps({"command": cmd, "runs": runs, "ratio": ratio}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
