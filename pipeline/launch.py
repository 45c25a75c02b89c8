"""The `dedup2b` command: the CLI (cli.py) in a process whose allocator keeps the memory it frees
(core/memory.py: relaunch, KEEP_FREED), started again once before the CLI's imports."""
from __future__ import annotations


def main() -> int:
    from .core.memory import relaunch
    relaunch()
    from .cli import main as cli_main
    return cli_main()
