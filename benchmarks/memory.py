"""`selftune bench memory` as a script: `.venv/bin/python benchmarks/memory.py --json` (options: `--help`)."""

import sys

from selftune.cli import app

if __name__ == "__main__":
    app(["bench", "memory", *sys.argv[1:]])
