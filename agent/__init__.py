"""selftune agent."""
