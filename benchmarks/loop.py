"""`selftune bench loop` as a script: `.venv/bin/python benchmarks/loop.py --json` (options: `--help`)."""

import sys

from selftune.cli import app

if __name__ == "__main__":
    app(["bench", "loop", *sys.argv[1:]])
