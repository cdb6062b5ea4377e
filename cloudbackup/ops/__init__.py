"""The use cases: backup, upload, verify, list, prune, forget, status, run, check, and the
notifications, hooks and schedules around run. They return results and never print."""
