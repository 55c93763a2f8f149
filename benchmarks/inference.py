"""`selftune bench inference` as a script: `.venv/bin/python benchmarks/inference.py --json` (options: `--help`)."""

import sys

from selftune.cli import app

if __name__ == "__main__":
    app(["bench", "inference", *sys.argv[1:]])
