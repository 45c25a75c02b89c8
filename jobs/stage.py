"""Ray job entrypoint for one stage (earlier stages must be done in the same run dir).

    ray job submit --address http://127.0.0.1:8265 --working-dir . --runtime-env jobs/runtime_env.yaml \\
        -- python -m jobs.stage search --config my.yaml --base-dir $PWD

Same options as `jobs.dedup`; the stages are dedup2b.stages.NAMES.
"""
from __future__ import annotations

import sys

from dedup2b.stages import NAMES

from .dedup import parser, run


def main(argv=None) -> int:
    ap = parser("jobs.stage")
    ap.add_argument("stage", choices=NAMES)
    args = ap.parse_args(argv)
    return run(args, (args.stage,))


if __name__ == "__main__":
    sys.exit(main())
