"""selftune tools."""
