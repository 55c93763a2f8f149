"""Performance benchmarks (``selftune bench ...``): variants timed side by side in one run."""
