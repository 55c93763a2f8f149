"""selftune tuning."""
