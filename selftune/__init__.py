"""selftune: an agent runtime that tunes its own local model on its best episodes."""

__version__ = "0.1.0"
