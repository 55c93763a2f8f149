"""The long-running daemon: a durable goal queue, goal workers, scheduled jobs, an HTTP API and a web chat.

``queue`` (goals, their state changes and step events in SQLite), ``journal`` (adapter
switches, tuning runs, job runs), ``worker`` (runs claimed goals on the agent),
``scheduler`` (APScheduler jobs: tuning, reports, compaction), ``tuning`` (the tuning
child process), ``auth`` (token, limits), ``api`` (the FastAPI app), ``server`` (process
lifecycle) and ``client`` (what ``selftune chat`` and ``selftune submit`` talk through).
"""
