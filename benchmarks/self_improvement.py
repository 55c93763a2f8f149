"""`selftune bench self-improvement` as a script: `.venv/bin/python benchmarks/self_improvement.py --help`."""

import sys

from selftune.cli import app

if __name__ == "__main__":
    app(["bench", "self-improvement", *sys.argv[1:]])
