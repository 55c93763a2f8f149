"""selftune memory."""
